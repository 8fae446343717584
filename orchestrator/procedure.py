"""The steps of a switch: drain the old model, stop every other, start, wait, roll back.

The switcher's worker runs these, one operation at a time. They change state only through
the ``enter`` they are given, which is the switcher's one transition method, and read it
through ``status``; so the switcher stays the one owner of its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from .compose import ModelSpec
from .errors import Cancelled, DockerError, ModelExited, OrchestratorError, StartTimeout
from .history import Operation, Outcome
from .observers import Drain, Observers
from .runtime import ModelRuntime, wait_ready
from .states import NO_ENGINE, State, Status
from .watcher import Watcher

log = structlog.get_logger(__name__)


class Enter(Protocol):
    def __call__(self, state: State, **changes: Any) -> None: ...


class Procedure:
    def __init__(
        self,
        *,
        runtime: ModelRuntime,
        watcher: Watcher,
        enter: Enter,
        status: Callable[[], Status],
        models: Callable[[], Mapping[str, ModelSpec]],
        preflight: Callable[[ModelSpec], None],
        rollback: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime, self.watcher = runtime, watcher
        self._enter, self._status, self._models = enter, status, models
        self._preflight, self.rollback, self._clock = preflight, rollback, clock
        self._drain_with: Drain | None = None
        self._observers = Observers()
        self._starting: asyncio.Task[None] | None = None  # a start POST /stop may call off

    def connect(self, *, drain: Drain | None, observers: Observers) -> None:
        self._drain_with, self._observers = drain, observers

    def call_off_start(self) -> None:
        """Cancel the start under way, if one is: its switch ends 409 cancelled."""
        if self._starting is not None:
            self._starting.cancel()

    async def switch(self, op: Operation, spec: ModelSpec) -> Outcome:
        status = self._status()
        if status.holds(spec.id):
            return Outcome.NOOP
        # Checked again: the cache may have changed while the request waited its turn.
        await asyncio.to_thread(self._preflight, spec)
        previous = status.active if status.state is State.READY else None
        await self.drain(op)
        began = self._clock()
        # Creating the target's containers needs no GPU, so it overlaps the old model's
        # stop and takes that work off the switch's critical path.
        preparing = asyncio.create_task(self._prepare(spec))
        try:
            await self.stop_all(except_model=spec.id, target=spec.id)
        finally:
            await preparing
        op.timings["stop"] = self._clock() - began
        try:
            await self._cancellable_start(spec, op)
            return Outcome.OK
        except (ModelExited, StartTimeout, DockerError) as err:
            await self._after_failed_start(spec, previous, err)
            raise

    async def stop(self, op: Operation) -> Outcome:
        await self.drain(op)
        await self.stop_all()
        await self.runtime.settle()
        return Outcome.OK

    async def drain(self, op: Operation) -> None:
        """Let the ready model finish the requests it is answering, within the drain bound."""
        status = self._status()
        if self._drain_with is None or status.state is not State.READY or status.active is None:
            return
        began = self._clock()
        self._enter(State.READY, reason=f"finishing requests on {status.active} before a switch")
        cut_off = await self._drain_with.drain(status.active)
        op.timings["drain"] = self._clock() - began
        if cut_off:
            op.timings["cut_off"] = cut_off

    async def stop_all(self, except_model: str | None = None, target: str | None = None) -> None:
        """Stop every model that has a container up, so that at most one ever holds the GPU.

        The active model is stopped first, before anything is listed: its engine's stop
        signal is what the switch waits on. Then whatever else is found running.
        """
        models = self._models()
        active = self._status().active
        service_model = {s: m.id for m in models.values() for s in m.services}
        # Listed while the active model stops: nothing else starts meanwhile, and the look
        # for strays then costs the switch no time of its own.
        listing = asyncio.create_task(self.runtime.running(frozenset(service_model)))
        try:
            if active is not None and active != except_model:
                await self._stop_one(models[active], target)
        except BaseException:
            listing.cancel()
            raise
        containers = await listing
        done = {except_model, active}
        for model_id in sorted({service_model[c.service] for c in containers} - done):
            await self._stop_one(models[model_id], target)
        if self._status().state is not State.IDLE:
            self._enter(State.IDLE, active=None, target=target, **NO_ENGINE)

    async def _stop_one(self, spec: ModelSpec, target: str | None) -> None:
        reason = f"stopping {spec.id}"
        self._enter(State.STOPPING, active=spec.id, target=target, healthy=False, reason=reason)
        try:
            await self._stop_model(spec)
        except DockerError as err:
            self._enter(State.FAILED, reason=err.message)
            raise

    async def _cancellable_start(self, spec: ModelSpec, op: Operation) -> None:
        """Start the model in a task of its own, so that POST /stop can call it off."""
        called_off = Cancelled(f"the switch to {spec.id} was cancelled by POST /stop")
        if op.cancelled:
            raise called_off
        self._starting = asyncio.create_task(self._start(spec, op), name=f"start-{spec.id}")
        try:
            await self._starting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the daemon is shutting down: leave the model for the next to adopt
            self._enter(
                State.STOPPING, active=spec.id, target=None, healthy=False, reason="cancelled"
            )
            await self._stop_model(spec)
            self._enter(State.IDLE, active=None, **NO_ENGINE)
            raise called_off from None
        finally:
            self._starting = None

    async def _after_failed_start(
        self, spec: ModelSpec, previous: str | None, err: OrchestratorError
    ) -> None:
        """Stop the model that failed and, when rollback is on, bring the previous one back.

        The state stays failed while the broken model is cleared away: nothing is serving,
        and /status should say why.
        """
        self._enter(State.FAILED, active=None, target=None, healthy=False, reason=err.message)
        err.details["rolled_back"] = False
        try:
            await self._stop_model(spec)
        except DockerError as stop_err:
            err.details["stop_error"] = stop_err.message
            return
        if not previous or not self.rollback:
            if previous:
                err.details["rollback"] = "rollback is off"
            return
        log.warning("rolling back", to_model=previous)
        previous_spec = self._models()[previous]
        try:
            await self._start(previous_spec, None)
        except OrchestratorError as rollback_err:
            err.details["rollback_error"] = rollback_err.message
            both = f"{err.message}; rollback to {previous} failed too: {rollback_err.message}"
            self._enter(State.FAILED, reason=both)
            with contextlib.suppress(DockerError):
                await self._stop_model(previous_spec)
            return
        err.details.update(rolled_back=True, active=previous)
        self._observers.happened(
            "rolled_back", failed_model=spec.id, model=previous, error=err.message
        )
        err.message += f"; rolled back to {previous}"

    async def _prepare(self, spec: ModelSpec) -> None:
        try:
            await self.runtime.prepare(spec)
        except DockerError as err:
            # Not fatal: ``up`` creates what is missing and reports the real error.
            log.warning("could not prepare containers", error=err.message)

    async def retire(self, spec: ModelSpec) -> None:
        """Stop what still runs of a model whose engine died; its containers go behind."""
        await self._stop_model(spec)

    async def _stop_model(self, spec: ModelSpec) -> None:
        await self.runtime.stop(spec)
        self.watcher.forget(spec.services)

    async def _start(self, spec: ModelSpec, op: Operation | None) -> None:
        self._enter(State.STARTING, target=spec.id, active=None, reason=f"starting {spec.id}")
        began = self._clock()
        await self.runtime.start(spec)
        if op is not None:
            op.timings["up"] = self._clock() - began
        ready = await wait_ready(
            self.runtime, spec, began=began, clock=self._clock, seen=self.watcher.saw
        )
        if op is not None:
            op.timings["ready"] = self._clock() - began
        self._enter(
            State.READY,
            active=spec.id,
            target=None,
            upstream=ready.url,
            engine_container=ready.engine.id,
            healthy=True,
        )
