"""Live events for /events and the dashboard: what the daemon did, as it happens.

Producers call ``publish`` from the event loop and never wait: each subscriber has a
bounded queue, and one that falls behind loses its oldest events rather than slowing
a switch. Every event carries a sequence number, so a client can tell it missed some.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pull import PullProgress
    from .states import Status

SUBSCRIBER_QUEUE = 256


def sse_message(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event: its id if it has one, its name, and its data as JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass(frozen=True)
class Event:
    kind: str  # switch_requested, state, switch_finished, rolled_back, model_died, pull, ...
    data: dict[str, Any]
    id: int
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, **self.data}

    @functools.cached_property
    def sse(self) -> bytes:
        """The event as /events sends it, encoded by the first subscriber that writes it:
        a state change is one JSON encoding however many clients follow."""
        return sse_message(self.kind, self.to_json(), self.id)


class EventHub:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._ids = itertools.count(1)

    def close(self) -> None:
        """End every subscription (the daemon stops): each gets None after its events."""
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(None)

    def publish(self, kind: str, **data: Any) -> None:
        event = Event(kind, data, next(self._ids))
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """Events from now on; None once the hub is closed."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class EventFeed:
    """What /events and the dashboard watch, published into the hub: the switcher's states
    and happenings (as its observer) and the catalog's pull progress."""

    def __init__(self, hub: EventHub, serving: Callable[[], bool]) -> None:
        self._hub = hub
        self._serving = serving

    def status_changed(self, status: Status) -> None:
        self._hub.publish(
            "state",
            state=str(status.state),
            active=status.active,
            target=status.target,
            reason=status.reason,
            serving=self._serving(),
        )

    def happened(self, event: str, data: Mapping[str, Any]) -> None:
        self._hub.publish(event, **data)

    def released(self) -> None:
        pass

    def pull(self, model: str, progress: PullProgress) -> None:
        self._hub.publish("pull", model=model, **progress.to_json())
