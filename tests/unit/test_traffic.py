"""Admission and grouping of gateway requests, against the fake Docker boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.errors import ModelExited, TooBusy
from orchestrator.states import State
from orchestrator.switcher import Switcher
from orchestrator.traffic import Traffic, Waiter, choose_next
from tests.fakes import Behaviour, FakeRuntime, running_switcher, spec
from tests.waiting import eventually


class TestChooseNext:
    def test_nothing_waiting_for_another_model(self) -> None:
        """Requests only for the loaded model never cause a swap."""
        assert choose_next("a", [("a", 1.0)], now=2.0, patience=60) is None

    def test_loaded_model_is_served_first(self) -> None:
        """While the loaded model has requests waiting, it keeps the GPU."""
        assert choose_next("a", [("b", 1.0), ("a", 2.0)], now=3.0, patience=60) is None

    def test_then_first_arrival(self) -> None:
        """Other models go in the order of their first waiting request."""
        waiting = [("c", 1.0), ("b", 2.0), ("c", 3.0)]
        assert choose_next("a", waiting, now=4.0, patience=60) == "c"
        assert choose_next(None, [("b", 1.0), ("c", 2.0)], now=4.0, patience=60) == "b"

    def test_a_busy_model_does_not_starve_the_others(self) -> None:
        """Past the patience bound, the oldest other request wins over the loaded model."""
        assert choose_next("a", [("b", 1.0), ("a", 2.0)], now=100.0, patience=60) == "b"


@pytest.fixture
async def switcher(tmp_path: Path, runtime: FakeRuntime) -> AsyncIterator[Switcher]:
    async with running_switcher(
        tmp_path,
        runtime,
        {
            "a": replace(spec("a"), max_concurrency=1),
            "b": spec("b"),
            "c": replace(spec("c"), ttl=0.3),
            "d": replace(spec("d", sleep=1), ttl=0.3),
        },
    ) as made:
        yield made


@pytest.fixture
async def traffic(switcher: Switcher) -> AsyncIterator[Traffic]:
    made = Traffic(switcher, max_queue=2, drain_timeout=5.0)
    switcher.connect(drain=made, observers=[made])
    made.start()
    yield made
    await made.close()


async def hold(traffic: Traffic, model: str, release: asyncio.Event, log: list[str]) -> None:
    async with traffic.lease(model):
        log.append(f"start {model}")
        await release.wait()
        log.append(f"end {model}")


async def started(log: list[str], model: str) -> None:
    """Until the first request for ``model`` holds its lease."""
    await eventually(lambda: log == [f"start {model}"], what=f"a lease for {model}")


def waiting_for(traffic: Traffic, model: str) -> int:
    return sum(1 for waiter in traffic.waiting if waiter.model == model)


async def test_request_for_an_unloaded_model_switches_to_it(
    traffic: Traffic, switcher: Switcher
) -> None:
    """A lease for a model that is not loaded waits for the switch, then has its upstream."""
    async with traffic.lease("b") as upstream:
        assert upstream == "http://fake/b"
        assert switcher.status.active == "b"
    assert traffic.inflight["b"] == 0


async def test_switch_drains_requests_in_flight_first(
    traffic: Traffic, switcher: Switcher, runtime: FakeRuntime
) -> None:
    """A switch waits for the old model's request; a new one for it queues behind."""
    log: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(traffic, "b", release, log))
    await started(log, "b")
    switching = (await switcher.switch_to("c")).future
    late = asyncio.create_task(hold(traffic, "b", asyncio.Event(), log))
    await eventually(lambda: waiting_for(traffic, "b") == 1, what="the late request waiting")
    await asyncio.sleep(0.2)  # the drain must still be waiting for the first request
    assert ("stop", "b") not in runtime.calls
    assert log == ["start b"]  # the late request waits behind the switch
    assert not switcher.serving
    release.set()
    await first
    record = await switching
    assert runtime.calls.index(("stop", "b")) > 0
    assert log[:2] == ["start b", "end b"]
    assert record.timings is not None and record.timings["drain"] >= 0.15
    late.cancel()


async def test_request_waiting_while_a_switch_finishes_is_served(
    traffic: Traffic, switcher: Switcher, runtime: FakeRuntime
) -> None:
    """A request during a switch's clean-up gets its swap asked for at once, then is served."""
    # The switch answers before docker's clean-up of stopped containers ends; requests
    # coming and going in that window used to find the switcher busy and wait forever.
    runtime.settle_gate = asyncio.Event()
    log: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(traffic, "b", release, log))
    await started(log, "b")
    assert switcher.queued(), "the switch to b is still tidying up"
    other = asyncio.create_task(hold(traffic, "c", asyncio.Event(), log))
    await eventually(lambda: len(switcher.queued()) == 2, what="the switch to c queued")
    release.set()
    await first
    assert [op.model for op in switcher.queued()] == ["b", "c"]  # b still tidying up
    runtime.settle_gate.set()
    await eventually(lambda: "start c" in log, what="a lease for c")
    assert log == ["start b", "end b", "start c"]
    assert switcher.status.active == "c"
    other.cancel()


async def test_drain_is_bounded(switcher: Switcher, runtime: FakeRuntime) -> None:
    """A request that outlasts the drain timeout does not hold the switch forever."""
    traffic = Traffic(switcher, drain_timeout=0.2)
    switcher.connect(drain=traffic, observers=[traffic])
    release = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(hold(traffic, "b", release, log))
    await started(log, "b")
    record = await (await switcher.switch_to("a")).future
    assert record.timings is not None and record.timings["cut_off"] == 1
    assert switcher.status.active == "a"
    release.set()
    await holder


async def test_waiting_requests_are_grouped(traffic: Traffic, switcher: Switcher) -> None:
    """Requests for A, B, A, B waiting together cost two swaps, not four."""
    order: list[str] = []

    async def one(model: str) -> None:
        async with traffic.lease(model):
            order.append(model)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(one(m) for m in ["b", "c", "b", "c"]))
    assert sorted(order[:2]) == ["b", "b"]
    assert traffic.swaps_requested == 2


async def test_concurrency_limit_and_queue_bound(traffic: Traffic, switcher: Switcher) -> None:
    """Past max_concurrency requests wait; past the queue bound they get 429."""
    release = asyncio.Event()
    log: list[str] = []
    running = asyncio.create_task(hold(traffic, "a", release, log))
    await started(log, "a")
    queued = [asyncio.create_task(hold(traffic, "a", release, log)) for _ in range(2)]
    await eventually(lambda: waiting_for(traffic, "a") == 2, what="two requests queued")
    assert traffic.inflight["a"] == 1  # max_concurrency 1
    with pytest.raises(TooBusy) as refused:
        async with traffic.lease("a"):
            pass
    assert refused.value.headers() == {"Retry-After": "1"}
    release.set()
    await asyncio.gather(running, *queued)
    assert log.count("end a") == 3


async def test_idle_model_is_unloaded_after_its_ttl(traffic: Traffic, switcher: Switcher) -> None:
    """A model with a ttl is stopped once it has had no requests for that long."""
    async with traffic.lease("c"):
        await asyncio.sleep(0.5)  # in flight: counts as activity, however long
        assert switcher.status.active == "c"
    await eventually(lambda: switcher.status.state is State.IDLE, what="unloaded")


async def test_an_idle_model_with_a_sleep_level_sleeps_at_its_ttl(
    traffic: Traffic, switcher: Switcher, runtime: FakeRuntime
) -> None:
    async with traffic.lease("d"):
        pass
    await eventually(lambda: switcher.status.sleeper("d") is not None, what="asleep")
    assert switcher.status.state is State.IDLE
    assert ("sleep", "d") in runtime.calls and ("stop", "d") not in runtime.calls


async def test_failed_switch_fails_the_waiting_requests(
    traffic: Traffic, switcher: Switcher, runtime: FakeRuntime
) -> None:
    """Requests that waited for a model that crashed get the switch's error."""
    runtime.behaviours["b"] = Behaviour(crash=True)
    with pytest.raises(ModelExited):
        async with traffic.lease("b"):
            pass
    assert traffic.waiting == []


async def test_cancelled_waiter_leaves_the_queue(traffic: Traffic, switcher: Switcher) -> None:
    """A client that hangs up while waiting frees its place and takes no lease."""
    await (await switcher.switch_to("a")).future
    release = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(hold(traffic, "a", release, log))
    await started(log, "a")
    waiter = asyncio.create_task(hold(traffic, "a", release, log))
    await eventually(lambda: waiting_for(traffic, "a") == 1, what="the second request waiting")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert traffic.waiting == []
    release.set()
    await holder
    assert traffic.inflight["a"] == 0


class Recording(list[Waiter]):
    """The waiting list, keeping every waiter ever queued."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[Waiter] = []

    def append(self, waiter: Waiter) -> None:
        self.queued.append(waiter)
        super().append(waiter)


async def test_loaded_model_with_nobody_waiting_is_granted_at_once(
    traffic: Traffic, switcher: Switcher
) -> None:
    """No waiter is queued for it, and its lease is counted and returned as any other."""
    async with traffic.lease("b"):
        pass
    recording = traffic.waiting = Recording()
    async with traffic.lease("b") as upstream:
        assert upstream == "http://fake/b"
        assert traffic.inflight["b"] == 1
    assert recording.queued == []
    assert traffic.inflight["b"] == 0
