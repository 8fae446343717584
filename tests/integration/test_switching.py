"""The daemon against a real Docker engine and the stand-in engine image."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import LOAD_DELAY
from tests.rig import Rig, held
from tests.waiting import eventually

pytestmark = pytest.mark.integration


async def switch(http: aiohttp.ClientSession, rig: Rig, model: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{rig.url}/switch", json={"model": model}) as response:
        return response.status, await response.json()


async def health(http: aiohttp.ClientSession, rig: Rig, **params: str) -> int:
    async with http.get(f"{rig.url}/health", params=params) as response:
        return response.status


async def status(http: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    async with http.get(f"{rig.url}/status") as response:
        return dict(await response.json())


class Watch:
    """Samples /health and the running model containers while a switch runs."""

    def __init__(self, http: aiohttp.ClientSession, rig: Rig) -> None:
        self.http, self.rig = http, rig
        self.health: list[int] = []
        self.most_models_up = 0
        self._stop = asyncio.Event()

    async def _health(self) -> None:
        while not self._stop.is_set():
            self.health.append(await health(self.http, self.rig))
            await asyncio.sleep(0.02)

    async def _docker(self) -> None:
        while not self._stop.is_set():
            up = await asyncio.to_thread(self.rig.model_containers)
            self.most_models_up = max(self.most_models_up, len(up))
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Watch:
        self._tasks = [asyncio.create_task(self._health()), asyncio.create_task(self._docker())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_rewrite_as_docker_sees_it(rig: Rig, http: aiohttp.ClientSession) -> None:
    """The engine runs with the repo id, the hub mount, offline mode and a readable name."""
    rig.start_daemon()
    code, body = await switch(http, rig, "alpha")
    assert code == 200, body
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == "engine-alpha"
    ]
    args = container.attrs["Config"]["Cmd"]
    assert args[args.index("--model") + 1] == "org/alpha"
    assert args[args.index("--served-model-name") + 1] == "alpha"
    assert "--max-model-len" in args
    assert "HF_HUB_OFFLINE=1" in container.attrs["Config"]["Env"]
    mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    assert mounts["/root/.cache/huggingface/hub"] == str(rig.root / "models" / "hub")
    assert "/root/.cache/huggingface" not in mounts
    upstream = body["status"]["upstream"]
    async with http.get(f"{upstream}/v1/models") as response:
        served = await response.json()
    assert [m["id"] for m in served["data"]] == ["alpha"]
    assert "/snapshots/" in served["data"][0]["root"]
    assert rig.compose_file.read_text().count("org--alpha") == 1  # the user's file is untouched


async def test_positional_snapshot_path_becomes_repo_id(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A positional snapshot path is normalized and the shared dependency starts with it."""
    rig.start_daemon()
    code, body = await switch(http, rig, "beta")
    assert code == 200, body
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == "engine-beta"
    ]
    assert container.attrs["Config"]["Cmd"][0] == "org/beta"
    assert "--model" not in container.attrs["Config"]["Cmd"]


async def test_switch_drops_health_and_never_runs_two(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A→B: /health is 503 during the swap, 200 after; never two model containers in a sample."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    async with Watch(http, rig) as watch:
        code, body = await switch(http, rig, "beta")
    assert code == 200, body
    assert watch.most_models_up == 1
    assert 503 in watch.health
    assert watch.health[-1] == 200 or await health(http, rig) == 200
    assert rig.model_containers() == ["engine-beta"]
    # Back to alpha: beta's shared dependency is left running (per-service stop, not down).
    async with Watch(http, rig) as watch:
        assert (await switch(http, rig, "alpha"))[0] == 200
    assert watch.most_models_up == 1
    services = {c.labels["com.docker.compose.service"] for c in rig.containers() if not held(c)}
    assert services == {"engine-alpha", "shared"}
    assert body["switch"]["duration"] >= LOAD_DELAY


async def test_cache_miss_refused_running_model_untouched(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A switch to an uncached repo is a 409 and the ready model keeps its container."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    before = [c.id for c in rig.containers()]
    code, body = await switch(http, rig, "nocache")
    assert code == 409
    assert body["error"]["repo"] == "org/not-downloaded"
    assert "models--org--not-downloaded" in body["error"]["message"]
    assert [c.id for c in rig.containers()] == before
    assert await health(http, rig) == 200


async def test_crash_is_502_and_rolled_back(rig: Rig, http: aiohttp.ClientSession) -> None:
    """An engine that exits answers 502 with its log and the previous model comes back."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    code, body = await switch(http, rig, "crashy")
    assert code == 502, body
    assert body["error"]["code"] == "model_exited"
    assert "CUDA out of memory" in body["error"]["log_tail"]
    assert body["error"]["rolled_back"] is True
    assert rig.model_containers() == ["engine-alpha"]
    assert await health(http, rig) == 200
    assert (await status(http, rig))["last_switch"]["outcome"] == "failed"


async def test_timeout_is_504_and_rolled_back(rig: Rig, http: aiohttp.ClientSession) -> None:
    """An engine that never turns healthy answers 504 after its timeout and is stopped."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    began = time.monotonic()
    code, body = await switch(http, rig, "hangy")
    assert code == 504, body
    assert time.monotonic() - began >= 3
    assert body["error"]["rolled_back"] is True
    assert rig.model_containers() == ["engine-alpha"]
    assert await health(http, rig, model="alpha") == 200


async def test_missing_image_is_reported_and_rolled_back(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A target whose image cannot be had fails with compose's words; the old model returns."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    code, body = await switch(http, rig, "noimage")
    assert code == 502, body
    assert body["error"]["code"] == "docker_error"
    assert "up --detach engine-noimage failed" in body["error"]["message"]
    assert body["error"]["rolled_back"] is True
    assert rig.model_containers() == ["engine-alpha"]
    assert await health(http, rig) == 200


async def test_concurrent_switches_are_serialized(rig: Rig, http: aiohttp.ClientSession) -> None:
    """Requests racing each other get their own answers; joins share a switch; never two up."""
    rig.start_daemon()
    async with Watch(http, rig) as watch:
        first_beta = asyncio.ensure_future(switch(http, rig, "beta"))

        async def beta_under_way() -> bool:
            return [op["model"] for op in (await status(http, rig))["queue"]] == ["beta"]

        await eventually(beta_under_way, within=10, interval=0.1)
        results = await asyncio.gather(
            first_beta, switch(http, rig, "beta"), switch(http, rig, "alpha")
        )
    codes = [code for code, _ in results]
    assert codes == [200, 200, 200], results
    first, second, third = (body["switch"] for _, body in results)
    assert first["id"] == second["id"], results
    assert third["to"] == "alpha" and third["from"] == "beta"
    assert watch.most_models_up == 1
    assert rig.model_containers() == ["engine-alpha"]


async def test_adopts_running_model_after_kill_9(rig: Rig, http: aiohttp.ClientSession) -> None:
    """A daemon killed with SIGKILL and started again adopts the healthy model without a restart."""
    first = rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == "engine-alpha"
    ]
    started_at = container.attrs["State"]["StartedAt"]
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    rig.start_daemon()
    assert await health(http, rig) == 200
    state = await status(http, rig)
    assert state["state"] == "ready" and state["active"] == "alpha"
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started_at


async def test_model_killed_behind_our_back_fails_health(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """docker kill on the ready engine turns /health 503 within seconds and /status says why."""
    rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == "engine-alpha"
    ]
    container.kill()

    async def unhealthy() -> bool:
        return await health(http, rig) == 503

    await eventually(unhealthy, within=5, interval=0.1)
    state = await status(http, rig)
    assert state["state"] == "failed"
    assert "died" in state["reason"]


async def test_sigterm_leaves_the_model_running(rig: Rig, http: aiohttp.ClientSession) -> None:
    """SIGTERM ends the daemon cleanly (exit 0) and the model keeps serving."""
    daemon = rig.start_daemon()
    assert (await switch(http, rig, "alpha"))[0] == 200
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert rig.model_containers() == ["engine-alpha"]


async def test_stop_frees_the_gpu(rig: Rig, http: aiohttp.ClientSession) -> None:
    """POST /stop removes the model's containers and leaves shared services alone."""
    rig.start_daemon()
    assert (await switch(http, rig, "beta"))[0] == 200
    async with http.post(f"{rig.url}/stop", json={}) as response:
        assert response.status == 200
    assert rig.model_containers() == []
    assert {c.labels["com.docker.compose.service"] for c in rig.containers()} == {"shared"}
    assert (await status(http, rig))["state"] == "idle"
