"""Live events for /events and the dashboard: what the daemon did, as it happens.

Producers call ``publish`` from the event loop and never wait: each subscriber has a
bounded queue, and one that falls behind loses its oldest events rather than slowing
a switch. Every event carries a sequence number, so a client can tell it missed some.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

SUBSCRIBER_QUEUE = 256


@dataclass(frozen=True)
class Event:
    kind: str  # switch_requested, state, switch_finished, rolled_back, model_died, pull, ...
    data: dict[str, Any]
    id: int
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, **self.data}


class EventHub:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._ids = itertools.count(1)

    def publish(self, kind: str, **data: Any) -> None:
        event = Event(kind, data, next(self._ids))
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
