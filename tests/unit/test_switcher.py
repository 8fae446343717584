"""The switcher's policy against a fake boundary that records every effect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.errors import ModelExited, ModelNotCached, ModelNotFound, StartTimeout
from orchestrator.history import SwitchRecord
from orchestrator.runtime import ModelRuntime
from orchestrator.states import IllegalTransition, State, Status
from orchestrator.store import Store
from orchestrator.switcher import DESIRED_MODEL_KEY, Switcher
from orchestrator.watcher import ModelDied
from tests.fakes import Behaviour, FakeRuntime, Recorder, make_snapshot, spec, switcher_over
from tests.waiting import eventually


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    hub = tmp_path / "hub"
    for name in ("a", "b", "c"):
        make_snapshot(hub, f"org/{name}")
    return hub


def build(
    runtime: ModelRuntime,
    store: Store,
    hub: Path,
    *,
    timeout: float = 5.0,
    rollback: bool = True,
) -> Switcher:
    models = {m: spec(m, timeout=timeout) for m in ("a", "b", "c")}
    models["nocache"] = spec("nocache", repo="org/not-downloaded")
    return switcher_over(runtime, store, hub, models, rollback=rollback)


@pytest.fixture
async def switcher(runtime: FakeRuntime, store: Store, hub: Path) -> AsyncIterator[Switcher]:
    made = build(runtime, store, hub)
    await made.start()
    yield made
    await made.close()


async def until_ready(switcher: Switcher) -> None:
    await eventually(lambda: switcher.status.state is State.READY, what="ready")


async def switch(switcher: Switcher, model: str) -> SwitchRecord:
    op = await switcher.switch_to(model)
    return await op.future


class TestSwitching:
    async def test_switch_from_idle_makes_model_ready(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A first switch starts the model and ends ready with its upstream known."""
        record = await switch(switcher, "a")
        assert switcher.status.state is State.READY
        assert switcher.status.active == "a"
        assert switcher.status.upstream == "http://fake/a"
        assert switcher.serving
        assert runtime.calls == [("start", "a")]
        assert record.outcome == "ok"

    async def test_switch_stops_previous_before_starting_next(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A→B stops A first; B never starts while A is up."""
        await switch(switcher, "a")
        recorder = Recorder()
        switcher.connect(drain=None, observers=[recorder])
        await switch(switcher, "b")
        seen = [(status.state, status.active) for status in recorder.statuses]
        assert runtime.calls == [("start", "a"), ("stop", "a"), ("start", "b")]
        assert runtime.overlaps == []
        assert [state for state, _ in seen] == [
            State.STOPPING,
            State.IDLE,
            State.STARTING,
            State.READY,
        ]
        assert switcher.status.active == "b"

    async def test_switch_to_ready_model_is_immediate(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """Asking for the model that is already ready answers at once and touches nothing."""
        await switch(switcher, "a")
        op = await switcher.switch_to("a")
        assert op.future.done()
        assert op.future.result().outcome == "noop"
        assert runtime.calls == [("start", "a")]

    async def test_stop_frees_the_gpu(self, switcher: Switcher, runtime: FakeRuntime) -> None:
        """POST /stop's operation stops the model and leaves the switcher idle."""
        await switch(switcher, "a")
        await (await switcher.stop()).future
        assert switcher.status.state is State.IDLE
        assert switcher.status.active is None
        assert runtime.calls[-1] == ("stop", "a")
        assert not switcher.serving


class TestRefusals:
    async def test_unknown_model_is_not_found(self, switcher: Switcher) -> None:
        """An unknown id is refused with the list of known ones."""
        with pytest.raises(ModelNotFound, match="known models: a, b, c"):
            await switcher.switch_to("zzz")

    async def test_missing_cache_refused_and_running_model_untouched(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A model whose snapshot is not cached is refused before anything is stopped."""
        await switch(switcher, "a")
        with pytest.raises(ModelNotCached) as caught:
            await switcher.switch_to("nocache")
        assert caught.value.details["repo"] == "org/not-downloaded"
        assert runtime.calls == [("start", "a")]
        assert switcher.status.active == "a" and switcher.serving

    async def test_incomplete_cache_is_refused_like_a_missing_one(
        self, switcher: Switcher, runtime: FakeRuntime, hub: Path
    ) -> None:
        """A cached snapshot without its weights is refused before anything is stopped."""
        await switch(switcher, "a")
        (hub / "models--org--b" / "snapshots" / "abc123" / "model.safetensors").unlink()
        with pytest.raises(ModelNotCached, match="org/b is incomplete in the cache"):
            await switcher.switch_to("b")
        assert runtime.calls == [("start", "a")]
        assert switcher.status.active == "a" and switcher.serving


class TestFailures:
    async def test_crash_rolls_back_to_previous(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A target that exits is stopped, its log tail returned, the previous model restored."""
        await switch(switcher, "a")
        runtime.behaviours["b"] = Behaviour(crash=True)
        with pytest.raises(ModelExited) as caught:
            await switch(switcher, "b")
        assert caught.value.details["rolled_back"] is True
        assert "CUDA out of memory" in caught.value.details["log_tail"]
        assert runtime.calls == [
            ("start", "a"),
            ("stop", "a"),
            ("start", "b"),
            ("stop", "b"),
            ("start", "a"),
        ]
        assert runtime.overlaps == []
        assert switcher.status.state is State.READY and switcher.status.active == "a"
        assert switcher.history.last is not None and switcher.history.last.outcome == "failed"

    async def test_timeout_rolls_back(self, runtime: FakeRuntime, store: Store, hub: Path) -> None:
        """A target that never turns healthy times out, is stopped, and the previous comes back."""
        made = build(runtime, store, hub, timeout=0.3)
        await made.start()
        try:
            await switch(made, "a")
            runtime.behaviours["b"] = Behaviour(hang=True)
            with pytest.raises(StartTimeout) as caught:
                await switch(made, "b")
            assert caught.value.details["rolled_back"] is True
            assert made.status.active == "a"
            assert ("stop", "b") in runtime.calls
        finally:
            await made.close()

    async def test_failure_without_rollback_leaves_failed(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """With rollback off, a failed start ends in the failed state with nothing running."""
        made = build(runtime, store, hub, rollback=False)
        await made.start()
        try:
            await switch(made, "a")
            runtime.behaviours["b"] = Behaviour(crash=True)
            with pytest.raises(ModelExited):
                await switch(made, "b")
            assert made.status.state is State.FAILED
            assert made.status.active is None
            assert [c for c in await runtime.containers() if c.running] == []
        finally:
            await made.close()

    async def test_model_dying_behind_our_back_fails_health(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A death report for the ready engine turns the switcher failed and not serving."""
        await switch(switcher, "a")
        dead = runtime.kill("a")
        switcher.notify(ModelDied(dead.id, dead.service, 137))
        await eventually(lambda: switcher.status.state is State.FAILED, what="failed")
        assert "exit code 137" in (switcher.status.reason or "")
        assert not switcher.serving

    async def test_a_death_is_recorded_with_its_log_and_the_container_removed(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """The dead engine's log tail is kept in the switch history, then its container is
        stopped and removed, so exited engines do not pile up."""
        await switch(switcher, "a")
        dead = runtime.kill("a")
        switcher.notify(ModelDied(dead.id, dead.service, 137))
        await eventually(lambda: runtime.calls[-1] == ("stop", "a"), what="what is left stopped")
        (record, *_) = await switcher.history.recent(1)
        assert (record.kind, record.from_model, record.to_model) == ("died", "a", None)
        assert record.outcome == "failed"
        assert record.error is not None
        assert record.error["code"] == "model_exited"
        assert record.error["exit_code"] == 137
        assert record.error["log_tail"] == f"last lines of {dead.id}\nCUDA out of memory\n"
        assert runtime.removed == [dead.id]

    async def test_stale_death_report_is_ignored(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A die report for a replaced container is ignored; the next, for the engine, counts."""
        await switch(switcher, "a")
        old = switcher.status.engine_container
        assert old is not None
        await switch(switcher, "b")
        recorder = Recorder()
        switcher.connect(drain=None, observers=[recorder])
        switcher.notify(ModelDied(old, "svc-a", 0))
        dead = runtime.kill("b")
        switcher.notify(ModelDied(dead.id, dead.service, 137))
        # Reports are handled in order: by the time the second has failed the switcher,
        # the first has been looked at.
        await eventually(lambda: switcher.status.state is State.FAILED, what="failed")
        deaths = [data for event, data in recorder.events if event == "model_died"]
        assert deaths == [{"model": "b", "exit_code": 137}]

    async def test_hung_engine_turns_unhealthy_then_recovers(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """Three failed probes in a row take the ready model out of service; a pass restores it."""
        await switch(switcher, "a")
        runtime.behaviours["a"] = Behaviour(hang=True)
        await eventually(lambda: not switcher.serving, what="out of service")
        assert switcher.status.state is State.READY
        assert "stopped answering" in (switcher.status.reason or "")
        runtime.behaviours["a"] = Behaviour(probes_until_ready=0)
        await eventually(lambda: switcher.serving, what="back in service")

    async def test_prober_catches_a_death_without_events(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """With no event stream at all, the probe loop still notices the engine is gone."""
        await switch(switcher, "a")
        runtime.kill("a")
        await eventually(lambda: switcher.status.state is State.FAILED, what="failed")
        assert "died behind the daemon's back" in (switcher.status.reason or "")


class TestAhead:
    async def test_every_runnable_model_is_prepared_at_start(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """At start, containers are made ahead for each model that can run."""
        assert runtime.ahead == ["a", "b", "c", "nocache"]

    async def test_changed_models_are_prepared_and_removed_ones_dropped(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        models = dict(switcher.models)
        removed = models.pop("c")
        models["a"] = spec("a", timeout=9.0)
        models["d"] = spec("d")
        runtime.ahead.clear()
        switcher.set_models(models, disabled=frozenset({"d"}))
        assert runtime.ahead == ["a"]  # d is disabled; b and nocache did not change
        assert runtime.discarded == [removed.id]


class TestConcurrency:
    async def test_requests_for_the_starting_model_join_it(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """Three requests for one model share one start and one answer."""
        runtime.gate = asyncio.Event()
        ops = [await switcher.switch_to("a") for _ in range(3)]
        assert len({op.id for op in ops}) == 1
        runtime.gate.set()
        await ops[0].future
        assert runtime.calls == [("start", "a")]

    async def test_requests_queue_in_order_and_each_gets_its_answer(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """a, b, c requested together run one after another; never two models up."""
        ops = [await switcher.switch_to(m) for m in ("a", "b", "c")]
        results = await asyncio.gather(*(op.future for op in ops))
        assert [r.to_model for r in results] == ["a", "b", "c"]
        assert [c for c in runtime.calls if c[0] == "start"] == [
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        assert runtime.overlaps == []
        assert switcher.status.active == "c"

    async def test_health_fails_as_soon_as_a_switch_is_accepted(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A queued switch to another model takes the host out of rotation at once."""
        await switch(switcher, "a")
        runtime.gate = asyncio.Event()
        op = await switcher.switch_to("b")
        assert not switcher.serving
        runtime.gate.set()
        await op.future
        assert switcher.serving


class TestReconcile:
    async def test_running_healthy_model_is_adopted(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """A model found running and healthy at start is ready without being restarted."""
        runtime.run_container("b")
        runtime.behaviours["b"] = Behaviour(probes_until_ready=0)
        made = build(runtime, store, hub)
        await made.start()
        try:
            assert made.status.state is State.READY and made.status.active == "b"
            assert runtime.calls == []
        finally:
            await made.close()

    async def test_two_running_models_are_cut_to_the_desired_one(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """Finding two models up, the daemon keeps the one last asked for and stops the other."""
        runtime.run_container("a")
        runtime.run_container("b")
        await store.set_value(DESIRED_MODEL_KEY, "b")
        made = build(runtime, store, hub)
        await made.start()
        try:
            await until_ready(made)
            assert made.status.active == "b"
            assert ("stop", "a") in runtime.calls
            assert [c.service for c in await runtime.containers() if c.running] == ["svc-b"]

            async def only_b_left() -> bool:
                return [c.service for c in await runtime.containers()] == ["svc-b"]

            await eventually(only_b_left, what="svc-a removed once the switch settled")
        finally:
            await made.close()

    async def test_last_requested_model_is_restored(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """With nothing running, the model last asked for is started again."""
        await store.set_value(DESIRED_MODEL_KEY, "c")
        made = build(runtime, store, hub)
        await made.start()
        try:
            await until_ready(made)
            assert made.status.active == "c"
        finally:
            await made.close()

    async def test_preload_wins_over_the_last_requested_model(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """A configured preload model is loaded at start when nothing runs."""
        await store.set_value(DESIRED_MODEL_KEY, "c")
        made = build(runtime, store, hub)
        made.preload = "b"
        await made.start()
        try:
            await until_ready(made)
            assert made.status.active == "b"
            assert runtime.calls == [("start", "b")]
        finally:
            await made.close()


class TestStateMachine:
    def test_illegal_transition_raises(self, runtime: FakeRuntime, store: Store, hub: Path) -> None:
        """Ready cannot jump straight to starting: a switch must stop first."""
        made = build(runtime, store, hub)
        made.status = Status(state=State.READY, active="a")
        with pytest.raises(IllegalTransition):
            made._enter(State.STARTING)
