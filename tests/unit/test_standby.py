"""Staged starts and standbys: containers started behind the start gate, against the fake.

The fake counts a held container as holding no GPU, and records an overlap whenever an
engine is let through or started while another engine is up: the lists must stay empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.compose import ModelSpec
from orchestrator.errors import Cancelled, ModelExited, StartTimeout
from orchestrator.history import SwitchRecord
from orchestrator.states import State
from orchestrator.store import Store
from orchestrator.switcher import Switcher
from tests.fakes import Behaviour, FakeRuntime, make_snapshot, spec, switcher_over
from tests.waiting import eventually

MODELS = ("a", "b", "c")


def gated_models() -> dict[str, ModelSpec]:
    models = {m: spec(m, gated=True) for m in MODELS}
    models["plain"] = spec("plain")
    models["sleepy"] = spec("sleepy", sleep=1, gated=True)
    return models


@asynccontextmanager
async def started(
    runtime: FakeRuntime, store: Store, hub: Path, standby: int = 1
) -> AsyncIterator[Switcher]:
    for model in (*MODELS, "plain", "sleepy"):
        make_snapshot(hub, f"org/{model}")
        # Engines seen to take their time to exit, as vLLM's do, unless the test says.
        runtime.exit_times.setdefault(model, 1.0)
    made = switcher_over(runtime, store, hub, gated_models(), standby=standby)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    return tmp_path / "hub"


async def switch(switcher: Switcher, model: str) -> SwitchRecord:
    return await (await switcher.switch_to(model)).future


async def standing_by(switcher: Switcher, runtime: FakeRuntime, *models: str) -> None:
    """Wait for the work behind the last switch: exactly these models held at the gate."""

    def settled() -> bool:
        return switcher._procedure.standbys.ids == set(models) and runtime.held_models == set(
            models
        )

    await eventually(settled, what=f"standing by: {models}")


async def a_then_b(switcher: Switcher, runtime: FakeRuntime) -> None:
    """Switch to a, then to b: a stands by."""
    await switch(switcher, "a")
    await switch(switcher, "b")
    await standing_by(switcher, runtime, "a")


class Busy:
    """A gateway with one request in flight on every model, done when the drain asks."""

    def in_flight(self, model_id: str) -> int:
        return 1

    async def drain(self, model_id: str) -> int:
        return 0


def running(runtime: FakeRuntime) -> list[str]:
    return sorted(c.service for c in runtime._containers.values() if c.running)


class TestStagedStart:
    async def test_a_gated_target_is_started_ahead_and_let_through_after_the_old_stop(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, standby=0) as switcher:
            await switch(switcher, "a")
            runtime.calls.clear()
            record = await switch(switcher, "b")
        assert record.outcome == "ok"
        # The stage and the old model's stop run side by side; the start comes after both.
        assert sorted(runtime.calls[:2]) == [("stage", "b"), ("stop", "a")]
        assert runtime.calls[2:] == [("start", "b")]
        assert "staged" in (record.timings or {})
        assert runtime.overlaps == []

    async def test_no_stage_during_the_switch_when_the_old_engine_leaves_at_once(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """Its last exit took 20 ms and nothing is in flight: docker's start of the target
        could not hide behind it, and the gate would only add its own steps."""
        runtime.exit_times["a"] = 0.02
        async with started(runtime, store, hub, standby=0) as switcher:
            await switch(switcher, "a")
            record = await switch(switcher, "b")
        assert ("stage", "b") not in runtime.calls
        assert "staged" not in (record.timings or {})

    async def test_no_stage_during_the_switch_before_the_old_engine_was_seen_to_exit(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, standby=0) as switcher:
            del runtime.exit_times["a"]
            await switch(switcher, "a")
            await switch(switcher, "b")
        assert ("stage", "b") not in runtime.calls

    async def test_requests_in_flight_make_it_worth_staging(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        runtime.exit_times["a"] = 0.02
        async with started(runtime, store, hub, standby=0) as switcher:
            switcher.connect(drain=Busy(), observers=())
            await switch(switcher, "a")
            record = await switch(switcher, "b")
        assert ("stage", "b") in runtime.calls
        assert "staged" in (record.timings or {})

    async def test_an_ungated_model_starts_as_before(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub) as switcher:
            await switch(switcher, "a")
            runtime.calls.clear()
            await switch(switcher, "plain")
            await standing_by(switcher, runtime, "a")
        assert ("stage", "plain") not in runtime.calls
        assert runtime.overlaps == []

    async def test_a_failed_start_of_a_staged_model_rolls_back_with_no_overlap(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        runtime.behaviours["b"] = Behaviour(crash=True)
        async with started(runtime, store, hub) as switcher:
            await switch(switcher, "a")
            with pytest.raises(ModelExited):
                await switch(switcher, "b")
            assert switcher.status.active == "a"
            assert running(runtime) == ["svc-a"]
        assert runtime.overlaps == []

    async def test_a_switch_that_ends_before_its_start_stops_the_staged_container(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, standby=0) as switcher:
            await switch(switcher, "a")
            op = await switcher.switch_to("b")
            op.cancelled = True  # as POST /stop marks a switch it calls off
            with pytest.raises(Cancelled):
                await op.future
            await eventually(lambda: "svc-b" not in running(runtime), what="b stopped")
            assert runtime.held_models == set()


class TestStandby:
    async def test_the_model_a_switch_left_stands_by_and_a_switch_back_uses_it(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub) as switcher:
            await a_then_b(switcher, runtime)
            held = runtime._containers["svc-a"].id
            runtime.calls.clear()
            record = await switch(switcher, "a")
            assert record.outcome == "ok"
            # No new container: the one standing by was let through.
            assert runtime._containers["svc-a"].id == held
            assert switcher.status.engine_container == held
            await standing_by(switcher, runtime, "b")
        assert runtime.calls[:2] == [("stop", "b"), ("start", "a")]
        assert runtime.overlaps == []

    async def test_standbys_past_the_limit_are_stopped_least_recently_left_first(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, standby=1) as switcher:
            for model in ("a", "b", "c"):
                await switch(switcher, model)
            await standing_by(switcher, runtime, "b")
            assert running(runtime) == ["svc-b", "svc-c"]
        assert runtime.overlaps == []

    async def test_two_standbys_serve_three_models_in_turn(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, standby=2) as switcher:
            for model in ("a", "b", "c"):
                await switch(switcher, model)
            await standing_by(switcher, runtime, "a", "b")
            runtime.calls.clear()
            await switch(switcher, "a")
            await standing_by(switcher, runtime, "b", "c")
        assert ("stage", "a") not in runtime.calls
        assert runtime.overlaps == []

    async def test_stop_leaves_no_standby(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub) as switcher:
            await a_then_b(switcher, runtime)
            record = await (await switcher.stop()).future
            assert record.outcome == "ok"
            assert running(runtime) == []
            assert runtime.held_models == set()
            assert switcher._procedure.standbys.ids == set()

    async def test_a_standby_whose_settings_changed_is_not_let_through(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub) as switcher:
            await a_then_b(switcher, runtime)
            held = runtime._containers["svc-a"].id
            models = gated_models()
            models["a"] = replace(models["a"], startup_timeout=7.0)
            switcher.set_models(models)
            await switch(switcher, "a")
            assert runtime._containers["svc-a"].id != held
        assert runtime.overlaps == []

    async def test_a_model_left_asleep_does_not_stand_by(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub) as switcher:
            await switch(switcher, "sleepy")
            await switch(switcher, "a")
            assert [s.model for s in switcher.status.asleep] == ["sleepy"]
            await switch(switcher, "b")
            await standing_by(switcher, runtime, "a")

    async def test_a_held_container_found_at_start_is_stopped(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """A daemon killed with a standby leaves it held; the next one stops it and adopts
        the model that runs."""
        async with started(runtime, store, hub) as switcher:
            await a_then_b(switcher, runtime)
        runtime.calls.clear()
        async with started(runtime, store, hub) as switcher:
            await eventually(lambda: switcher.status.state is State.READY, what="adopted")
            assert switcher.status.active == "b"
            assert running(runtime) == ["svc-b"]
        assert ("stop", "a") in runtime.calls
        assert ("start", "b") not in runtime.calls

    async def test_a_start_timeout_leaves_the_standby_for_the_rollback(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """A failed switch to c rolls back to b; a, left earlier, still stands by."""
        async with started(runtime, store, hub, standby=2) as switcher:
            await a_then_b(switcher, runtime)
            runtime.behaviours["c"] = Behaviour(hang=True)
            models = gated_models()
            models["c"] = replace(models["c"], startup_timeout=0.3)
            switcher.set_models(models)
            with pytest.raises(StartTimeout):
                await switch(switcher, "c")
            assert switcher.status.active == "b"
            assert "svc-a" in running(runtime)
        assert runtime.overlaps == []
