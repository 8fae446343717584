"""Who hears of what the switcher does: typed observers, given to it in one place.

The gateway's traffic, the metrics and the /events feed each implement
``SwitchObserver``; the gateway also drains a model before it stops (``Drain``).
``build_daemon`` hands them to the switcher with ``Switcher.connect``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .history import SwitchRecord
    from .states import Status


class SwitchObserver(Protocol):
    """Told of what the switcher does, from its worker: must not block."""

    def status_changed(self, status: Status) -> None: ...
    def happened(self, event: str, data: Mapping[str, Any]) -> None: ...
    def released(self) -> None:
        """The worker let go of an operation, after its clean-up."""


class Drain(Protocol):
    async def drain(self, model_id: str) -> int:
        """Wait (bounded) for the requests in flight on the model; how many were cut off."""

    def in_flight(self, model_id: str) -> int:
        """How many requests the model is answering now."""


class Observers:
    """The switcher's observers, each told in turn."""

    def __init__(self, observers: Sequence[SwitchObserver] = ()) -> None:
        self._observers = tuple(observers)

    def status_changed(self, status: Status) -> None:
        for observer in self._observers:
            observer.status_changed(status)

    def happened(self, event: str, **data: Any) -> None:
        for observer in self._observers:
            observer.happened(event, data)

    def released(self) -> None:
        for observer in self._observers:
            observer.released()

    def finished(self, record: SwitchRecord) -> None:
        self.happened(
            "switch_finished",
            switch_id=record.id,
            operation=record.kind,
            from_model=record.from_model,
            to_model=record.to_model,
            outcome=record.outcome,
            duration=record.duration,
            error=record.error,
            path=record.path,
        )
