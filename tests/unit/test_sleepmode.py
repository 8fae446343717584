"""The daemon's side of vLLM's sleep mode, against the stand-in engine as a process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator import sleepmode
from orchestrator.errors import SleepModeFailed
from tests.unit.test_standin import SLEEPY, Engines


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as opened:
        yield opened


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


async def test_level_1_sleeps_and_wakes(engines: Engines, session: aiohttp.ClientSession) -> None:
    engine = engines.start(*SLEEPY)
    where = url(engine.port)
    assert await sleepmode.is_sleeping(session, where) is False
    await sleepmode.sleep(session, where, 1, "m")
    assert engine.is_sleeping()
    await sleepmode.wake(session, where, 1, "m")
    assert not engine.is_sleeping()
    assert engine.generate()[0] == 200


async def test_level_2_wakes_through_the_reload_sequence(
    engines: Engines, session: aiohttp.ClientSession
) -> None:
    """Weights, reload_weights, KV cache: a generation after it is answered (the stand-in
    dies on one made with the weights still dropped)."""
    engine = engines.start(*SLEEPY)
    where = url(engine.port)
    await sleepmode.sleep(session, where, 2, "m")
    await sleepmode.wake(session, where, 2, "m")
    assert engine.generate()[0] == 200
    assert "Reloading weights" in engine.output()


async def test_warm_up_generates_once(engines: Engines, session: aiohttp.ClientSession) -> None:
    engine = engines.start()
    await sleepmode.warm_up(session, url(engine.port), str(engines.model), "m", 10)
    assert "POST /v1/completions" in engine.output()


async def test_an_engine_without_sleep_mode_is_refused_with_the_fix(
    engines: Engines, session: aiohttp.ClientSession
) -> None:
    engine = engines.start(env={"VLLM_SERVER_DEV_MODE": "0"})
    where = url(engine.port)
    with pytest.raises(SleepModeFailed, match="VLLM_SERVER_DEV_MODE=1"):
        await sleepmode.sleep(session, where, 1, "m")
    assert await sleepmode.is_sleeping(session, where) is None


async def test_a_wake_the_gpu_refuses_fails(
    engines: Engines, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    lock = {"STANDIN_GPU_LOCK": str(tmp_path / "gpu")}
    sleeper = engines.start(*SLEEPY, env=lock)
    await sleepmode.sleep(session, url(sleeper.port), 1, "m")
    engines.start(*SLEEPY, env=lock)  # takes the GPU its neighbour let go of
    with pytest.raises(SleepModeFailed, match="CUDA out of memory"):
        await sleepmode.wake(session, url(sleeper.port), 1, "m")
    assert sleeper.is_sleeping()


async def test_an_engine_that_is_not_there_is_a_failure_not_a_crash(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(SleepModeFailed, match="could not ask the engine to sleep"):
        await sleepmode.sleep(session, "http://127.0.0.1:9", 1, "m")
