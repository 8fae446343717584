"""The listening socket: bounded connections, a header deadline, and quiet exhaustion.

A stranger can open connections and never send a request, or send one slowly. aiohttp
closes a connection that has no complete request within its keep-alive timeout, which
the daemon sets to ``header_timeout``, and so do the connections while they answer plain
probes themselves (``probes``). Past ``max_connections`` open at once, a new one
closes the oldest connection that is not serving a request, so that /health can always
be answered; and the daemon raises its descriptor limit at start so that the bound is
reached long before the system's.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .probes import PlainProbes, ProbeConnection

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Descriptors kept for everything but client connections: docker, compose, engines,
# the database, log files.
RESERVED_DESCRIPTORS = 256
EXHAUSTION_LOG_INTERVAL = 60.0
_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_descriptor_limit() -> int:
    """Lift the soft limit on open files to the hard one; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def freeze_startup_heap() -> None:
    """Set what start-up built aside from the cyclic garbage collector, once it is built.

    The modules, settings, schemas and models loaded at start live as long as the
    process, yet a full collection walks every one of them: tens of milliseconds on the
    event loop, whenever the allocation counts say so (a switch, which allocates, is a
    likely time). Frozen, they are never walked again; a full collection then walks only
    what was made since. The garbage made while starting is collected first, so none of
    it is kept for good.
    """
    gc.collect()
    gc.freeze()


def connection_bound(setting: int, descriptor_limit: int) -> int:
    """``max_connections``, or what the descriptor limit leaves for clients."""
    if setting > 0:
        return setting
    return max(64, min(descriptor_limit - RESERVED_DESCRIPTORS, 16_384))


class ConnectionGuard:
    """Counts which connections are serving a request; evicts idle ones when full."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        # A plain dict: every request passes here, and Counter's arithmetic is Python code.
        self._busy: dict[RequestHandler, int] = {}
        self._open: dict[ProbeConnection, None] = {}  # oldest first
        self.evicted = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        busy = self._busy
        busy[protocol] = busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = busy[protocol] - 1
            if left:
                busy[protocol] = left
            else:
                del busy[protocol]

    def factory(self, server: web.Server, probes: PlainProbes) -> Callable[[], ProbeConnection]:
        """The protocol factory for the listening socket: connections that answer plain
        probes themselves and hand the rest to aiohttp's server."""
        connections = self._open

        def make() -> ProbeConnection:
            live = [c for c in connections if c.is_open()]
            if len(live) >= self.max_connections:
                # Oldest first: a connection that never sent a request ages out first.
                victim = next((c for c in live if c.handler not in self._busy), None)
                if victim is not None:
                    victim.close()
                    self.evicted += 1
            connection = ProbeConnection(server, probes, lost=self._forget)
            connections[connection] = None
            return connection

        return make

    def _forget(self, connection: ProbeConnection) -> None:
        self._open.pop(connection, None)


async def listen(
    runner: web.AppRunner, guard: ConnectionGuard, host: str, port: int, probes: PlainProbes
) -> asyncio.Server:
    """Start accepting on host:port through the guard; close the result to stop."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(guard.factory(server, probes), host, port, reuse_address=True)


class QuietExhaustion:
    """An event-loop exception handler that reports running out of descriptors once a minute.

    asyncio reports each failed accept, and each connection that fails for lack of
    descriptors, through the loop's exception handler; under a flood that is thousands
    of tracebacks a second.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if not isinstance(error, OSError) or error.errno not in _EXHAUSTION:
            loop.default_exception_handler(context)
            return
        now = self._clock()
        if self._last is not None and now - self._last < EXHAUSTION_LOG_INTERVAL:
            self._suppressed += 1
            return
        log.error(
            "out of file descriptors: connections are being refused",
            error=str(error),
            suppressed_since_last=self._suppressed,
            limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        self._last = now
        self._suppressed = 0
