"""The switcher: one owner of which model holds the GPU.

State lives in an explicit machine (idle, starting, ready, stopping, failed) and
changes in one method, ``_enter``, called only from the worker task. Callers ask
for outcomes (``switch_to``, ``stop``) and await them; they never read a state
and then act on it, so they cannot race a transition. Requests queue in order; a
request for a model that is already being started, or already queued, joins that
operation instead of adding a swap.

The watcher (docker events plus a short probe loop) only reports what it sees;
the worker decides what a report means for the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

import structlog

from .cache import Verdicts
from .compose import ModelSpec
from .docker import ContainerEvent, ContainerInfo
from .errors import (
    Cancelled,
    DockerError,
    ModelDisabled,
    ModelExited,
    ModelNotCached,
    ModelNotFound,
    ModelUnusable,
    OrchestratorError,
    StartTimeout,
)
from .runtime import ModelRuntime
from .store import Store, SwitchRecord

log = structlog.get_logger(__name__)

# Readiness is polled this often while a model starts: the benchmark's target is
# to notice it within 100 ms of the engine answering.
READY_POLL_INTERVAL = 0.05
# Container state is checked this often while waiting, to catch an engine that exits.
EXIT_CHECK_INTERVAL = 0.5
LOG_TAIL_LINES = 40
DESIRED_MODEL_KEY = "desired_model"


class State(StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.IDLE: frozenset({State.STARTING, State.STOPPING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.IDLE, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.IDLE}),
}


class IllegalTransition(RuntimeError):
    pass


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background tasks and wait until each has ended, whatever it raised."""
    for task in tasks:
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()


@dataclass(frozen=True)
class Status:
    """A snapshot: readers get a consistent view without asking the worker."""

    state: State = State.IDLE
    active: str | None = None  # the model whose containers hold the GPU, as far as we know
    target: str | None = None  # the model being started, during a switch
    since: float = field(default_factory=time.time)
    reason: str | None = None
    upstream: str | None = None  # base URL of the ready model's engine
    engine_container: str | None = None
    healthy: bool = False  # the ready model's last probe answered 200

    def with_changes(self, **changes: Any) -> Status:
        return replace(self, **changes)


@dataclass
class Operation:
    kind: Literal["switch", "stop"]
    model: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    requested_at: float = field(default_factory=time.time)
    future: asyncio.Future[SwitchRecord] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    outcome: str = "pending"
    from_model: str | None = None
    started_monotonic: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False  # POST /stop called the switch off

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "outcome": self.outcome,
            "requested_at": self.requested_at,
        }


@dataclass(frozen=True)
class ModelDied:
    container_id: str
    service: str
    exit_code: int | None


@dataclass(frozen=True)
class ProbeResult:
    container_id: str | None
    healthy: bool


Notice = ModelDied | ProbeResult


class Switcher:
    def __init__(
        self,
        *,
        models: Mapping[str, ModelSpec],
        runtime: ModelRuntime,
        store: Store,
        verdicts: Verdicts,
        rollback: bool = True,
        restore_on_start: bool = True,
        probe_interval: float = 2.0,
        probe_failures: int = 3,
        preload: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = dict(models)
        self.runtime = runtime
        self.store = store
        self.verdicts = verdicts
        self.rollback = rollback
        self.restore_on_start = restore_on_start
        self.probe_interval = probe_interval
        self.probe_failures = probe_failures
        self.preload = preload
        self._clock = clock
        # Waits for the requests in flight on a model before it is stopped (the gateway's).
        self.drain: Callable[[str], Awaitable[int]] | None = None
        self.status = Status()
        self.last_switch: SwitchRecord | None = None
        # What the watcher last saw of each service's container; read by /status.
        self.containers: dict[str, ContainerInfo] = {}
        self._current: Operation | None = None
        self._pending: deque[Operation] = deque()
        self._notices: deque[Notice] = deque()
        self._wakeup = asyncio.Event()
        self._recent: dict[str, Operation] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_probes = 0
        # The start under way, which POST /stop may cancel.
        self._starting: asyncio.Task[None] | None = None
        self._service_model = {s: m.id for m in self.models.values() for s in m.services}
        # Models that may not be switched to; the registry keeps this current.
        self.disabled: frozenset[str] = frozenset()
        # Called with each new status; /events and metrics hang off this.
        self.listeners: list[Callable[[Status], None]] = []
        # Called with each discrete happening (switch requested or finished, rollback,
        # death): /events, metrics.
        self.event_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # Called when the worker lets go of an operation, after its clean-up.
        self.done_listeners: list[Callable[[], None]] = []

    # -- what callers use ------------------------------------------------------

    @property
    def switch_under_way(self) -> bool:
        """True while an accepted request will change what runs (queued or running)."""
        status = self.status
        for op in self.queued():
            if op.kind == "stop" and status.active is not None:
                return True
            if op.kind == "switch" and not (
                status.state is State.READY and status.active == op.model
            ):
                return True
        return False

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
        self.models = dict(models)
        self.disabled = disabled
        self._service_model = {s: m.id for m in self.models.values() for s in m.services}

    def involves(self, model_id: str) -> bool:
        """Whether the model is loaded, being started, or waiting in the queue."""
        status = self.status
        return model_id in {status.active, status.target} or any(
            model_id in {op.model, op.from_model} for op in self.queued()
        )

    def preflight(self, spec: ModelSpec) -> None:
        """Refuse, before the GPU is touched, a model whose weights are not all on disk."""
        if spec.id in self.disabled:
            raise ModelDisabled(
                f"model {spec.id} is disabled; enable it with POST /models/{spec.id}/enable",
                model=spec.id,
            )
        if spec.unusable:
            raise ModelUnusable(
                f"model {spec.id} cannot be run as its compose file says: {spec.unusable};"
                " see `model-orchestrator check`",
                model=spec.id,
            )
        verdict = self.verdicts.of(spec)
        if verdict is None or verdict.status == "present":
            return
        if spec.checkpoint is not None:
            raise ModelNotCached(verdict.reason, model=spec.id, path=str(spec.checkpoint))
        raise ModelNotCached(
            verdict.reason, model=spec.id, repo=spec.repo, cache_path=str(self.verdicts.hub_dir)
        )

    async def switch_to(self, model_id: str) -> Operation:
        """Accept a switch and return its operation; await ``op.future`` for the outcome."""
        spec = self.spec(model_id)
        await asyncio.to_thread(self.preflight, spec)
        joined = self._join("switch", model_id)
        if joined is not None:
            return joined
        op = Operation(kind="switch", model=model_id)
        if (
            self._current is None
            and not self._pending
            and self.status.state is State.READY
            and self.status.active == model_id
        ):
            op.outcome = "noop"
            op.from_model = model_id
            op.future.set_result(self._record(op, finished=True))
            self._remember(op)
            return op
        # Enqueue before any await, so a racing request for the same model finds this one.
        self._enqueue(op)
        await self.store.set_value(DESIRED_MODEL_KEY, model_id)
        return op

    async def stop(self) -> Operation:
        """Unload whatever runs; a switch under way or waiting is called off first."""
        await self._call_off_switches()
        joined = self._join("stop", None)
        if joined is not None:
            return joined
        op = self._enqueue(Operation(kind="stop", model=None))
        await self.store.set_value(DESIRED_MODEL_KEY, None)
        return op

    async def _call_off_switches(self) -> None:
        """Switches accepted before a stop will not happen: their callers get 409."""
        for op in [op for op in self._pending if op.kind == "switch"]:
            self._pending.remove(op)
            op.outcome = "cancelled"
            error = Cancelled(
                f"the switch to {op.model} was cancelled by POST /stop", model=op.model
            )
            op.future.set_exception(error)
            op.future.exception()
            record = self._record(op, finished=True, error=error.to_body()["error"])
            self._finished(record)
            await self.store.save_switch(record)
        current = self._current
        if current is not None and current.kind == "switch":
            current.cancelled = True
            if self._starting is not None:
                self._starting.cancel()

    def operation(self, op_id: str) -> Operation | None:
        return self._recent.get(op_id)

    def queued(self) -> list[Operation]:
        return ([self._current] if self._current else []) + list(self._pending)

    def _join(self, kind: str, model: str | None) -> Operation | None:
        current = self._current
        if current and current.kind == kind and current.model == model:
            return current
        for op in self._pending:
            if op.kind == kind and op.model == model:
                return op
        return None

    def _enqueue(self, op: Operation) -> Operation:
        self._pending.append(op)
        self._remember(op)
        self._wakeup.set()
        self._emit("switch_requested", switch_id=op.id, operation=op.kind, model=op.model)
        return op

    def _emit(self, event: str, **data: Any) -> None:
        for listener in self.event_listeners:
            listener(event, data)

    def _finished(self, record: SwitchRecord) -> None:
        self.last_switch = record
        self._emit(
            "switch_finished",
            switch_id=record.id,
            operation=record.kind,
            from_model=record.from_model,
            to_model=record.to_model,
            outcome=record.outcome,
            duration=record.duration,
            error=record.error,
        )

    def _remember(self, op: Operation) -> None:
        self._recent[op.id] = op
        while len(self._recent) > 200:
            self._recent.pop(next(iter(self._recent)))

    # -- lifecycle -------------------------------------------------------------

    async def start(self, events: Any = None) -> None:
        """Reconcile with Docker, then run the worker, the prober and the event watcher if given."""
        await self._reconcile()
        self._tasks.append(asyncio.create_task(self._work(), name="switcher-worker"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="switcher-prober"))
        if events is not None:
            self._tasks.append(asyncio.create_task(self._watch(events), name="switcher-watcher"))

    async def close(self) -> None:
        """Stop our tasks; the running model is left running for the next daemon to adopt."""
        await cancel_all(self._tasks)
        for op in [*self._pending, *([self._current] if self._current else [])]:
            if not op.future.done():
                op.future.set_exception(
                    OrchestratorError(
                        "the daemon is shutting down; the request was not carried out"
                    )
                )
                op.future.exception()  # mark retrieved: nobody may be waiting

    async def _reconcile(self) -> None:
        containers = await self.runtime.containers()
        self.containers = {c.service: c for c in containers}
        running: dict[str, list[ContainerInfo]] = {}
        for container in containers:
            model = self._service_model.get(container.service)
            if model is not None and container.running:
                running.setdefault(model, []).append(container)
        desired = await self.store.get_value(DESIRED_MODEL_KEY)
        log.info("reconcile", running=sorted(running), desired=desired)
        if len(running) == 1:
            (model_id,) = running
            spec = self.models[model_id]
            engine = self._engine_of(spec, running[model_id])
            url = self.runtime.upstream_url(spec, engine)
            if url and engine and await self.runtime.probe(url + spec.health_path):
                self._enter(State.STARTING, target=model_id, reason="adopting a running model")
                self._enter(
                    State.READY,
                    active=model_id,
                    target=None,
                    upstream=url,
                    engine_container=engine.id,
                    healthy=True,
                    reason="adopted at daemon start",
                )
                log.info("adopted", model=model_id, upstream=url)
                return
        if running:
            # Starting, unhealthy, or more than one model: let an ordinary switch sort it out,
            # which stops every other model first and waits for this one's health.
            model_id = desired if desired in running else sorted(running)[0]
            self._enqueue(Operation(kind="switch", model=model_id))
        elif self.preload in self.models:
            self._enqueue(Operation(kind="switch", model=self.preload))
        elif desired in self.models and self.restore_on_start:
            self._enqueue(Operation(kind="switch", model=desired))

    # -- the one place state changes ------------------------------------------

    def _enter(self, state: State, **changes: Any) -> None:
        current = self.status.state
        if state is not current and state not in TRANSITIONS[current]:
            raise IllegalTransition(f"{current} -> {state}")
        self.status = self.status.with_changes(state=state, since=time.time(), **changes)
        for listener in self.listeners:
            listener(self.status)
        log.info(
            "state",
            state=str(state),
            previous=str(current),
            active=self.status.active,
            target=self.status.target,
            reason=self.status.reason,
        )

    # -- the worker --------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._notices or self._pending:
                while self._notices:
                    self._apply_notice(self._notices.popleft())
                if self._pending:
                    op = self._pending.popleft()
                    self._current = op
                    try:
                        await self._run(op)
                    finally:
                        self._current = None
                        # Callers that held back while this operation was queued must
                        # look again: its end is not always a change of state.
                        for on_done in self.done_listeners:
                            on_done()

    def notify(self, notice: Notice) -> None:
        self._notices.append(notice)
        self._wakeup.set()

    def _apply_notice(self, notice: Notice) -> None:
        status = self.status
        # Reports about containers other than the ready engine are stale: a switch moved on.
        if status.state is not State.READY or notice.container_id != status.engine_container:
            return
        if isinstance(notice, ModelDied):
            code = "" if notice.exit_code is None else f" with exit code {notice.exit_code}"
            self._emit("model_died", model=status.active, exit_code=notice.exit_code)
            self._enter(
                State.FAILED,
                active=None,
                upstream=None,
                engine_container=None,
                healthy=False,
                reason=f"model {status.active} died behind the daemon's back: "
                f"its container exited{code}",
            )
        elif notice.healthy != status.healthy:
            reason = (
                None if notice.healthy else f"{status.active} stopped answering its health check"
            )
            self._enter(State.READY, healthy=notice.healthy, reason=reason)

    async def _run(self, op: Operation) -> None:
        op.outcome = "running"
        op.from_model = self.status.active
        op.started_monotonic = self._clock()
        structlog.contextvars.bind_contextvars(switch_id=op.id, model=op.model)
        try:
            await self.store.save_switch(self._record(op))
            log.info("switch begins", kind=op.kind, from_model=op.from_model)
            if op.kind == "stop":
                await self._drain(op)
                await self._stop_all()
                await self.runtime.settle()
                op.outcome = "ok"
            else:
                assert op.model is not None
                op.outcome = await self._switch(op, self.models[op.model])
            record = self._record(op, finished=True)
            self._finished(record)
            await self.store.save_switch(record)
            log.info("switch ends", outcome=op.outcome, duration=record.duration, **op.timings)
            op.future.set_result(record)
        except OrchestratorError as err:
            if op.outcome in {"running", "pending"}:
                op.outcome = (
                    "cancelled"
                    if isinstance(err, Cancelled)
                    else "refused"
                    if isinstance(err, ModelNotCached | ModelUnusable)
                    else "failed"
                )
            err.details.setdefault("switch_id", op.id)
            record = self._record(op, finished=True, error=err.to_body()["error"])
            self._finished(record)
            await self.store.save_switch(record)
            log.error("switch fails", outcome=op.outcome, error=err.message)
            op.future.set_exception(err)
            op.future.exception()
        except Exception as err:
            op.outcome = "failed"
            log.exception("switch crashed")
            wrapped = OrchestratorError(f"internal error during switch: {err}", switch_id=op.id)
            op.future.set_exception(wrapped)
            op.future.exception()
        finally:
            # After the answer: removals of stopped models may still be finishing, and
            # the next operation should start from a clean slate.
            try:
                await self.runtime.settle()
            except DockerError as err:
                log.warning("removing a stopped model's containers failed", error=err.message)
            structlog.contextvars.unbind_contextvars("switch_id", "model")

    async def _switch(self, op: Operation, spec: ModelSpec) -> str:
        status = self.status
        if status.state is State.READY and status.active == spec.id:
            return "noop"
        # Re-checked here: the cache may have changed while the request waited its turn.
        await asyncio.to_thread(self.preflight, spec)
        previous = status.active if status.state is State.READY else None
        await self._drain(op)
        began = self._clock()
        # Creating the target's containers needs no GPU, so it overlaps the old model's
        # stop and takes that work off the switch's critical path.
        preparing = asyncio.create_task(self._prepare(spec))
        try:
            await self._stop_all(except_model=spec.id, target=spec.id)
        finally:
            await preparing
        op.timings["stop"] = self._clock() - began
        try:
            await self._cancellable_start(spec, op)
            return "ok"
        except (ModelExited, StartTimeout, DockerError) as err:
            await self._after_failed_start(spec, previous, err)
            raise

    async def _cancellable_start(self, spec: ModelSpec, op: Operation) -> None:
        """Start the model in a task of its own, so that POST /stop can call it off."""
        if op.cancelled:
            raise Cancelled(f"the switch to {spec.id} was cancelled by POST /stop", model=spec.id)
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
            self._enter(State.IDLE, active=None, upstream=None, engine_container=None, reason=None)
            raise Cancelled(
                f"the switch to {spec.id} was cancelled by POST /stop", model=spec.id
            ) from None
        finally:
            self._starting = None

    async def _drain(self, op: Operation) -> None:
        """Let the ready model finish the requests it is answering, within the drain bound."""
        status = self.status
        if self.drain is None or status.state is not State.READY or status.active is None:
            return
        began = self._clock()
        self._enter(State.READY, reason=f"finishing requests on {status.active} before a switch")
        cut_off = await self.drain(status.active)
        op.timings["drain"] = self._clock() - began
        if cut_off:
            op.timings["cut_off"] = cut_off

    async def _after_failed_start(
        self, spec: ModelSpec, previous: str | None, err: OrchestratorError
    ) -> None:
        """Stop the model that failed and, when rollback is on, bring the previous one back.

        The state stays failed while the broken model is cleared away: nothing is
        serving, and /status should say why.
        """
        self._enter(State.FAILED, active=None, target=None, healthy=False, reason=err.message)
        err.details["rolled_back"] = False
        try:
            await self._stop_model(spec)
        except DockerError as stop_err:
            err.details["stop_error"] = stop_err.message
            return
        if not previous:
            return
        if not self.rollback:
            err.details["rollback"] = "rollback is off"
            return
        log.warning("rolling back", to_model=previous)
        previous_spec = self.models[previous]
        try:
            await self._start(previous_spec, None)
        except OrchestratorError as rollback_err:
            err.details["rollback_error"] = rollback_err.message
            self._enter(
                State.FAILED,
                reason=f"{err.message}; rollback to {previous} failed too: {rollback_err.message}",
            )
            with contextlib.suppress(DockerError):
                await self._stop_model(previous_spec)
            return
        err.details["rolled_back"] = True
        self._emit("rolled_back", failed_model=spec.id, model=previous, error=err.message)
        err.details["active"] = previous
        err.message += f"; rolled back to {previous}"

    async def _stop_all(self, except_model: str | None = None, target: str | None = None) -> None:
        """Stop every model that has a container up, so that at most one ever holds the GPU."""
        # Exited containers count too: removing them keeps names free and nothing lingers.
        containers = await self.runtime.containers(frozenset(self._service_model))
        up = {self._service_model[c.service] for c in containers}
        status = self.status
        if status.active:
            up.add(status.active)
        for model_id in sorted(up - {except_model} if except_model else up):
            self._enter(
                State.STOPPING,
                active=model_id,
                target=target,
                healthy=False,
                reason=f"stopping {model_id}",
            )
            try:
                await self._stop_model(self.models[model_id])
            except DockerError as err:
                self._enter(State.FAILED, reason=err.message)
                raise
        if self.status.state is not State.IDLE:
            self._enter(
                State.IDLE,
                active=None,
                target=target,
                upstream=None,
                engine_container=None,
                reason=None,
            )

    async def _prepare(self, spec: ModelSpec) -> None:
        try:
            await self.runtime.prepare(spec)
        except DockerError as err:
            # Not fatal: ``up`` creates what is missing and reports the real error.
            log.warning("could not prepare containers", error=err.message)

    async def _stop_model(self, spec: ModelSpec) -> None:
        await self.runtime.stop(spec)
        for service in spec.services:
            self.containers.pop(service, None)

    async def _start(self, spec: ModelSpec, op: Operation | None) -> None:
        self._enter(State.STARTING, target=spec.id, active=None, reason=f"starting {spec.id}")
        began = self._clock()
        await self.runtime.start(spec)
        if op is not None:
            op.timings["up"] = self._clock() - began
        engine, url = await self._wait_ready(spec, began)
        if op is not None:
            op.timings["ready"] = self._clock() - began
        self._failed_probes = 0
        self._enter(
            State.READY,
            active=spec.id,
            target=None,
            upstream=url,
            engine_container=engine.id,
            healthy=True,
            reason=None,
        )

    def _engine_of(self, spec: ModelSpec, containers: list[ContainerInfo]) -> ContainerInfo | None:
        return next((c for c in containers if c.service == spec.engine_service), None)

    async def _wait_ready(self, spec: ModelSpec, began: float) -> tuple[ContainerInfo, str]:
        deadline = began + spec.startup_timeout
        engine: ContainerInfo | None = None
        url: str | None = None
        next_exit_check = 0.0
        while True:
            now = self._clock()
            if now >= next_exit_check or engine is None:
                next_exit_check = now + EXIT_CHECK_INTERVAL
                # Once the engine is known, one inspect is far cheaper than a listing,
                # and keeps the thread pool (and the GIL) quiet while probes are served.
                if engine is None:
                    engine = self._engine_of(
                        spec, await self.runtime.containers(frozenset({spec.engine_service}))
                    )
                else:
                    engine = await self.runtime.inspect(engine.id) or replace(
                        engine, status="removed", exit_code=None
                    )
                # "restarting": exited, and docker is starting it again; the daemon owns
                # restarts (the copy says restart: "no"), so that is a failed start.
                if engine is not None and (not engine.running or engine.status == "restarting"):
                    tail = await self.runtime.logs_tail(engine.id, LOG_TAIL_LINES)
                    cause = (
                        "was killed for lack of memory"
                        if engine.oom_killed
                        else "exited and is being restarted"
                        if engine.status == "restarting"
                        else f"exited with code {engine.exit_code}"
                    )
                    raise ModelExited(
                        f"{spec.id}: the engine container {cause} before it became healthy",
                        model=spec.id,
                        exit_code=engine.exit_code,
                        log_tail=tail,
                    )
                if engine is not None:
                    self.containers[engine.service] = engine
                if engine is not None and url is None:
                    url = self.runtime.upstream_url(spec, engine)
            if (
                engine is not None
                and url is not None
                and await self.runtime.probe(url + spec.health_path)
            ):
                return engine, url
            if self._clock() >= deadline:
                tail = await self.runtime.logs_tail(engine.id, LOG_TAIL_LINES) if engine else ""
                raise StartTimeout(
                    f"{spec.id}: not healthy at {spec.health_path} within "
                    f"{spec.startup_timeout:g} s",
                    model=spec.id,
                    log_tail=tail,
                )
            await asyncio.sleep(READY_POLL_INTERVAL)

    def _record(
        self, op: Operation, *, finished: bool = False, error: dict[str, Any] | None = None
    ) -> SwitchRecord:
        duration = None
        if finished:
            duration = 0.0 if op.started_monotonic is None else self._clock() - op.started_monotonic
        return SwitchRecord(
            id=op.id,
            kind=op.kind,
            from_model=op.from_model,
            to_model=op.model,
            requested_at=op.requested_at,
            finished_at=time.time() if finished else None,
            outcome=op.outcome,
            duration=duration,
            error=error,
            timings={k: round(v, 4) for k, v in op.timings.items()} or None,
        )

    # -- the watcher -------------------------------------------------------------

    async def _watch(self, events: Any) -> None:
        """Keep the container view current from docker events; report deaths to the worker."""
        backoff = 1.0
        while True:
            try:
                async for event in events():
                    backoff = 1.0
                    await self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("event stream lost; resubscribing", error=str(err), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            with contextlib.suppress(Exception):
                self.containers = {c.service: c for c in await self.runtime.containers()}

    async def _on_event(self, event: ContainerEvent) -> None:
        if event.action == "destroy":
            known = self.containers.get(event.service)
            if known is not None and known.id == event.container_id:
                del self.containers[event.service]
        elif event.action in {"create", "start", "die", "stop", "restart", "oom", "kill"}:
            info = await self.runtime.inspect(event.container_id)
            if info is not None:
                self.containers[info.service] = info
        if event.action == "die":
            self.notify(ModelDied(event.container_id, event.service, event.exit_code))

    async def _probe_loop(self) -> None:
        """Between switches, probe the ready model so a hung engine turns /health 503."""
        while True:
            await asyncio.sleep(self.probe_interval)
            status = self.status
            if status.state is not State.READY or self._current is not None or not status.upstream:
                continue
            spec = self.models[status.active] if status.active else None
            if spec is None:
                continue
            ok = await self.runtime.probe(status.upstream + spec.health_path)
            self._failed_probes = 0 if ok else self._failed_probes + 1
            if ok or self._failed_probes >= self.probe_failures:
                self.notify(ProbeResult(status.engine_container, ok))
            if not ok and self._failed_probes == 1:
                # A dead container is reported by events; this catches a missed event.
                with contextlib.suppress(Exception):
                    info = await self.runtime.inspect(status.engine_container or "")
                    if info is None or not info.running:
                        self.notify(
                            ModelDied(
                                status.engine_container or "",
                                spec.engine_service,
                                info.exit_code if info else None,
                            )
                        )
