"""The switcher's queue: accepted switches and stops, the running one first.

A request for what is already queued joins it; a stop calls off the switches before it.
Only the switcher's worker takes operations off; callers only add and look.
"""

from __future__ import annotations

from collections import deque

from .history import Kind, Operation
from .states import Status


class OperationQueue:
    def __init__(self) -> None:
        self.current: Operation | None = None
        self._pending: deque[Operation] = deque()

    def __bool__(self) -> bool:
        return self.current is not None or bool(self._pending)

    def all(self) -> list[Operation]:
        """The running operation, then those waiting, in order of arrival."""
        return ([self.current] if self.current else []) + list(self._pending)

    def has_waiting(self) -> bool:
        return bool(self._pending)

    def add(self, op: Operation) -> None:
        self._pending.append(op)

    def take(self) -> Operation:
        self.current = self._pending.popleft()
        return self.current

    def done(self) -> None:
        self.current = None

    def find(self, kind: Kind, model: str | None) -> Operation | None:
        """The operation a new request for the same thing joins."""
        return next((op for op in self.all() if op.kind is kind and op.model == model), None)

    def withdraw_switches(self) -> list[Operation]:
        """The switches still waiting, taken off the queue (a stop calls them off)."""
        switches = [op for op in self._pending if op.kind is Kind.SWITCH]
        for op in switches:
            self._pending.remove(op)
        return switches

    def will_change(self, status: Status) -> bool:
        """Whether an operation here will change what runs: a stop while something is up,
        a sleep while a model is awake, or a switch to a model that is not the ready one."""
        # /health asks on every probe: look without building a list of the operations.
        current = self.current
        if current is not None and _changes(current, status):
            return True
        pending = self._pending
        return bool(pending) and any(_changes(op, status) for op in pending)

    def involves(self, model_id: str) -> bool:
        return any(model_id in {op.model, op.from_model} for op in self.all())


def _changes(op: Operation, status: Status) -> bool:
    if op.kind is Kind.STOP:
        return status.active is not None or bool(status.asleep)
    if op.kind is Kind.SLEEP:
        return status.active is not None
    return not status.holds(op.model)
