"""The steps of a switch: drain the old model, put it to sleep or stop it, stop every
other, wake or start the new one, wait, roll back.

The switcher's worker runs these, one operation at a time. They change state only through
the ``enter`` they are given, which is the switcher's one transition method, and read it
through ``status``; so the switcher stays the one owner of its state.

At most one model is awake on the GPU: the one leaving is confirmed asleep, or stopped,
before another wakes or starts. Sleepers keep their running containers; the warm pool in
the status says which they are, least recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, Protocol

import structlog

from .compose import ModelSpec
from .errors import (
    Cancelled,
    Conflict,
    DockerError,
    ModelExited,
    OrchestratorError,
    SleepModeFailed,
    StartTimeout,
)
from .history import Operation, Outcome
from .observers import Drain, Observers
from .pool import PoolLimits, to_evict
from .runtime import READY_POLL_INTERVAL, ModelRuntime, wait_ready
from .standby import Standbys
from .states import NO_ENGINE, Sleeper, State, Status
from .watcher import Watcher

log = structlog.get_logger(__name__)


# How long a woken engine has to pass its health check once vLLM says it is awake.
WAKE_HEALTH_TIMEOUT = 10.0
# A target not standing by is staged during a switch when the old engine took at least
# this long to exit last time: docker's start of a container takes 0.2-0.3 s, and the
# gate's own steps (hold file, its line, the signal) about 50 ms of the switch's time.
STAGE_IF_EXIT_TAKES = 0.1


class Left(StrEnum):
    """What became of the model a switch moved away from."""

    ASLEEP = "asleep"
    STOPPED = "stopped"
    AWAKE = "awake"  # it may not sleep: the caller stops it


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
        weights_bytes: Callable[[ModelSpec], int] = lambda spec: 0,
        pool: PoolLimits | None = None,
        rollback: bool = True,
        standby: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime, self.watcher = runtime, watcher
        self._enter, self._status, self._models = enter, status, models
        self._preflight, self.rollback, self._clock = preflight, rollback, clock
        self._weights_bytes, self.pool = weights_bytes, pool or PoolLimits()
        self._drain_with: Drain | None = None
        self._observers = Observers()
        self._starting: asyncio.Task[None] | None = None  # a start POST /stop may call off
        self.standbys = Standbys(
            runtime=runtime, models=models, prepare=self._prepare, limit=standby
        )

    async def close(self) -> None:
        await self.standbys.close()

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
        # Creating the target's containers, and starting its engine's container behind the
        # start gate, need no GPU: they overlap the drain and the old model's stop and take
        # docker's work off the switch's critical path. A sleeper has its own container.
        # Standbys hold no GPU: they stay while the switch is busy with docker, unless the
        # target starts cold unstaged and needs a fixed host port one of them holds.
        spare = self.standbys.ids
        cold = status.sleeper(spec.id) is None
        staging = asyncio.create_task(
            self._stage(spec, op, cold=cold, now=self._worth_staging(status)),
            name=f"stage-{spec.id}",
        )
        try:
            await self.drain(op)
            began = self._clock()
            await self.stop_all(except_model=spec.id, target=spec.id, op=op, spare=spare)
            # Unstaged, it starts after the old engine's exit, as before; a standby holding
            # a fixed host port it publishes would make docker refuse that start.
            await self.standbys.leave(await staging)
            op.timings["stop"] = self._clock() - began
        except BaseException:
            await self._abandon(staging, spec)
            raise
        began = self._clock()
        try:
            await self._cancellable_start(spec, op, left=self._left_cold(previous))
            return Outcome.OK
        except ModelExited as err:
            if not self._status().asleep:
                await self._after_failed_start(spec, previous, err)
                raise
            exited = err
        except (StartTimeout, DockerError) as err:
            await self._after_failed_start(spec, previous, err)
            raise
        # The engine exited while models slept beside it, which is how vLLM fails when the
        # sleepers' share of GPU memory leaves too little free: they go, and it tries again.
        op.timings["first_start"] = self._clock() - began
        try:
            await self._clear_for_retry(spec, exited)
            await self._cancellable_start(spec, op)
            return Outcome.OK
        except (ModelExited, StartTimeout, DockerError) as err:
            await self._after_failed_start(spec, previous, err)
            raise

    async def _stage(self, spec: ModelSpec, op: Operation, *, cold: bool, now: bool) -> list[str]:
        """For a cold start, stage the target, if it stands by or ``now``. When it is not
        staged, the standbys in the way of its start."""
        if not cold:
            return []
        began = self._clock()
        standing = await self.standbys.take(spec.id)
        if not standing:
            await self._prepare(spec)
        if (standing or now) and await self.runtime.stage(spec):
            op.timings["staged"] = self._clock() - began
            return []
        return await self.runtime.in_the_way(spec)

    def _worth_staging(self, status: Status) -> bool:
        """Whether to stage a target that does not stand by: only while the old model
        takes long enough to leave (requests to finish, an engine seen to be slow to exit
        before) for docker's start of the target's container to fit beside it. Otherwise
        the gate's own steps would only add to the switch."""
        active = status.active
        if active is None:
            return False
        if self._drain_with is not None and self._drain_with.in_flight(active):
            return True
        exit_time = self.runtime.exit_time(active)
        return exit_time is not None and exit_time >= STAGE_IF_EXIT_TAKES

    def _left_cold(self, model_id: str | None) -> ModelSpec | None:
        """The model a switch left, if it may stand by: stopped, not asleep, gated."""
        spec = self._models().get(model_id) if model_id else None
        if spec is None or not spec.gated or self._status().sleeper(spec.id):
            return None
        return spec

    async def _abandon(self, staging: asyncio.Task[list[str]], spec: ModelSpec) -> None:
        """The switch ends before its start: a staged engine container goes unrun."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The daemon is shutting down: the next one finds the container held and
            # stops it (see the switcher's reconcile).
            staging.cancel()
            return
        await asyncio.gather(staging, return_exceptions=True)
        try:
            await self.runtime.unstage(spec)
        except DockerError as err:
            log.warning("could not stop the staged container", error=err.message)

    async def _clear_for_retry(self, spec: ModelSpec, exited: ModelExited) -> None:
        log.warning(
            "start failed beside sleeping models; stopping them and starting once more",
            error=exited.message,
            asleep=[s.model for s in self._status().asleep],
        )
        self._observers.happened("start_retried", model=spec.id, error=exited.message)
        await self._stop_model(spec)
        for sleeper in self._status().asleep:
            await self.stop_sleeper(sleeper, f"{spec.id} could not start beside it")

    async def stop(self, op: Operation) -> Outcome:
        """Stop every model container, the sleepers' too: they still hold GPU memory."""
        await self.standbys.leave_all()
        await self.drain(op)
        await self.stop_all(keep_asleep=False)
        await self.runtime.settle()
        return Outcome.OK

    async def sleep(self, op: Operation) -> Outcome:
        """Put the awake model to sleep and wake none; a model without sleep mode refuses."""
        status = self._status()
        if status.active is None:
            return Outcome.NOOP
        spec = self._models()[status.active]
        if spec.sleep is None or status.state is not State.READY:
            raise Conflict(
                f"{spec.id} cannot be put to sleep: it has no sleep level set (sleep: 1 or 2"
                " in its x-orchestrator settings); POST /stop unloads it",
                model=spec.id,
            )
        await self.drain(op)
        left, why = await self._sleep_or_stop(spec, None, op)
        if left is Left.ASLEEP:
            return Outcome.OK
        if left is Left.AWAKE:
            await self.stop_all(keep_asleep=True)
        raise SleepModeFailed(
            f"{spec.id} could not be put to sleep ({why}); it was stopped"
            " instead, so the GPU is free",
            model=spec.id,
        )

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

    async def stop_all(
        self,
        except_model: str | None = None,
        target: str | None = None,
        *,
        op: Operation | None = None,
        keep_asleep: bool = True,
        spare: frozenset[str] = frozenset(),
    ) -> None:
        """Leave at most the sleepers running (none if not ``keep_asleep``), so that no
        model but the one about to come up holds the GPU awake. ``spare``: the standbys,
        whose engines never ran; the switch deals with them.

        The active model goes first, before anything is listed: its engine's stop signal
        (or its sleep) is what the switch waits on. Then whatever else is found running.
        """
        models = self._models()
        active = self._status().active
        service_model = {s: m.id for m in models.values() for s in m.services}
        # Listed while the active model stops: nothing else starts meanwhile, and the look
        # for strays then costs the switch no time of its own.
        listing = asyncio.create_task(self.runtime.running(frozenset(service_model)))
        try:
            if active is not None and active != except_model:
                spec = models[active]
                left, _ = (
                    await self._sleep_or_stop(spec, target, op) if keep_asleep else (Left.AWAKE, "")
                )
                if left is Left.AWAKE:
                    await self._stop_one(spec, target)
        except BaseException:
            listing.cancel()
            raise
        containers = await listing
        asleep = {s.model for s in self._status().asleep} if keep_asleep else set()
        done = {except_model, active, *spare} | asleep
        for model_id in sorted({service_model[c.service] for c in containers} - done):
            await self._stop_one(models[model_id], target)
        for sleeper in () if keep_asleep else self._status().asleep:
            await self.stop_sleeper(sleeper, "everything is stopping")  # not found running
        if self._status().state is not State.IDLE:
            self._enter(State.IDLE, active=None, target=target, **NO_ENGINE)

    async def _stop_one(self, spec: ModelSpec, target: str | None) -> None:
        status = self._status()
        # A stray or a sleeper has no engine of ours to keep pointing at.
        engine: Mapping[str, Any] = {"healthy": False} if status.active == spec.id else NO_ENGINE
        self._enter(State.STOPPING, active=spec.id, target=target, reason=f"stopping {spec.id}",
                    asleep=status.without(spec.id), **engine)  # fmt: skip
        try:
            await self._stop_model(spec)
        except DockerError as err:
            self._enter(State.FAILED, reason=err.message)
            raise

    # -- the warm pool ------------------------------------------------------------------------

    async def _sleep_or_stop(
        self, spec: ModelSpec, target: str | None, op: Operation | None
    ) -> tuple[Left, str]:
        """Put the ready model to sleep, making room in the warm pool first; it stays awake
        when it may not sleep (no sleep level, not ready and answering, no room for it).
        When vLLM does not confirm the sleep, the model is stopped: the GPU must be free."""
        status = self._status()
        url, container = status.upstream, status.engine_container
        if spec.sleep is None:
            return Left.AWAKE, "it has no sleep level"
        if status.state is not State.READY or not status.healthy:
            return Left.AWAKE, "it is not ready and answering"
        if url is None or container is None:
            return Left.AWAKE, "its engine's address is not known"
        ram = await asyncio.to_thread(self._weights_bytes, spec) if spec.sleep == 1 else 0
        # The model about to wake leaves the pool, so it makes no room for this one.
        staying = [s for s in status.asleep if s.model != target]
        evicted = to_evict(staying, ram, self.pool)
        if evicted is None:
            log.info(
                "no room to sleep; stopping", model=spec.id, ram_bytes=ram, **self.pool.to_json()
            )
            return Left.AWAKE, "the warm pool has no room for it"
        for sleeper in evicted:
            await self.stop_sleeper(sleeper, "the warm pool is full")
        reason = f"putting {spec.id} to sleep (level {spec.sleep})"
        self._enter(State.STOPPING, active=spec.id, target=target, healthy=False, reason=reason)
        began = self._clock()
        try:
            await self.runtime.sleep(spec, url)
        except SleepModeFailed as err:
            log.warning("sleep failed; stopping the model", error=err.message)
            self._observers.happened("sleep_failed", model=spec.id, error=err.message)
            await self._stop_one(spec, target)
            self._enter(State.IDLE, active=None, target=target, **NO_ENGINE)
            return Left.STOPPED, err.message
        if op is not None:
            op.timings["sleep"] = self._clock() - began
        pool = (
            *self._status().without(spec.id),
            Sleeper(spec.id, container, url, spec.sleep, ram_bytes=ram),
        )
        self._enter(State.IDLE, active=None, target=target, asleep=pool,
                    reason=f"{spec.id} is asleep", **NO_ENGINE)  # fmt: skip
        self._observers.happened("model_asleep", model=spec.id, level=spec.sleep)
        return Left.ASLEEP, ""

    async def stop_sleeper(self, sleeper: Sleeper, why: str, spec: ModelSpec | None = None) -> None:
        """Stop a sleeping model's containers (``spec``: as they were made, for a model
        gone from the file) and take it out of the pool."""
        spec = spec or self._models().get(sleeper.model)
        log.info("stopping a sleeping model", model=sleeper.model, why=why)
        if spec is not None:
            await self._stop_model(spec)
        status = self._status()
        self._enter(status.state, asleep=status.without(sleeper.model), reason=status.reason)
        self._observers.happened("sleeper_stopped", model=sleeper.model, why=why)

    async def _wake(self, spec: ModelSpec, sleeper: Sleeper, op: Operation | None) -> None:
        status = self._status()
        self._enter(State.STARTING, target=spec.id, active=None, asleep=status.without(spec.id),
                    reason=f"waking {spec.id}")  # fmt: skip
        began = self._clock()
        await self.runtime.wake(spec, sleeper.upstream)
        await self._answering(spec, sleeper.upstream)
        if op is not None:
            op.timings["wake"] = self._clock() - began
            op.path = "warm"
        self._enter(State.READY, active=spec.id, target=None, upstream=sleeper.upstream,
                    engine_container=sleeper.engine_container, healthy=True)  # fmt: skip

    async def _answering(self, spec: ModelSpec, url: str) -> None:
        """A woken engine's health check passes at once; one that does not is broken."""
        deadline = self._clock() + WAKE_HEALTH_TIMEOUT
        while not await self.runtime.probe(url + spec.health_path):
            if self._clock() >= deadline:
                raise SleepModeFailed(
                    f"{spec.id}: awake but not healthy at {spec.health_path} within"
                    f" {WAKE_HEALTH_TIMEOUT:g} s",
                    model=spec.id,
                )
            await asyncio.sleep(READY_POLL_INTERVAL)

    async def _cancellable_start(
        self, spec: ModelSpec, op: Operation, left: ModelSpec | None = None
    ) -> None:
        """Start the model in a task of its own, so that POST /stop can call it off;
        ``left`` stands by once the model's engine has started."""
        called_off = Cancelled(f"the switch to {spec.id} was cancelled by POST /stop")
        if op.cancelled:
            await self.runtime.unstage(spec)
            raise called_off
        self._starting = asyncio.create_task(self._start(spec, op, left), name=f"start-{spec.id}")
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
            # It may be standing by already (its staging waited for): let it through.
            await self.standbys.take(previous)
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

    async def _warm_up(self, spec: ModelSpec, url: str, op: Operation | None) -> None:
        began = self._clock()
        try:
            await self.runtime.warm_up(spec, url)
        except SleepModeFailed as err:
            # Healthy all the same: the first user's request will tell whether it is broken.
            log.warning("warm-up generation failed", error=err.message)
        if op is not None:
            op.timings["warmup"] = self._clock() - began

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

    async def _start(
        self, spec: ModelSpec, op: Operation | None, left: ModelSpec | None = None
    ) -> None:
        sleeper = self._status().sleeper(spec.id)
        if sleeper is not None:
            began = self._clock()
            try:
                await self._wake(spec, sleeper, op)
                self.standbys.after_switch(left)
                return
            except (SleepModeFailed, DockerError) as err:
                # CUDA out of memory, an engine error, no answer: the container goes, and
                # the model starts afresh in a new one.
                log.warning("wake failed; starting cold", error=err.message)
                self._observers.happened("wake_failed", model=spec.id, error=err.message)
                if op is not None:
                    op.timings["failed_wake"] = self._clock() - began
                await self._stop_model(spec)
        self._enter(State.STARTING, target=spec.id, active=None, reason=f"starting {spec.id}")
        began = self._clock()
        await self.runtime.start(spec)
        if op is not None:
            op.timings["up"] = self._clock() - began
            # The engine loads now: time for the standbys' work, off the critical path.
            self.standbys.after_switch(left)
        ready = await wait_ready(
            self.runtime, spec, began=began, clock=self._clock, seen=self.watcher.saw
        )
        if spec.warmup:
            await self._warm_up(spec, ready.url, op)
        if op is not None:
            op.timings["ready"] = self._clock() - began
            op.path = "cold"
        self._enter(
            State.READY,
            active=spec.id,
            target=None,
            upstream=ready.url,
            engine_container=ready.engine.id,
            healthy=True,
        )
