"""Who may send a request to a model now, and which model the GPU should hold next.

Every gateway request takes a lease on its model before it is forwarded. A lease is
granted only while that model is ready and no switch is accepted, so a switch can
drain the model it replaces: it waits (bounded) for the leases already out, while new
requests for the old model queue behind it.

Requests that cannot be served yet wait here. ``_dispatch`` is the one place that
grants leases and asks the switcher for a swap. It never awaits, so it runs as a whole
between two steps of the loop and nothing can change under it. The policy it applies
is ``choose_next``: the loaded model's waiting requests are served first, then models
in the order of their first waiting request, so the GPU swaps as rarely as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from .errors import OrchestratorError, TooBusy
from .states import State, Status
from .switcher import Switcher
from .tasks import cancel_all

log = structlog.get_logger(__name__)

# How often idle models are checked against their ttl.
TTL_CHECK_INTERVAL = 0.5


@dataclass(eq=False)
class Waiter:
    model: str
    arrival: float
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(frozen=True)
class TrafficSnapshot:
    in_flight: dict[str, int]
    waiting: dict[str, int]
    swaps_requested: int
    auto_switch: bool


def choose_next(
    loaded: str | None,
    waiting: Sequence[tuple[str, float]],
    now: float,
    patience: float,
) -> str | None:
    """The model to switch to for the waiting requests, or None to keep the loaded one.

    ``waiting`` holds (model, arrival) in arrival order. The loaded model keeps the GPU
    while it has requests waiting, unless another model's oldest request has waited
    longer than ``patience``: a busy model must not starve the others.
    """
    others = [(model, arrival) for model, arrival in waiting if model != loaded]
    if not others:
        return None
    first_model, first_arrival = others[0]
    loaded_busy = loaded is not None and any(model == loaded for model, _ in waiting)
    if loaded_busy and now - first_arrival < patience:
        return None
    return first_model


class Traffic:
    def __init__(
        self,
        switcher: Switcher,
        *,
        auto_switch: bool = True,
        max_queue: int = 64,
        drain_timeout: float = 60.0,
        default_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.switcher = switcher
        self.auto_switch = auto_switch
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        self.default_ttl = default_ttl
        self._clock = clock
        self.inflight: Counter[str] = Counter()
        self.waiting: list[Waiter] = []
        # When each model last had a request start or end; ttl counts from here.
        self.last_activity: dict[str, float] = {}
        self.swaps_requested = 0
        # The task asking the switcher for a swap, until the switcher has accepted it.
        self._switching: asyncio.Task[None] | None = None
        self._idle: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the gateway uses ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, model_id: str) -> AsyncIterator[str]:
        """Wait until ``model_id`` may be sent a request; yields its upstream URL.

        Leaving the block, however it is left (a finished response, a client that hung
        up, an error), returns the lease, which may let a switch go ahead.
        """
        if not self.waiting and self.admissible() == model_id and self._has_slot(model_id):
            # Nobody waits, so nobody is passed over: granted at once, as _dispatch would,
            # without a waiter and its future on every request to the loaded model.
            self._grant(model_id)
        else:
            await self._wait_for_lease(model_id)
        upstream = self.switcher.status.upstream or ""
        try:
            yield upstream
        finally:
            self._release(model_id)

    async def _wait_for_lease(self, model_id: str) -> None:
        queued = sum(1 for w in self.waiting if w.model == model_id)
        if queued >= self.max_queue:
            loaded = self.admissible() == model_id
            raise TooBusy(
                f"{queued} requests for {model_id} are already waiting; try again shortly",
                retry_after=1 if loaded else 10,
                model=model_id,
            )
        waiter = Waiter(model_id, self._clock())
        self.waiting.append(waiter)
        try:
            self._dispatch()
            await waiter.future
        except BaseException:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and not (waiter.future.exception())
            ):
                self._release(model_id)  # granted just as we were cancelled
            raise

    def snapshot(self) -> TrafficSnapshot:
        """Requests in flight and waiting per model, for /status."""
        waiting = Counter(waiter.model for waiter in self.waiting)
        return TrafficSnapshot(
            dict(self.inflight), dict(waiting), self.swaps_requested, self.auto_switch
        )

    # -- what the switcher uses ------------------------------------------------------------

    def in_flight(self, model_id: str) -> int:
        return self.inflight[model_id]

    async def drain(self, model_id: str) -> int:
        """Wait, at most ``drain_timeout``, for the model's requests in flight to finish.

        Called by the switcher before it stops a model; no new lease is granted for it
        meanwhile, because a switch is under way. Returns how many were cut off.
        """
        if not self.inflight[model_id]:
            return 0
        log.info("draining", model=model_id, in_flight=self.inflight[model_id])
        idle = self._idle.setdefault(model_id, asyncio.Event())
        idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), self.drain_timeout)
        left = self.inflight[model_id]
        if left:
            log.warning("drain timed out", model=model_id, cut_off=left)
        return left

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._ttl_loop(), name="traffic-ttl"))

    async def close(self) -> None:
        await cancel_all(self._tasks)

    # -- internals -------------------------------------------------------------------------

    def admissible(self) -> str | None:
        """The model that may take new requests: ready, with no switch accepted."""
        status = self.switcher.status
        if status.state is not State.READY or self.switcher.switch_under_way:
            return None
        return status.active

    def _has_slot(self, model_id: str) -> bool:
        spec = self.switcher.models.get(model_id)
        limit = spec.max_concurrency if spec is not None else None
        return not limit or self.inflight[model_id] < limit

    def _grant(self, model_id: str) -> None:
        self.inflight[model_id] += 1
        self.last_activity[model_id] = self._clock()

    def _release(self, model_id: str) -> None:
        self.inflight[model_id] -= 1
        self.last_activity[model_id] = self._clock()
        if self.inflight[model_id] <= 0:
            del self.inflight[model_id]
            idle = self._idle.get(model_id)
            if idle is not None:
                idle.set()
        self._dispatch()

    # -- as the switcher's observer: look again once its transition or clean-up is done -----

    def status_changed(self, status: Status) -> None:
        self._dispatch_soon()

    def happened(self, event: str, data: Mapping[str, Any]) -> None:
        pass

    def released(self) -> None:
        self._dispatch_soon()

    def _dispatch_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self.waiting = [w for w in self.waiting if not w.future.done()]
        ready = self.admissible()
        if ready is not None:
            for waiter in [w for w in self.waiting if w.model == ready]:
                if not self._has_slot(ready):
                    break
                self._grant(ready)
                waiter.future.set_result(None)
                self.waiting.remove(waiter)
        if not self.auto_switch or not self.waiting or self._switching is not None:
            return
        if self.switcher.switch_under_way:
            return  # the switch already accepted decides what runs next
        target = choose_next(
            ready,
            [(w.model, w.arrival) for w in self.waiting],
            self._clock(),
            self.drain_timeout,
        )
        if target is not None:
            self.swaps_requested += 1
            task = asyncio.create_task(self._switch_for_waiters(target), name=f"gw-{target}")
            self._switching = task
            self._tasks.append(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def _accepted(self) -> None:
        # Only the task that asked may clear the flag: an older task finishing late must
        # not let a second swap be asked for while a newer one is still being accepted.
        if self._switching is asyncio.current_task():
            self._switching = None

    async def _switch_for_waiters(self, model_id: str) -> None:
        try:
            op = await self.switcher.switch_to(model_id)
            self._accepted()
            await asyncio.shield(op.future)
        except OrchestratorError as err:
            # The requests that were waiting for this model get the switch's answer; those
            # that come later try again.
            for waiter in [w for w in self.waiting if w.model == model_id]:
                if not waiter.future.done():
                    waiter.future.set_exception(err)
        finally:
            self._accepted()
            self._dispatch()

    def ttl_of(self, model_id: str) -> float:
        spec = self.switcher.models.get(model_id)
        if spec is not None and spec.ttl is not None:
            return spec.ttl
        return self.default_ttl

    async def _ttl_loop(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_INTERVAL)
            status = self.switcher.status
            model = status.active
            if model is None or self.admissible() != model:
                continue
            ttl = self.ttl_of(model)
            if ttl <= 0 or self.inflight[model] or any(w.model == model for w in self.waiting):
                continue
            # A model loaded by /switch and never used counts from when it became ready.
            ready_for = time.time() - status.since
            idle_for = min(self._clock() - self.last_activity.get(model, -1e18), ready_for)
            if idle_for >= ttl:
                spec = self.switcher.models.get(model)
                asleep = spec is not None and spec.sleep is not None
                log.info("idle unload", model=model, idle_for=round(idle_for, 1), ttl=ttl,
                         to="sleep" if asleep else "stop")  # fmt: skip
                await (self.switcher.sleep() if asleep else self.switcher.stop())
