"""The switcher: one owner of which model holds the GPU.

State lives in an explicit machine (idle, starting, ready, stopping, failed) and changes
in one method, ``_enter``, called only from the worker task; the warm pool (the models
asleep in their running containers) is part of that state. Callers ask for outcomes
(``switch_to``, ``stop``) and await them; they never read a state and then act on it, so
they cannot race a transition. Requests queue in order; a request for a model that is
already being started, or already queued, joins that operation instead of adding a swap.

The watcher reports what it sees of the containers; the worker decides what a report
means. The runtime carries out starts and stops and waits for readiness; the history
keeps the operations and their records.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog

from .cache import Verdicts
from .compose import ModelSpec
from .docker import ContainerInfo
from .errors import (
    Cancelled,
    Conflict,
    DockerError,
    ModelExited,
    ModelNotFound,
    OrchestratorError,
)
from .history import History, Kind, Operation, Outcome, outcome_of
from .observers import Drain, Observers, SwitchObserver
from .pool import PoolLimits
from .preflight import check_runnable
from .procedure import Procedure
from .queue import OperationQueue
from .runtime import LOG_TAIL_LINES, ModelRuntime
from .states import NO_ENGINE, TRANSITIONS, IllegalTransition, Sleeper, State, Status
from .store import Store
from .tasks import cancel_all
from .watcher import EventSource, ModelDied, Notice, ProbeTarget, Watcher

log = structlog.get_logger(__name__)

DESIRED_MODEL_KEY = "desired_model"


class Switcher:
    def __init__(
        self,
        *,
        models: Mapping[str, ModelSpec],
        runtime: ModelRuntime,
        store: Store,
        history: History,
        verdicts: Verdicts,
        watcher: Watcher,
        rollback: bool = True,
        restore_on_start: bool = True,
        preload: str | None = None,
        pool: PoolLimits | None = None,
        standby: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime, self.store, self.history = runtime, store, history
        self.verdicts, self.watcher = verdicts, watcher
        self.restore_on_start, self.preload = restore_on_start, preload
        self.status = Status()
        self._observers = Observers()
        self._queue = OperationQueue()
        self._notices: deque[Notice] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stale_sleepers: dict[str, ModelSpec] = {}  # with the spec they were made from
        self.models: dict[str, ModelSpec] = {}
        self.set_models(models)
        self._procedure = Procedure(
            runtime=runtime,
            watcher=watcher,
            enter=self._enter,
            status=lambda: self.status,
            models=lambda: self.models,
            preflight=self.preflight,
            weights_bytes=self._weights_bytes,
            pool=pool,
            rollback=rollback,
            standby=standby,
            clock=clock,
        )
        self.pool = self._procedure.pool
        self.standbys = self._procedure.standbys

    def connect(self, *, drain: Drain | None, observers: Sequence[SwitchObserver]) -> None:
        """Who drains a model before it stops (the gateway), and who hears of changes."""
        self._observers = Observers(observers)
        self._procedure.connect(drain=drain, observers=self._observers)

    # -- what callers use ------------------------------------------------------

    @property
    def switch_under_way(self) -> bool:
        """True while an accepted request will change what runs (queued or running)."""
        queue = self._queue
        return bool(queue) and queue.will_change(self.status)

    @property
    def serving(self) -> bool:
        """What /health tells a load balancer: a model is ready and nothing is about to move."""
        status = self.status
        return status.state is State.READY and status.healthy and not self.switch_under_way

    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(
                f"unknown model {model_id!r}; known models: {known}", model=model_id
            ) from None

    def set_models(
        self, models: Mapping[str, ModelSpec], disabled: frozenset[str] = frozenset()
    ) -> None:
        """Replace the known models (the registry added, changed or removed one).

        Specs are immutable and a switch holds its own, so one under way is unaffected;
        the registry refuses to remove or disable a model that is active or queued.
        """
        before = self.models
        self.models, self.disabled = dict(models), disabled
        self._service_model = {s: m.id for m in self.models.values() for s in m.services}
        if not self._tasks:
            return  # not started: start() prepares every model
        # A sleeper runs the settings it was started with: one changed or gone from the
        # file is stopped (by the worker), so that no wake brings back what was replaced.
        for sleeper in self.status.asleep:
            made_from = before.get(sleeper.model)
            if made_from is not None and self.models.get(sleeper.model) != made_from:
                self._stale_sleepers[sleeper.model] = made_from
                self._wakeup.set()
        for model_id in before.keys() - self.models.keys():
            self.runtime.discard(before[model_id])
        changed = [spec for key, spec in self.models.items() if before.get(key) != spec]
        self.runtime.prepare_ahead(self._runnable(changed))

    def _runnable(self, specs: Iterable[ModelSpec]) -> list[ModelSpec]:
        return [s for s in specs if s.unusable is None and s.id not in self.disabled]

    def involves(self, model_id: str) -> bool:
        """Whether the model is loaded, asleep, being started, or waiting in the queue."""
        status = self.status
        return (
            model_id in {status.active, status.target}
            or status.sleeper(model_id) is not None
            or self._queue.involves(model_id)
        )

    def _weights_bytes(self, spec: ModelSpec) -> int:
        """Host RAM a level-1 sleeper's weights take: the size of what its engine loads."""
        verdict = self.verdicts.of(spec)
        return verdict.size_bytes if verdict is not None else 0

    def preflight(self, spec: ModelSpec) -> None:
        """Refuse a model that cannot run (see ``check_runnable``); call it off the loop."""
        check_runnable(spec, disabled=self.disabled, verdicts=self.verdicts)

    async def switch_to(self, model_id: str) -> Operation:
        """Accept a switch and return its operation; await ``op.future`` for the outcome."""
        spec = self.spec(model_id)
        await asyncio.to_thread(self.preflight, spec)
        joined = self._queue.find(Kind.SWITCH, model_id)
        if joined is not None:
            return joined
        op = Operation(kind=Kind.SWITCH, model=model_id)
        status = self.status
        if not self._queue and status.holds(model_id):
            op.outcome, op.from_model = Outcome.NOOP, model_id
            op.future.set_result(self.history.record(op, finished=True))
            self.history.remember(op)
            return op
        # Enqueue before any await, so a racing request for the same model finds this one.
        self._enqueue(op)
        await self.store.set_value(DESIRED_MODEL_KEY, model_id)
        return op

    async def stop(self) -> Operation:
        """Unload whatever runs; a switch under way or waiting is called off first."""
        await self._call_off_switches()
        op = self._queue.find(Kind.STOP, None) or self._enqueue(Operation(Kind.STOP, None))
        await self.store.set_value(DESIRED_MODEL_KEY, None)
        return op

    async def sleep(self) -> Operation:
        """Put the awake model to sleep without waking another (POST /sleep, its ttl)."""
        # The model awake when this runs: the last queued switch's, else the active one.
        queued = self._queue.all()
        awake = queued[-1].model if queued else self.status.active
        spec = self.models.get(awake or "")
        if spec is not None and spec.sleep is None:
            raise Conflict(
                f"{spec.id} has no sleep level set (sleep: 1 or 2 in its settings), so it"
                " cannot sleep; POST /stop unloads it",
                model=spec.id,
            )
        op = self._queue.find(Kind.SLEEP, None) or self._enqueue(Operation(Kind.SLEEP, None))
        await self.store.set_value(DESIRED_MODEL_KEY, None)
        return op

    def queued(self) -> list[Operation]:
        return self._queue.all()

    def notify(self, notice: Notice) -> None:
        self._notices.append(notice)
        self._wakeup.set()

    def probe_target(self) -> ProbeTarget | None:
        """The engine the watcher should probe: the ready one, between switches."""
        status = self.status
        spec = self.models.get(status.active or "")
        if status.state is not State.READY or self._queue.current or spec is None:
            return None
        if not status.upstream or not status.engine_container:
            return None
        return ProbeTarget(
            status.engine_container, spec.engine_service, status.upstream + spec.health_path
        )

    async def _call_off_switches(self) -> None:
        """Switches accepted before a stop will not happen: their callers get 409."""
        for op in self._queue.withdraw_switches():
            error = Cancelled(
                f"the switch to {op.model} was cancelled by POST /stop", model=op.model
            )
            record = await self.history.finished(op, Outcome.CANCELLED, error.to_body()["error"])
            self._observers.finished(record)
            op.future.set_exception(error)
            op.future.exception()
        current = self._queue.current
        if current is not None and current.kind is Kind.SWITCH:
            current.cancelled = True
            self._procedure.call_off_start()

    def _enqueue(self, op: Operation) -> Operation:
        self._queue.add(op)
        self.history.remember(op)
        self._wakeup.set()
        self._observers.happened(
            "switch_requested", switch_id=op.id, operation=op.kind, model=op.model
        )
        return op

    # -- lifecycle -------------------------------------------------------------

    async def start(self, events: EventSource | None = None) -> None:
        """Reconcile with Docker, then run the worker and the watcher (with events if given)."""
        await self._reconcile()
        # Containers are made ahead, so that a switch only has to start them.
        self.runtime.prepare_ahead(self._runnable(self.models.values()))
        self._tasks.append(asyncio.create_task(self._work(), name="switcher-worker"))
        self.watcher.start(self, self.probe_target, events)

    async def close(self) -> None:
        """Stop our tasks; the running model is left running for the next daemon to adopt."""
        await self.watcher.close()
        await cancel_all(self._tasks)
        await self._procedure.close()
        for op in self._queue.all():
            if not op.future.done():
                message = "the daemon is shutting down; the request was not carried out"
                op.future.set_exception(OrchestratorError(message))
                op.future.exception()  # mark retrieved: nobody may be waiting

    async def _reconcile(self) -> None:
        """Adopt a healthy model found running, and the sleepers found asleep; otherwise
        start what should run."""
        containers = await self.runtime.containers()
        self.watcher.saw_all(containers)
        running: dict[str, list[ContainerInfo]] = {}
        for container in containers:
            model = self._service_model.get(container.service)
            if model is not None and container.running:
                running.setdefault(model, []).append(container)
        await self._stop_held(running)
        asleep = await self._adopt_sleepers(running)
        awake = {model: found for model, found in running.items() if model not in asleep}
        desired = await self.store.get_value(DESIRED_MODEL_KEY)
        log.info("reconcile", running=sorted(awake), asleep=sorted(asleep), desired=desired)
        if len(awake) == 1:
            ((model_id, found),) = awake.items()
            spec = self.models[model_id]
            engine = next((c for c in found if c.service == spec.engine_service), None)
            url = self.runtime.upstream_url(spec, engine)
            if url and engine and await self.runtime.probe(url + spec.health_path):
                self._enter(State.STARTING, target=model_id, reason="adopting a running model")
                self._enter(State.READY, active=model_id, target=None, upstream=url,
                            engine_container=engine.id, healthy=True,
                            reason="adopted at daemon start")  # fmt: skip
                log.info("adopted", model=model_id, upstream=url)
                return
        # Starting, unhealthy, or more than one model: an ordinary switch sorts it out,
        # stopping every other model first and waiting for this one's health.
        wanted = desired if desired in awake else min(awake, default=None)
        if wanted is None and self.preload in self.models:
            wanted = self.preload
        elif wanted is None and self.restore_on_start and desired in self.models:
            wanted = desired
        if wanted is not None:
            self._enqueue(Operation(kind=Kind.SWITCH, model=wanted))

    async def _stop_held(self, running: dict[str, list[ContainerInfo]]) -> None:
        """A container the last daemon started behind the start gate and never released
        has run no engine: it is stopped, and its model counts as not running."""
        for model_id, containers in sorted(running.items()):
            spec = self.models[model_id]
            engine = next((c for c in containers if c.service == spec.engine_service), None)
            if spec.gated and engine is not None and await self.runtime.held(engine):
                log.info("stopping a container left at the start gate", model=model_id)
                await self._procedure.retire(spec)
                del running[model_id]

    async def _adopt_sleepers(self, running: Mapping[str, list[ContainerInfo]]) -> set[str]:
        """The models with sleep mode whose running engine says it sleeps join the pool."""
        found: list[Sleeper] = []
        for model_id, containers in sorted(running.items()):
            spec = self.models[model_id]
            engine = next((c for c in containers if c.service == spec.engine_service), None)
            url = self.runtime.upstream_url(spec, engine)
            if spec.sleep is None or engine is None or url is None:
                continue
            if await self.runtime.is_sleeping(url) is True:
                ram = await asyncio.to_thread(self._weights_bytes, spec) if spec.sleep == 1 else 0
                found.append(Sleeper(model_id, engine.id, url, spec.sleep, ram_bytes=ram))
        if found:
            self._enter(self.status.state, asleep=tuple(found), reason="adopted at daemon start")
        return {s.model for s in found}

    # -- the one place state changes ------------------------------------------

    def _enter(self, state: State, **changes: Any) -> None:
        current = self.status.state
        if state is not current and state not in TRANSITIONS[current]:
            raise IllegalTransition(f"{current} -> {state}")
        # A reason holds for the state it was given with, unless given again.
        changes.setdefault("reason", None)
        # ``since`` is when the state was entered: a change within it (health, the pool)
        # does not restart the clock a ttl counts on.
        since = self.status.since if state is current else time.time()
        self.status = replace(self.status, state=state, since=since, **changes)
        self._observers.status_changed(self.status)
        status = self.status
        log.info("state", state=state, previous=current, active=status.active,
                 target=status.target, reason=status.reason)  # fmt: skip

    # -- the worker --------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._until_a_sleeper_expires())
            self._wakeup.clear()
            await self._stop_sleepers_due()
            while self._notices or self._queue.has_waiting():
                while self._notices:
                    await self._apply_notice(self._notices.popleft())
                if self._queue.has_waiting():
                    await self._stop_sleepers_due()
                    try:
                        await self._run(self._queue.take())
                    finally:
                        self._queue.done()
                        # Callers that held back while this operation was queued must look
                        # again: its end is not always a change of state.
                        self._observers.released()

    def _until_a_sleeper_expires(self) -> float | None:
        ttl = self.pool.sleep_ttl
        if ttl <= 0 or not self.status.asleep:
            return None
        first = min(s.since for s in self.status.asleep)
        return max(0.0, first + ttl - time.time())

    async def _stop_sleepers_due(self) -> None:
        """Stop the sleepers past their ttl and those whose settings changed."""
        ttl = self.pool.sleep_ttl
        stale, self._stale_sleepers = self._stale_sleepers, {}
        for sleeper in self.status.asleep:
            spec = stale.get(sleeper.model)
            if spec is not None:
                why = "its settings changed"
            elif ttl > 0 and time.time() - sleeper.since >= ttl:
                why = f"asleep longer than {ttl:g} s"
            else:
                continue
            with structlog.contextvars.bound_contextvars(model=sleeper.model):
                try:
                    await self._procedure.stop_sleeper(sleeper, why, spec)
                except DockerError as err:
                    log.warning("could not stop a sleeper", why=why, error=err.message)

    async def _apply_notice(self, notice: Notice) -> None:
        status = self.status
        if isinstance(notice, ModelDied):
            sleeper = next(
                (s for s in status.asleep if s.engine_container == notice.container_id), None
            )
            if sleeper is not None:
                await self._model_died(sleeper.model, notice, asleep=True)
                return
        # Reports about containers other than the ready engine are stale: a switch moved on.
        if status.state is not State.READY or notice.container_id != status.engine_container:
            return
        if isinstance(notice, ModelDied) and status.active is not None:
            await self._model_died(status.active, notice)
        elif isinstance(notice, ModelDied):
            return
        elif notice.healthy != status.healthy:
            hung = f"{status.active} stopped answering its health check"
            self._enter(
                State.READY, healthy=notice.healthy, reason=None if notice.healthy else hung
            )

    async def _model_died(self, model_id: str, notice: ModelDied, *, asleep: bool = False) -> None:
        """An engine exited, the ready one or a sleeper: say so, keep its last words in the
        history, then stop and remove what is left of the model, so that exited engines do
        not pile up. A sleeper is forgotten; the awake model, if any, carries on."""
        code = "" if notice.exit_code is None else f" with exit code {notice.exit_code}"
        self._observers.happened("model_died", model=model_id, exit_code=notice.exit_code)
        where = "while asleep" if asleep else "behind the daemon's back"
        reason = f"model {model_id} died {where}: its container exited"
        if asleep:
            status = self.status
            self._enter(status.state, asleep=status.without(model_id), reason=status.reason)
        else:
            self._enter(State.FAILED, active=None, reason=reason + code, **NO_ENGINE)
        with structlog.contextvars.bound_contextvars(model=model_id):
            try:
                tail = await self.runtime.logs_tail(notice.container_id, LOG_TAIL_LINES)
            except DockerError:
                tail = ""
            died = ModelExited(
                reason + code, model=model_id, exit_code=notice.exit_code, log_tail=tail
            )
            await self.history.died(model_id, died.to_body()["error"])
            spec = self.models.get(model_id)
            if spec is None:
                return
            try:
                await self._procedure.retire(spec)
            except DockerError as err:
                log.warning("could not stop what is left of the dead model", error=err.message)

    async def _run(self, op: Operation) -> None:
        op.from_model = self.status.active
        structlog.contextvars.bind_contextvars(switch_id=op.id, model=op.model)
        try:
            await self.history.begun(op)
            log.info("switch begins", kind=op.kind, from_model=op.from_model)
            if op.kind is Kind.STOP:
                outcome = await self._procedure.stop(op)
            elif op.kind is Kind.SLEEP:
                outcome = await self._procedure.sleep(op)
            else:
                outcome = await self._procedure.switch(op, self.spec(op.model or ""))
            record = await self.history.finished(op, outcome)
            self._observers.finished(record)
            log.info("switch ends", outcome=outcome, duration=record.duration, **op.timings)
            op.future.set_result(record)
        except OrchestratorError as err:
            err.details.setdefault("switch_id", op.id)
            record = await self.history.finished(op, outcome_of(err), err.to_body()["error"])
            self._observers.finished(record)
            log.error("switch fails", outcome=record.outcome, error=err.message)
            op.future.set_exception(err)
            op.future.exception()
        except Exception as err:
            log.exception("switch crashed")
            crashed = OrchestratorError(f"internal error during switch: {err}", switch_id=op.id)
            # The caller is answered even if the record cannot be kept.
            with contextlib.suppress(Exception):
                failed = await self.history.finished(op, Outcome.FAILED, crashed.to_body()["error"])
                self._observers.finished(failed)
            op.future.set_exception(crashed)
            op.future.exception()
        finally:
            # After the answer: removals of stopped models may still be finishing, and the
            # next operation should start from a clean slate.
            try:
                await self.runtime.settle()
            except DockerError as err:
                log.warning("removing a stopped model's containers failed", error=err.message)
            structlog.contextvars.unbind_contextvars("switch_id", "model")
