"""Staged starts and standbys on the real engine.

The stand-ins share a simulated GPU (a lock file on a folder they all mount): an engine let
through the start gate while another still held the GPU would fail to load, and its switch
with it. Containers whose main process is the gate's shell run no engine (``held``).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from orchestrator import gate
from tests.fakes import make_snapshot
from tests.rig import SERVICE_LABEL, STANDIN_IMAGE, Rig, engine_services, free_port, held
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
    # As vLLM, a while from SIGTERM to the exit: a switch stages its target meanwhile.
    STANDIN_EXIT_TIME: "0.5"
  volumes:
    - ./models:/root/.cache/huggingface
    - ./gpu:/gpu
  stop_grace_period: 5s

services:
"""
    + engine_services("alpha", "beta", "gamma")
    + """  # As many users write them: every model on the same fixed host port.
  engine-one:
    <<: *engine
    profiles: ["one"]
    ports: ["127.0.0.1:{port}:8000"]
    command: ["--model", "org/alpha"]
  engine-two:
    <<: *engine
    profiles: ["two"]
    ports: ["127.0.0.1:{port}:8000"]
    command: ["--model", "org/beta"]
"""
)
LOAD_DELAY = 1.0


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standby")
    for name in ("alpha", "beta", "gamma"):
        make_snapshot(root / "models" / "hub", f"org/{name}")
    (root / "gpu").mkdir()
    (root / "docker-compose.yml").write_text(
        COMPOSE.format(image=STANDIN_IMAGE, delay=LOAD_DELAY, port=free_port())
    )
    return root


async def switch(http: aiohttp.ClientSession, rig: Rig, model: str) -> dict[str, Any]:
    async with http.post(f"{rig.url}/switch", json={"model": model}) as response:
        answer = dict(await response.json())
        assert response.status == 200, answer
        return answer


async def status(http: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    async with http.get(f"{rig.url}/status") as response:
        return dict(await response.json())


async def standing_by(http: aiohttp.ClientSession, rig: Rig, *models: str) -> None:
    async def settled() -> bool:
        return bool((await status(http, rig))["standby"]["models"] == list(models))

    await eventually(settled, within=30, what=f"standing by: {models}")
    assert rig.held() == [f"engine-{m}" for m in models]


def container(rig: Rig, service: str) -> docker.models.containers.Container:
    (found,) = [c for c in rig.containers() if c.labels[SERVICE_LABEL] == service]
    found.reload()
    return found


class Engines:
    """Samples the running engines (not containers held at the gate) while switches run."""

    def __init__(self, rig: Rig) -> None:
        self.rig, self.most = rig, 0
        self._stop = asyncio.Event()

    async def _sample(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(await asyncio.to_thread(self.rig.model_containers)))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Engines:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await self._task


async def test_a_switch_back_lets_the_standby_through(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A→B leaves A started behind the gate, engine unrun; B→A starts no container: A's
    engine runs in the container that stood by, once B's has exited."""
    rig.start_daemon()
    await switch(http, rig, "alpha")
    await switch(http, rig, "beta")
    await standing_by(http, rig, "alpha")
    alpha = container(rig, "engine-alpha")
    assert gate.HELD_LINE in alpha.logs().decode()
    assert "Application startup complete" not in alpha.logs().decode()
    started_at = alpha.attrs["State"]["StartedAt"]
    back = await switch(http, rig, "alpha")
    assert "staged" in back["switch"]["timings"]
    again = container(rig, "engine-alpha")
    assert (again.id, again.attrs["State"]["StartedAt"]) == (alpha.id, started_at)
    assert not held(again)
    assert back["status"]["upstream"].endswith(
        again.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
    )
    async with http.post(
        f"{rig.url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3}
    ) as response:
        assert response.status == 200, await response.text()
    await standing_by(http, rig, "beta")


async def test_models_in_turn_never_share_the_gpu(rig: Rig, http: aiohttp.ClientSession) -> None:
    """Three models round and round with one standby. Once each engine has been seen to
    take its 0.5 s to exit, every switch finds its target standing by or stages it while
    the old engine exits; every one succeeds (a second GPU holder would fail its load)
    and no sample sees two engines."""
    rig.start_daemon()
    async with Engines(rig) as engines:
        for model in ("alpha", "beta", "gamma", "alpha"):
            await switch(http, rig, model)
        for model in ("beta", "gamma", "alpha", "gamma"):
            answer = await switch(http, rig, model)
            assert "staged" in answer["switch"]["timings"], answer["switch"]
    assert engines.most == 1
    assert rig.model_containers() == ["engine-gamma"]


async def test_stop_leaves_no_container_running(rig: Rig, http: aiohttp.ClientSession) -> None:
    rig.start_daemon()
    await switch(http, rig, "alpha")
    await switch(http, rig, "beta")
    await standing_by(http, rig, "alpha")
    async with http.post(f"{rig.url}/stop", json={}) as response:
        assert response.status == 200, await response.text()
    assert rig.containers() == []
    assert (await status(http, rig))["standby"]["models"] == []


async def test_a_daemon_killed_with_a_standby_leaves_it_to_the_next(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """kill -9: the next daemon stops the held container (its engine never ran) and adopts
    the model that serves, without restarting it."""
    rig.start_daemon()
    await switch(http, rig, "alpha")
    await switch(http, rig, "beta")
    await standing_by(http, rig, "alpha")
    beta = container(rig, "engine-beta")
    rig.stop_daemons(signal.SIGKILL)
    rig.start_daemon()

    async def adopted() -> bool:
        answer = await status(http, rig)
        return bool(answer["state"] == "ready" and answer["active"] == "beta")

    await eventually(adopted, within=30, what="beta adopted")
    await eventually(lambda: rig.held() == [], within=30, what="the held alpha stopped")
    assert (
        container(rig, "engine-beta").attrs["State"]["StartedAt"]
        == (beta.attrs["State"]["StartedAt"])
    )
    assert rig.model_containers() == ["engine-beta"]


async def test_models_sharing_a_fixed_port_switch_without_standing_by(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Two models on one fixed host port cannot both have a running container: neither is
    staged nor stands by, and their switches work as ungated ones do."""
    rig.start_daemon()
    for model in ("one", "two", "one"):
        answer = await switch(http, rig, model)
        assert "staged" not in answer["switch"]["timings"]
    assert (await status(http, rig))["standby"]["models"] == []
    assert rig.held() == []
    assert rig.model_containers() == ["engine-one"]
