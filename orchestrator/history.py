"""What the switcher did: each switch or stop as an operation while it runs, a record after.

An operation is what a caller holds (its id, its future); a record is what the store keeps
and /switches shows. Both carry an ``Outcome``; the same enum is used by the switcher, the
store, the answers and the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .errors import Cancelled, ModelNotCached, ModelUnusable

if TYPE_CHECKING:
    from .store import Store

# Operations kept in memory for /switches/<id> while they run and a while after.
RECENT_OPERATIONS = 200


class Outcome(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    NOOP = "noop"
    FAILED = "failed"
    REFUSED = "refused"
    CANCELLED = "cancelled"


class Kind(StrEnum):
    SWITCH = "switch"
    STOP = "stop"
    DIED = "died"  # a model's engine exited behind the daemon's back
    SLEEP = "sleep"  # the awake model put to sleep, none woken (POST /sleep, its ttl)


@dataclass(frozen=True)
class SwitchRecord:
    id: str
    kind: Kind
    from_model: str | None
    to_model: str | None
    requested_at: float
    finished_at: float | None
    outcome: Outcome
    duration: float | None
    error: dict[str, Any] | None
    # Seconds spent in each phase (drain, stop, up, ready), for people and the benchmark.
    timings: dict[str, float] | None = None
    # How the model came up: "warm" (woken from sleep) or "cold" (its container started).
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _future() -> asyncio.Future[SwitchRecord]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Operation:
    kind: Kind
    model: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    requested_at: float = field(default_factory=time.time)
    future: asyncio.Future[SwitchRecord] = field(default_factory=_future)
    outcome: Outcome = Outcome.PENDING
    from_model: str | None = None
    started_monotonic: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False  # POST /stop called the switch off
    path: str | None = None  # "warm" or "cold", once the model came up

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "outcome": self.outcome,
            "requested_at": self.requested_at,
        }


class History:
    """Operations by id, their records in the store, and the last one finished."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._recent: dict[str, Operation] = {}
        self.last: SwitchRecord | None = None

    def remember(self, op: Operation) -> None:
        self._recent[op.id] = op
        while len(self._recent) > RECENT_OPERATIONS:
            self._recent.pop(next(iter(self._recent)))

    def operation(self, op_id: str) -> Operation | None:
        return self._recent.get(op_id)

    def record(
        self,
        op: Operation,
        *,
        finished: bool = False,
        error: dict[str, Any] | None = None,
        outcome: Outcome | None = None,
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
            outcome=outcome or op.outcome,
            duration=duration,
            error=error,
            timings={k: round(v, 4) for k, v in op.timings.items()} or None,
            path=op.path,
        )

    async def begun(self, op: Operation) -> None:
        op.outcome = Outcome.RUNNING
        op.started_monotonic = self._clock()
        await self._store.save_switch(self.record(op))

    async def finished(
        self, op: Operation, outcome: Outcome, error: dict[str, Any] | None = None
    ) -> SwitchRecord:
        """Keep the finished operation's record. The operation shows its outcome only once
        the record is stored: whoever asks by id then finds the record, timings and all.
        Resolve its future right after, with no await between."""
        record = self.record(op, finished=True, error=error, outcome=outcome)
        self.last = record
        await self._store.save_switch(record)
        op.outcome = outcome
        return record

    async def died(self, model_id: str, error: dict[str, Any]) -> SwitchRecord:
        """Keep a record of the ready model's death, with its error (and log tail)."""
        op = Operation(kind=Kind.DIED, model=None, from_model=model_id)
        op.started_monotonic = self._clock()
        record = self.record(op, finished=True, error=error, outcome=Outcome.FAILED)
        await self._store.save_switch(record)
        return record

    async def get(self, op_id: str) -> SwitchRecord | None:
        return await self._store.get_switch(op_id)

    async def recent(self, limit: int) -> list[SwitchRecord]:
        return await self._store.recent_switches(limit=limit)


def outcome_of(err: Exception) -> Outcome:
    """How an operation that raised ``err`` ended."""
    if isinstance(err, Cancelled):
        return Outcome.CANCELLED
    if isinstance(err, ModelNotCached | ModelUnusable):
        return Outcome.REFUSED
    return Outcome.FAILED
