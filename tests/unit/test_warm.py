"""The switcher's warm path: models put to sleep and woken, against the recording fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.errors import Conflict, ModelExited, SleepModeFailed, StartTimeout
from orchestrator.history import Kind, Operation, SwitchRecord
from orchestrator.pool import PoolLimits, default_budget, to_evict
from orchestrator.queue import OperationQueue
from orchestrator.states import Residency, Sleeper, State, Status
from orchestrator.store import Store
from orchestrator.switcher import Switcher
from orchestrator.watcher import ModelDied
from tests.fakes import Behaviour, FakeRuntime, Recorder, make_snapshot, spec, switcher_over
from tests.waiting import eventually

# make_snapshot's files: a two-byte config.json and an empty weights file.
MODEL_BYTES = 2


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    hub = tmp_path / "hub"
    for name in ("a", "b", "c", "cold", "deep"):
        make_snapshot(hub, f"org/{name}")
    return hub


def build(
    runtime: FakeRuntime, store: Store, hub: Path, pool: PoolLimits | None = None
) -> Switcher:
    models = {m: spec(m, sleep=1) for m in ("a", "b", "c")}
    models["cold"] = spec("cold")
    models["deep"] = spec("deep", sleep=2, warmup=True)
    return switcher_over(runtime, store, hub, models, pool=pool or PoolLimits(max_asleep=2))


@asynccontextmanager
async def started(
    runtime: FakeRuntime, store: Store, hub: Path, pool: PoolLimits | None = None
) -> AsyncIterator[Switcher]:
    made = build(runtime, store, hub, pool)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def switcher(runtime: FakeRuntime, store: Store, hub: Path) -> AsyncIterator[Switcher]:
    async with started(runtime, store, hub) as made:
        yield made


async def switch(switcher: Switcher, model: str) -> SwitchRecord:
    op = await switcher.switch_to(model)
    return await op.future


def asleep(switcher: Switcher) -> list[str]:
    return [s.model for s in switcher.status.asleep]


class TestWarmSwaps:
    async def test_a_model_switched_away_from_sleeps_and_wakes_on_return(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A→B→A: A sleeps in its container, B starts, B sleeps, A wakes; never two awake."""
        first = await switch(switcher, "a")
        engine_a = switcher.status.engine_container
        to_b = await switch(switcher, "b")
        assert asleep(switcher) == ["a"]
        back = await switch(switcher, "a")
        assert runtime.calls == [
            ("start", "a"),
            ("sleep", "a"),
            ("start", "b"),
            ("sleep", "b"),
            ("wake", "a"),
        ]
        assert runtime.overlaps == []
        assert (first.path, to_b.path, back.path) == ("cold", "cold", "warm")
        assert back.timings is not None and {"sleep", "wake"} <= back.timings.keys()
        assert "up" not in back.timings
        status = switcher.status
        assert status.holds("a") and status.engine_container == engine_a
        assert asleep(switcher) == ["b"]
        assert [status.residency(m) for m in ("a", "b", "c")] == [
            Residency.AWAKE,
            Residency.ASLEEP,
            Residency.STOPPED,
        ]
        assert switcher.serving

    async def test_a_model_without_a_sleep_level_is_stopped(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "cold")
        await switch(switcher, "a")
        assert runtime.calls == [("start", "cold"), ("stop", "cold"), ("start", "a")]
        assert asleep(switcher) == []

    async def test_the_least_recently_used_sleeper_makes_room_first(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """With max_asleep 1, A (asleep) is stopped before B falls asleep."""
        async with started(runtime, store, hub, PoolLimits(max_asleep=1)) as made:
            for model in ("a", "b", "c"):
                await switch(made, model)
            assert runtime.calls.index(("stop", "a")) < runtime.calls.index(("sleep", "b"))
            assert asleep(made) == ["b"]
            assert runtime.overlaps == []

    async def test_the_ram_budget_evicts_by_estimated_weights(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        """Room for one model's files in the budget: the second sleeper pushes out the first."""
        pool = PoolLimits(max_asleep=5, ram_budget=MODEL_BYTES + 1)
        async with started(runtime, store, hub, pool) as made:
            for model in ("a", "b", "c"):
                await switch(made, model)
            assert asleep(made) == ["b"]
            assert made.status.asleep[0].ram_bytes == MODEL_BYTES
            assert ("stop", "a") in runtime.calls

    async def test_a_model_larger_than_the_budget_is_stopped_not_slept(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, PoolLimits(max_asleep=2, ram_budget=1)) as made:
            await switch(made, "a")
            await switch(made, "b")
            assert runtime.calls == [("start", "a"), ("stop", "a"), ("start", "b")]

    async def test_a_level_2_sleeper_takes_no_ram_and_warms_up_when_started(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, PoolLimits(max_asleep=2, ram_budget=1)) as made:
            record = await switch(made, "deep")
            assert runtime.calls == [("start", "deep"), ("warm_up", "deep")]
            assert record.timings is not None and "warmup" in record.timings
            await switch(made, "a")
            assert made.status.asleep == (made.status.asleep[0],)
            assert (made.status.asleep[0].model, made.status.asleep[0].ram_bytes) == ("deep", 0)


class TestWarmFailures:
    async def test_a_sleep_that_fails_stops_the_model(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        runtime.behaviours["a"] = Behaviour(sleep_fails=True)
        recorder = Recorder()
        switcher.connect(drain=None, observers=[recorder])
        await switch(switcher, "a")
        record = await switch(switcher, "b")
        assert record.outcome == "ok"
        assert runtime.calls == [("start", "a"), ("sleep", "a"), ("stop", "a"), ("start", "b")]
        assert asleep(switcher) == []
        assert runtime.overlaps == []
        assert "sleep_failed" in [event for event, _ in recorder.events]

    async def test_a_wake_that_fails_starts_the_model_cold(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        await switch(switcher, "b")
        runtime.behaviours["a"] = Behaviour(wake_fails=True)
        record = await switch(switcher, "a")
        assert runtime.calls[-4:] == [("sleep", "b"), ("wake", "a"), ("stop", "a"), ("start", "a")]
        assert record.outcome == "ok" and record.path == "cold"
        assert record.timings is not None and "failed_wake" in record.timings
        assert switcher.status.holds("a")
        assert asleep(switcher) == ["b"]

    async def test_a_failed_start_rolls_back_by_waking_the_previous_model(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        runtime.behaviours["b"] = Behaviour(hang=True)
        switcher.spec("b")  # known
        switcher.models["b"] = spec("b", sleep=1, timeout=0.2)
        with pytest.raises(StartTimeout) as failed:
            await switch(switcher, "b")
        assert failed.value.details["rolled_back"] is True
        assert runtime.calls[-3:] == [("start", "b"), ("stop", "b"), ("wake", "a")]
        assert switcher.status.holds("a") and asleep(switcher) == []

    async def test_a_start_that_fails_beside_sleepers_is_tried_again_without_them(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """vLLM exits at start when the sleepers leave too little GPU memory: they are
        stopped and the model starts on the second try; the switch succeeds."""
        await switch(switcher, "a")
        await switch(switcher, "b")
        runtime.behaviours["c"] = Behaviour(crowded_out=True)
        record = await switch(switcher, "c")
        assert record.outcome == "ok" and record.timings is not None
        assert "first_start" in record.timings
        after_first = runtime.calls[runtime.calls.index(("start", "c")) + 1 :]
        assert after_first == [("stop", "c"), ("stop", "a"), ("stop", "b"), ("start", "c")]
        assert switcher.status.holds("c") and asleep(switcher) == []

    async def test_a_start_that_fails_without_sleepers_too_rolls_back_cold(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        await switch(switcher, "b")
        runtime.behaviours["c"] = Behaviour(crash=True)
        with pytest.raises(ModelExited) as failed:
            await switch(switcher, "c")
        assert failed.value.details["rolled_back"] is True
        assert runtime.calls.count(("start", "c")) == 2
        assert runtime.calls[-1] == ("start", "b")  # its sleep was ended for the retry
        assert switcher.status.holds("b") and asleep(switcher) == []

    async def test_a_sleeper_that_dies_is_forgotten_and_recorded(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        await switch(switcher, "b")
        dead = runtime.kill("a")
        switcher.notify(ModelDied(dead.id, dead.service, 137))
        await eventually(lambda: asleep(switcher) == [], what="the dead sleeper forgotten")
        assert switcher.status.holds("b")
        records = await switcher.history.recent(1)
        assert (records[0].kind, records[0].from_model) == ("died", "a")

    async def test_stop_stops_the_sleepers_too(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        await switch(switcher, "b")
        op = await switcher.stop()
        await op.future
        assert {("stop", "a"), ("stop", "b")} <= set(runtime.calls)
        assert asleep(switcher) == []
        assert [c for c in await runtime.containers() if c.running] == []
        assert switcher.status.state is State.IDLE

    async def test_a_sleeper_whose_settings_changed_is_stopped_not_woken(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A wake would bring back the engine as it was started: the sleeper goes instead,
        and the next switch to it starts the new settings cold."""
        await switch(switcher, "a")
        await switch(switcher, "b")
        changed = dict(switcher.models)
        changed["a"] = replace(changed["a"], display_name="A, retuned")
        switcher.set_models(changed)
        await eventually(lambda: asleep(switcher) == [], what="the stale sleeper stopped")
        assert runtime.calls[-1] == ("stop", "a")
        record = await switch(switcher, "a")
        assert record.path == "cold" and ("wake", "a") not in runtime.calls


class TestSleepOperation:
    async def test_sleep_puts_the_awake_model_to_sleep_and_wakes_none(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "a")
        op = await switcher.sleep()
        record = await op.future
        assert (record.kind, record.outcome, record.from_model) == ("sleep", "ok", "a")
        assert switcher.status.state is State.IDLE and switcher.status.active is None
        assert asleep(switcher) == ["a"]
        assert not switcher.serving
        await switch(switcher, "a")
        assert runtime.calls[-1] == ("wake", "a")

    async def test_a_model_without_sleep_mode_refuses_to_sleep(
        self, switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        await switch(switcher, "cold")
        with pytest.raises(Conflict, match="POST /stop"):
            await switcher.sleep()
        assert switcher.status.holds("cold")

    async def test_a_sleep_with_no_room_stops_the_model_and_says_so(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, PoolLimits(max_asleep=0)) as made:
            await switch(made, "a")
            op = await made.sleep()
            with pytest.raises(SleepModeFailed, match="stopped instead"):
                await op.future
            assert [c for c in await runtime.containers() if c.running] == []

    async def test_a_sleeper_past_its_ttl_is_stopped(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        async with started(runtime, store, hub, PoolLimits(max_asleep=2, sleep_ttl=0.05)) as made:
            await switch(made, "a")
            await switch(made, "b")
            await eventually(lambda: asleep(made) == [], what="the sleeper stopped at its ttl")
            assert ("stop", "a") in runtime.calls
            assert made.status.holds("b")


class TestAdoption:
    async def test_a_restart_adopts_the_awake_model_and_the_sleepers(
        self, runtime: FakeRuntime, store: Store, hub: Path
    ) -> None:
        runtime.run_container("a")
        runtime.asleep.add("a")
        runtime.run_container("b")
        runtime.behaviours["b"] = Behaviour(probes_until_ready=0)
        async with started(runtime, store, hub) as made:
            assert made.status.holds("b")
            assert asleep(made) == ["a"]
            assert runtime.calls == []
            await switch(made, "a")
            assert runtime.calls == [("sleep", "b"), ("wake", "a")]


class TestPool:
    def sleeper(self, model: str, ram: int = 0) -> Sleeper:
        return Sleeper(model, f"cid-{model}", f"http://{model}", 1, ram_bytes=ram)

    def test_nothing_is_evicted_while_there_is_room(self) -> None:
        assert to_evict([self.sleeper("a")], 0, PoolLimits(max_asleep=2)) == []

    def test_the_oldest_goes_first(self) -> None:
        pool = [self.sleeper("a"), self.sleeper("b")]
        assert to_evict(pool, 0, PoolLimits(max_asleep=2)) == [pool[0]]

    def test_the_budget_counts_bytes(self) -> None:
        pool = [self.sleeper("a", 5), self.sleeper("b", 5)]
        limits = PoolLimits(max_asleep=9, ram_budget=12)
        assert to_evict(pool, 4, limits) == [pool[0]]
        assert to_evict(pool, 13, limits) is None
        assert to_evict(pool, 1, PoolLimits(max_asleep=0)) is None

    def test_the_default_budget_is_half_the_available_memory(self, tmp_path: Path) -> None:
        meminfo = tmp_path / "meminfo"
        meminfo.write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
        assert default_budget(None, meminfo) == 1024 * 1024
        assert default_budget(1.5, meminfo) == int(1.5 * 1024**3)
        assert default_budget(None, tmp_path / "none") is None

    async def test_a_stop_with_only_sleepers_still_changes_what_runs(self) -> None:
        queue = OperationQueue()
        queue.add(Operation(Kind.STOP, None))
        assert queue.will_change(Status(asleep=(self.sleeper("a"),)))
        assert not queue.will_change(Status())
