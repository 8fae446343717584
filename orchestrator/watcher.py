"""Watching the model containers: docker events and a probe of the ready engine.

The watcher only looks and reports. It keeps the view of each service's container that
/status and the logs read, tells the switcher (a ``NoticeSink``) when the ready engine's
container dies or stops answering, and never changes the switcher's state itself: the
switcher's worker decides what a notice means.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from .docker import ContainerEvent, ContainerInfo
from .runtime import ModelRuntime
from .tasks import cancel_all

log = structlog.get_logger(__name__)

EventSource = Callable[[], AsyncIterator[ContainerEvent]]


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


class NoticeSink(Protocol):
    def notify(self, notice: Notice) -> None: ...


@dataclass(frozen=True)
class ProbeTarget:
    """The ready engine: what to probe, and which container answers for it."""

    container_id: str
    service: str
    url: str


class Watcher:
    def __init__(
        self, runtime: ModelRuntime, *, probe_interval: float = 2.0, probe_failures: int = 3
    ) -> None:
        self.runtime = runtime
        self.probe_interval = probe_interval
        self.probe_failures = probe_failures
        self._containers: dict[str, ContainerInfo] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_probes = 0
        self._probed: str | None = None  # the container the failures count for

    # -- the container view --------------------------------------------------------

    def container(self, service: str) -> ContainerInfo | None:
        """What was last seen of the service's container; None when it has none."""
        return self._containers.get(service)

    def saw(self, info: ContainerInfo) -> None:
        self._containers[info.service] = info

    def forget(self, services: Iterable[str]) -> None:
        for service in services:
            self._containers.pop(service, None)

    def saw_all(self, containers: Iterable[ContainerInfo]) -> None:
        self._containers = {c.service: c for c in containers}

    # -- lifecycle -------------------------------------------------------------------

    def start(
        self,
        sink: NoticeSink,
        target: Callable[[], ProbeTarget | None],
        events: EventSource | None = None,
    ) -> None:
        self._tasks.append(asyncio.create_task(self._probe(sink, target), name="prober"))
        if events is not None:
            self._tasks.append(asyncio.create_task(self._watch(sink, events), name="watcher"))

    async def close(self) -> None:
        await cancel_all(self._tasks)

    # -- docker events ----------------------------------------------------------------

    async def _watch(self, sink: NoticeSink, events: EventSource) -> None:
        """Keep the container view current from docker events; report deaths."""
        backoff = 1.0
        while True:
            try:
                async for event in events():
                    backoff = 1.0
                    await self._on_event(sink, event)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("event stream lost; resubscribing", error=str(err), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            with contextlib.suppress(Exception):
                self.saw_all(await self.runtime.containers())

    async def _on_event(self, sink: NoticeSink, event: ContainerEvent) -> None:
        if event.action == "destroy":
            known = self._containers.get(event.service)
            if known is not None and known.id == event.container_id:
                del self._containers[event.service]
        elif event.action in {"create", "start", "die", "stop", "restart", "oom", "kill"}:
            info = await self.runtime.inspect(event.container_id)
            if info is not None:
                self.saw(info)
        if event.action == "die":
            sink.notify(ModelDied(event.container_id, event.service, event.exit_code))

    # -- the probe -------------------------------------------------------------------

    async def _probe(self, sink: NoticeSink, target: Callable[[], ProbeTarget | None]) -> None:
        """Between switches, probe the ready engine, so that a hung one turns /health 503."""
        while True:
            await asyncio.sleep(self.probe_interval)
            ready = target()
            if ready is None:
                continue
            if ready.container_id != self._probed:
                self._probed, self._failed_probes = ready.container_id, 0
            ok = await self.runtime.probe(ready.url)
            self._failed_probes = 0 if ok else self._failed_probes + 1
            if ok or self._failed_probes >= self.probe_failures:
                sink.notify(ProbeResult(ready.container_id, ok))
            if not ok and self._failed_probes == 1:
                # A dead container is reported by events; this catches a missed event.
                with contextlib.suppress(Exception):
                    info = await self.runtime.inspect(ready.container_id)
                    if info is None or not info.running:
                        code = info.exit_code if info else None
                        sink.notify(ModelDied(ready.container_id, ready.service, code))
