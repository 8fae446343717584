"""Warm swaps on the real engine: stand-ins with vLLM's sleep mode share a simulated GPU
(a lock file on a folder they all mount), so two awake at once would fail loudly.

The compose file asks for sleep mode with ``x-orchestrator: {sleep: 1}`` only: the daemon's
rewrite adds ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``, as it would for vLLM.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.fakes import make_snapshot
from tests.integration.test_dashboard import row_state
from tests.rig import SERVICE_LABEL, STANDIN_IMAGE, Rig, engine_services
from tests.waiting import eventually

pytestmark = pytest.mark.integration

COMPOSE = (
    """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment:
    STANDIN_LOAD_DELAY: "{delay}"
    STANDIN_GPU_LOCK: /gpu/lock
    STANDIN_SLEEP_TIME: "0.2"
    STANDIN_WAKE_TIME: "0.2"
    STANDIN_TOKEN_DELAY: "0.05"
  volumes:
    - ./models:/root/.cache/huggingface
    - ./gpu:/gpu
  stop_grace_period: 5s
  x-orchestrator: {{sleep: 1}}

services:
"""
    + engine_services("alpha", "beta", "gamma")
    + """  # A GPU of its own, which the test can hold, and a slow load: room to let go of it.
  engine-delta:
    <<: *engine
    profiles: ["delta"]
    command: ["--model", "org/alpha"]
    environment:
      STANDIN_LOAD_DELAY: "3"
      STANDIN_GPU_LOCK: /gpu/delta
"""
)
LOAD_DELAY = 1.0


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warm")
    for name in ("alpha", "beta", "gamma"):
        make_snapshot(root / "models" / "hub", f"org/{name}")
    (root / "gpu").mkdir()
    (root / "docker-compose.yml").write_text(COMPOSE.format(image=STANDIN_IMAGE, delay=LOAD_DELAY))
    return root


@pytest.fixture
def warm_rig(rig: Rig) -> Iterator[Rig]:
    rig.shared_services = ()
    yield rig


async def call(
    http: aiohttp.ClientSession, rig: Rig, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    async with http.post(f"{rig.url}{path}", json=body or {}) as response:
        answer = await response.json()
        assert response.status == 200, answer
        return dict(answer)


async def status(http: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    async with http.get(f"{rig.url}/status") as response:
        return dict(await response.json())


def residency(answer: dict[str, Any]) -> dict[str, str]:
    return {m["id"]: m["residency"] for m in answer["models"]}


def engine(rig: Rig, service: str) -> docker.models.containers.Container:
    (found,) = [c for c in rig.containers() if c.labels[SERVICE_LABEL] == service]
    found.reload()
    return found


def ever_started(rig: Rig) -> list[str]:
    return sorted(c.id for c in rig.ever_started())


async def test_a_return_to_a_sleeping_model_wakes_its_container(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A→B→A: A sleeps in its container and wakes there; no container is started for the
    return, and the simulated GPU never has two holders (a second would fail to load)."""
    rig = warm_rig
    rig.start_daemon()
    first = await call(http, rig, "/switch", {"model": "alpha"})
    alpha = engine(rig, "engine-alpha")
    started_at = alpha.attrs["State"]["StartedAt"]
    assert "--enable-sleep-mode" in alpha.attrs["Args"]
    assert "VLLM_SERVER_DEV_MODE=1" in alpha.attrs["Config"]["Env"]
    await call(http, rig, "/switch", {"model": "beta"})
    assert residency(await status(http, rig)) == {
        "alpha": "asleep",
        "beta": "awake",
        "gamma": "stopped",
        "delta": "stopped",
    }
    started = ever_started(rig)
    back = await call(http, rig, "/switch", {"model": "alpha"})
    assert back["switch"]["path"] == "warm" and first["switch"]["path"] == "cold"
    assert {"sleep", "wake"} <= back["switch"]["timings"].keys()
    again = engine(rig, "engine-alpha")
    assert (again.id, again.attrs["State"]["StartedAt"]) == (alpha.id, started_at)
    assert ever_started(rig) == started
    answer = await status(http, rig)
    assert answer["serving"] and answer["warm_pool"]["asleep"] == ["beta"]
    async with http.post(
        f"{rig.url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3}
    ) as response:
        assert response.status == 200, await response.text()


async def test_a_stream_under_way_finishes_before_its_model_sleeps(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    rig = warm_rig
    rig.start_daemon()
    await call(http, rig, "/switch", {"model": "alpha"})
    body = {"model": "alpha", "prompt": "go", "max_tokens": 30, "stream": True}
    async with http.post(f"{rig.url}/v1/completions", json=body) as response:
        assert response.status == 200
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        switching = asyncio.create_task(call(http, rig, "/switch", {"model": "beta"}))
        rest = (await response.content.read()).decode()
    chunks = [json.loads(first[6:])] + [
        json.loads(line[6:])
        for line in rest.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert rest.rstrip().endswith("data: [DONE]")
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}  # not "abort"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) == 30
    switched = await switching
    assert switched["switch"]["outcome"] == "ok"
    assert residency(switched["status"])["alpha"] == "asleep"


async def test_max_asleep_stops_the_least_recently_used_sleeper(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    rig = warm_rig
    rig.start_daemon(env={"ORCHESTRATOR_MAX_ASLEEP": "1"})
    for model in ("alpha", "beta", "gamma"):
        await call(http, rig, "/switch", {"model": model})
    answer = await status(http, rig)
    assert residency(answer) == {
        "alpha": "stopped",
        "beta": "asleep",
        "gamma": "awake",
        "delta": "stopped",
    }
    assert rig.model_containers() == ["engine-beta", "engine-gamma"]


async def test_a_wake_that_fails_starts_the_model_cold(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Something else holds delta's GPU when delta should wake: the wake fails with CUDA
    out of memory, the container is stopped, and delta starts afresh once the GPU is free."""
    rig = warm_rig
    rig.start_daemon()
    await call(http, rig, "/switch", {"model": "delta"})
    old_delta = engine(rig, "engine-delta").id
    await call(http, rig, "/switch", {"model": "beta"})
    with (rig.root / "gpu" / "delta").open("a") as lock:
        assert _try_lock(lock), "delta asleep has let go of its GPU"
        switching = asyncio.create_task(call(http, rig, "/switch", {"model": "delta"}))

        async def starting_cold() -> bool:
            answer = await status(http, rig)
            return (answer["state"], answer["reason"]) == ("starting", "starting delta")

        # The new container takes the GPU only after its 3 s load.
        await eventually(starting_cold, within=30, interval=0.02, what="delta starting cold")
        fcntl.flock(lock, fcntl.LOCK_UN)
    record = (await switching)["switch"]
    assert record["outcome"] == "ok" and record["path"] == "cold"
    assert "failed_wake" in record["timings"]
    assert engine(rig, "engine-delta").id != old_delta


def _try_lock(lock: Any) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def test_a_killed_daemon_adopts_the_awake_model_and_the_sleeper(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    rig = warm_rig
    rig.start_daemon()
    await call(http, rig, "/switch", {"model": "alpha"})
    await call(http, rig, "/switch", {"model": "beta"})
    before = {c.labels[SERVICE_LABEL]: c.attrs["State"]["StartedAt"] for c in rig.containers()}
    rig.stop_daemons(signal.SIGKILL)
    rig.start_daemon()

    seen: list[dict[str, Any]] = []

    async def adopted() -> bool:
        answer = await status(http, rig)
        seen.append(answer)
        return bool(answer["serving"]) and residency(answer) == {
            "alpha": "asleep",
            "beta": "awake",
            "gamma": "stopped",
            "delta": "stopped",
        }

    await eventually(
        adopted,
        within=30,
        what="both models adopted",
        context=lambda: (
            seen[-1:]
            and {k: seen[-1][k] for k in ("state", "serving", "reason", "warm_pool", "models")}
        ),
    )
    for container in rig.containers():
        container.reload()
    after = {c.labels[SERVICE_LABEL]: c.attrs["State"]["StartedAt"] for c in rig.containers()}
    assert after == before
    back = await call(http, rig, "/switch", {"model": "alpha"})
    assert back["switch"]["path"] == "warm"


async def test_stop_leaves_no_model_container_running(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    rig = warm_rig
    rig.start_daemon()
    await call(http, rig, "/switch", {"model": "alpha"})
    await call(http, rig, "/switch", {"model": "beta"})
    assert rig.model_containers() == ["engine-alpha", "engine-beta"]
    answer = await call(http, rig, "/stop")
    assert rig.model_containers() == []
    assert set(residency(answer["status"]).values()) == {"stopped"}
    assert answer["status"]["warm_pool"]["asleep"] == []


async def test_post_sleep_and_a_request_wake_the_model(
    warm_rig: Rig, http: aiohttp.ClientSession
) -> None:
    """POST /sleep frees the GPU and wakes nothing; a /v1 request for the sleeper wakes it."""
    rig = warm_rig
    rig.start_daemon()
    await call(http, rig, "/switch", {"model": "alpha"})
    slept = await call(http, rig, "/sleep")
    assert slept["switch"]["kind"] == "sleep"
    assert residency(slept["status"])["alpha"] == "asleep"
    async with http.get(f"{rig.url}/health") as response:
        assert response.status == 503
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 3}
    async with http.post(f"{rig.url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
    answer = await status(http, rig)
    assert residency(answer)["alpha"] == "awake"
    assert answer["last_switch"]["path"] == "warm"


def test_the_dashboard_shows_the_sleeper(warm_rig: Rig, browser: webdriver.Chrome) -> None:
    rig = warm_rig
    rig.start_daemon()
    for model in ("alpha", "beta"):
        requests.post(f"{rig.url}/switch", json={"model": model}, timeout=120).raise_for_status()
    browser.get(rig.url + "/")
    wait = WebDriverWait(
        browser, 60, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    wait.until(lambda b: row_state(b, "alpha") == "asleep")
    assert row_state(browser, "beta") == "ready"
    wait.until(lambda b: "asleep: alpha" in b.find_element(By.ID, "warm-pool").text)
    wait.until(lambda b: "ok (cold)" in b.find_element(By.CSS_SELECTOR, "#history").text)
