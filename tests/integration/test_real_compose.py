"""Compose projects written the way users write them, switched to on the real engine.

One project holds every pattern: a model changed by an override file, one in an included
file, one named through ``${VAR}`` from ``.env``, one whose cache lives under ``HF_HOME``,
a pinned snapshot, a ``bash -c`` entrypoint, one that crash-loops under ``restart:
unless-stopped`` and one that never turns healthy. After each switch the engine is asked
(past the daemon) which snapshot it loaded, and a request through ``/v1`` checks the name
it serves under.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from orchestrator import gate
from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig
from tests.waiting import eventually

pytestmark = pytest.mark.integration

MAIN = "1111111111111111111111111111111111111111"
PINNED = "2222222222222222222222222222222222222222"

BASE = """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment: {{STANDIN_LOAD_DELAY: "0.3"}}
  volumes: ["./models:/root/.cache/huggingface"]
  stop_grace_period: 3s

include:
  - models/included.yml

services:
  over:
    <<: *engine
    profiles: [over]
    command: ["--model", "org/wrong", "--max-model-len", "100"]

  envy:
    <<: *engine
    profiles: [envy]
    command: ["--model", "${{MODEL_PATH}}"]

  envmissing:
    <<: *engine
    profiles: [envmissing]
    command: ["--model", "${{MISSING_MODEL:-org/not-cached}}"]

  home:
    <<: *engine
    profiles: [home]
    environment: {{HF_HOME: /data/hf, STANDIN_LOAD_DELAY: "0.3"}}
    volumes: ["./elsewhere:/data/hf"]
    command: ["--model", "org/home"]

  pinned:
    <<: *engine
    profiles: [pinned]
    command: ["--model=/root/.cache/huggingface/hub/models--org--pinned/snapshots/{pinned}"]

  bashy:
    <<: *engine
    profiles: [bashy]
    entrypoint: ["/bin/bash", "-c"]
    command: ["vllm serve org/bashy --port 8000"]

  crashloop:
    <<: *engine
    profiles: [crashloop]
    restart: unless-stopped
    environment: {{STANDIN_CRASH: "1", STANDIN_LOAD_DELAY: "0.3"}}
    command: ["--model", "org/over"]

  hung:
    <<: *engine
    profiles: [hung]
    environment: {{STANDIN_HANG: "1"}}
    command: ["--model", "org/over"]

  # A sidecar that waits for the engine's health, and an engine that crashes.
  guarded:
    <<: *engine
    profiles: [guarded]
    environment: {{STANDIN_CRASH: "1", STANDIN_LOAD_DELAY: "0.3"}}
    command: ["--model", "org/over"]
    healthcheck:
      test: ["CMD", "python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')"]
      interval: 1s
      retries: 30
  guard-sidecar:
    image: {image}
    profiles: [guarded]
    entrypoint: ["python3", "-c", "import time; time.sleep(3600)"]
    depends_on: {{guarded: {{condition: service_healthy}}}}

  # An engine that waits for a set-up step of its profile, which fails.
  prepared:
    <<: *engine
    profiles: [prepared]
    command: ["--model", "org/over"]
    depends_on: {{prepare: {{condition: service_completed_successfully}}}}
  prepare:
    image: {image}
    profiles: [prepared]
    entrypoint: ["python3", "-c", "print('fetching the chat template: 404'); raise SystemExit(3)"]
"""

OVERRIDE = """
services:
  over:
    command: ["--model", "org/over", "--max-model-len", "2048"]
"""

INCLUDED = """
services:
  inc:
    image: {image}
    profiles: [inc]
    ports: ["127.0.0.1::8000"]
    environment: {{STANDIN_LOAD_DELAY: "0.3"}}
    command: ["--model", "org/inc"]
"""


@pytest.fixture
def project(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Rig]:
    root = tmp_path / "llm"
    (root / "models").mkdir(parents=True)
    (root / "docker-compose.yml").write_text(BASE.format(image=STANDIN_IMAGE, pinned=PINNED))
    (root / "docker-compose.override.yml").write_text(OVERRIDE)
    (root / "models" / "included.yml").write_text(INCLUDED.format(image=STANDIN_IMAGE))
    (root / ".env").write_text("MODEL_PATH=org/envy\n")
    hub = root / "models" / "hub"
    for repo in ("org/over", "org/inc", "org/envy", "org/home", "org/bashy"):
        make_snapshot(hub, repo, revision=MAIN)
    make_snapshot(hub, "org/pinned", revision=PINNED)
    make_snapshot(hub, "org/pinned", revision=MAIN)  # refs/main: the other snapshot
    rig = Rig(root=root, project=f"mo-real-{uuid.uuid4().hex[:8]}", docker=docker_client)
    rig.shared_services = ()
    try:
        yield rig
    finally:
        rig.clean()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def loaded_snapshot(http: aiohttp.ClientSession, rig: Rig, model: str) -> str:
    """What the engine itself says it loaded, asked past the daemon."""
    _, status = await call(http, "GET", f"{rig.url}/status")
    upstream = next(m["upstream"] for m in status["models"] if m["id"] == model)
    _, listing = await call(http, "GET", f"{upstream}/v1/models")
    return str(listing["data"][0]["root"])


async def served_as(http: aiohttp.ClientSession, rig: Rig, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    code, answer = await call(http, "POST", f"{rig.url}/v1/chat/completions", json=body)
    assert code == 200, answer
    return str(answer["model"])


def engine_command(rig: Rig, service: str) -> list[str]:
    """What the engine runs: its container's entrypoint and command, past the start gate."""
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == service
    ]
    argv = [
        *(container.attrs["Config"]["Entrypoint"] or []),
        *(container.attrs["Config"]["Cmd"] or []),
    ]
    behind_gate = [gate.SHELL, "-c", gate.SCRIPT, gate.SCRIPT_NAME]
    assert argv[: len(behind_gate)] == behind_gate
    return argv[len(behind_gate) :]


@pytest.mark.parametrize(
    ("model", "snapshot_in_container"),
    [
        ("over", f"/root/.cache/huggingface/hub/models--org--over/snapshots/{MAIN}"),
        ("inc", f"/root/.cache/huggingface/hub/models--org--inc/snapshots/{MAIN}"),
        ("envy", f"/root/.cache/huggingface/hub/models--org--envy/snapshots/{MAIN}"),
        ("home", f"/data/hf/hub/models--org--home/snapshots/{MAIN}"),
        ("pinned", f"/root/.cache/huggingface/hub/models--org--pinned/snapshots/{PINNED}"),
        ("bashy", f"/root/.cache/huggingface/hub/models--org--bashy/snapshots/{MAIN}"),
    ],
)
async def test_each_pattern_loads_the_right_snapshot_under_its_name(
    project: Rig, http: aiohttp.ClientSession, model: str, snapshot_in_container: str
) -> None:
    """Override, include, .env, HF_HOME, a pin and bash -c: the engine loads what the user's
    project says (after compose resolved it) and serves it under the model's id."""
    project.start_daemon()
    code, body = await call(http, "POST", f"{project.url}/switch", json={"model": model})
    assert code == 200, body
    assert await loaded_snapshot(http, project, model) == snapshot_in_container
    assert await served_as(http, project, model) == model
    command = engine_command(project, model)
    if model == "over":
        assert command[command.index("--max-model-len") + 1] == "2048"  # the override's
    if model == "pinned":
        assert command[-4:] == ["--revision", PINNED, "--served-model-name", "pinned"]
    if model == "bashy":
        assert command[:2] == ["/bin/bash", "-c"]
        assert command[2] == "vllm serve org/bashy --served-model-name bashy --port 8000"


async def test_a_model_named_through_a_variable_is_checked_before_anything_stops(
    project: Rig, http: aiohttp.ClientSession
) -> None:
    """${MISSING_MODEL:-org/not-cached} resolves to a repo not in the cache: 409, and the
    running model is untouched."""
    project.start_daemon()
    assert (await call(http, "POST", f"{project.url}/switch", json={"model": "inc"}))[0] == 200
    started = {c.id for c in project.containers()}
    code, body = await call(http, "POST", f"{project.url}/switch", json={"model": "envmissing"})
    assert code == 409, body
    assert body["error"]["repo"] == "org/not-cached"
    assert {c.id for c in project.containers()} == started
    _, health = await call(http, "GET", f"{project.url}/health")
    assert health["status"] == "pass"


async def test_a_crash_loop_is_a_502_within_seconds_and_leaves_no_container(
    project: Rig, http: aiohttp.ClientSession
) -> None:
    """restart: unless-stopped is the daemon's to own: the first exit fails the switch."""
    project.start_daemon()
    began = time.monotonic()
    code, body = await call(http, "POST", f"{project.url}/switch", json={"model": "crashloop"})
    assert code == 502, body
    assert time.monotonic() - began < 30
    assert "CUDA out of memory" in body["error"]["log_tail"]
    assert project.ever_started() == []


async def test_stop_during_a_hung_start_answers_at_once(
    project: Rig, http: aiohttp.ClientSession
) -> None:
    """POST /stop calls off a start that would wait out its timeout: the switch gets 409
    cancelled, the stop 200 within seconds, and no container is left running."""
    project.start_daemon()
    switching = asyncio.create_task(
        call(http, "POST", f"{project.url}/switch", json={"model": "hung"})
    )

    async def starting() -> bool:
        _, status = await call(http, "GET", f"{project.url}/status")
        return bool(status["state"] == "starting" and status["target"] == "hung")

    await eventually(starting, within=30, interval=0.1, what="the switch reaching starting")
    began = time.monotonic()
    code, body = await call(http, "POST", f"{project.url}/stop", json={})
    assert code == 200, body
    assert time.monotonic() - began < 10
    switch_code, switch_body = await switching
    assert switch_code == 409, switch_body
    assert switch_body["error"]["code"] == "cancelled"
    assert project.model_containers() == []


async def test_sigterm_during_a_start_leaves_what_the_next_daemon_adopts(
    project: Rig, http: aiohttp.ClientSession
) -> None:
    """The daemon stopped mid-start leaves the starting model; the next one waits for it
    and serves it, with no second container."""
    project.start_daemon()
    switching = asyncio.create_task(
        call(http, "POST", f"{project.url}/switch", json={"model": "inc", "wait": False})
    )
    assert (await switching)[0] == 202

    def engine_up() -> bool:
        return project.model_containers() == ["inc"]

    await eventually(engine_up, within=30, interval=0.05)
    project.stop_daemons()
    project.start_daemon()
    status: dict[str, Any] = {}

    async def ready() -> bool:
        _, answer = await call(http, "GET", f"{project.url}/status")
        status.update(answer)
        return bool(answer["state"] == "ready")

    await eventually(ready, within=60, interval=0.1)
    assert status["active"] == "inc"
    made = project.containers(running_only=False)
    assert len([c for c in made if c.labels["com.docker.compose.service"] == "inc"]) == 1


@pytest.mark.parametrize(
    ("model", "service", "words"),
    [
        ("guarded", "guarded", "CUDA out of memory"),
        ("prepared", "prepare", "fetching the chat template: 404"),
    ],
)
async def test_a_failed_dependency_is_named_with_its_own_log(
    project: Rig, http: aiohttp.ClientSession, model: str, service: str, words: str
) -> None:
    """When compose's up fails on a container of the model (the engine a sidecar waits for,
    or a step the engine waits for), the 502 names that container and carries its log."""
    project.start_daemon()
    code, body = await call(http, "POST", f"{project.url}/switch", json={"model": model})
    assert code == 502, body
    assert body["error"]["code"] == "model_exited"
    assert body["error"]["service"] == service
    assert words in body["error"]["log_tail"]
    assert project.model_containers() == []
