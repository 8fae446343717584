"""HTTP/1.1 to the engine on kept-alive connections, with as little work per request as can be.

aiohttp's client does far more than talking to an engine on this host needs (cookies,
redirects, proxies, content decoding, tracing, a layer of objects per request), and on
the gateway's path that work was a large part of what the gateway added to every request
and streamed token. This one writes the request in one piece from the bytes it was given
and hands the answer to llhttp (through httptools, as uvicorn does): a parser kept by
Node.js and hardened against smuggling and broken chunking, which calls back once per
piece of body, so a streamed token costs one Python call here.

Only plain ``http://host:port`` engines are spoken to here; the gateway sends anything
else through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import httptools

CONNECT_TIMEOUT = 10.0
# Read from the engine no further ahead of a slow client than this.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# llhttp puts no bound on a head; an engine gone wrong must not fill the memory with one
# that never ends.
MAX_HEAD = 64 * 1024


class UpstreamFailed(Exception):
    """The engine could not be reached, or broke off its answer."""


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    length: int | None  # the body's, when the engine said it; None when chunked or to EOF


class Connection(asyncio.Protocol):
    """One connection to the engine: one request at a time, its answer read as it comes.

    Each request gets a parser of its own (a small C struct): llhttp cannot be told that an
    answer belongs to a HEAD request, so after one it would take the next answer's bytes
    for the body that HEAD's Content-Length announced.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Head] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._error: BaseException | None = None
        self._no_body = False
        # "idle" (no request out), "head", "body" or "done" (the answer is complete).
        self._state = "idle"
        self._head_size = 0
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._length: int | None = None
        self._chunked = False
        self.reusable = False
        self.got_bytes = False
        # Takes each piece of body as it comes, while it says it can take more; None: the
        # pieces wait for ``read``.
        self._sink: Callable[[bytes], bool] | None = None

    # -- driven by the gateway ---------------------------------------------------------

    def send(self, request: bytes, *, no_body: bool) -> None:
        """Write a whole request; its answer is then awaited with ``head`` and ``read``."""
        assert self.transport is not None and self._state == "idle"
        self._parser = httptools.HttpResponseParser(self)
        self._state, self._no_body, self.got_bytes = "head", no_body, False
        self._head_size = 0
        self.reusable = False
        self._sink = None
        self._head = self._loop.create_future()
        self.transport.write(request)

    def forward(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the body's next pieces to ``sink`` as they arrive, from the connection's
        own callback, until it answers False (it took that piece, and can take no more
        for now); ``read`` then returns the pieces after it, and the end. Nothing is
        forwarded while pieces wait to be read: they would be overtaken."""
        if not self._chunks:
            self._sink = sink

    async def head(self) -> Head:
        return await self._head

    async def read(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        while not self._chunks:
            if self._state in ("done", "idle"):
                return b""
            if self._error is not None:
                raise UpstreamFailed(str(self._error) or "connection lost") from self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def recycle(self) -> bool:
        """Ready the connection for another request, if its answer was read to the end."""
        if not self.reusable or self.transport is None or self.transport.is_closing():
            return False
        if self._state != "done" or self._chunks:
            return False
        self._state = "idle"
        return True

    # -- asyncio's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have their methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self._state == "body" and self._length is None and not self._chunked:
            # A body of no announced length ends when the engine closes; llhttp is not told
            # (httptools has no call for the end of the input), so the end is noted here.
            self._state = "done"
        elif self._state in ("head", "body"):
            self._fail(exc or ConnectionResetError("the engine closed the connection"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            # Raised by one of the callbacks below, which says what was wrong.
            cause = err.__context__
            self._broken(cause if isinstance(cause, UpstreamFailed) else UpstreamFailed(err))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            self._broken(UpstreamFailed(f"a broken answer from the engine: {err}"))
        else:
            if self._state == "head":
                self._head_size += len(data)
                if self._head_size > MAX_HEAD:
                    self._broken(UpstreamFailed("the engine's answer has a head past 64 KiB"))
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # -- llhttp's callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != "head":
            raise UpstreamFailed("the engine sent bytes after its answer")
        self._reason, self._headers = b"", []
        self._length, self._chunked = None, False

    def on_status(self, status: bytes) -> None:
        self._reason += status  # in pieces when the status line is cut between reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state != "head":
            return  # a trailer: nothing the gateway passes on
        # llhttp drops the blanks before a value but keeps those after it.
        key, text = name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")
        lowered = key.lower()
        if lowered == "content-length":
            self._length = int(text)  # llhttp has checked it is a number
        elif lowered == "transfer-encoding":
            self._chunked = text.rsplit(",", 1)[-1].strip().lower() == "chunked"
        self._headers.append((key, text))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            raise UpstreamFailed("the engine switched protocols, which the gateway cannot relay")
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        if self._no_body:
            # The answer to a HEAD ends with its head, whatever length it announces.
            self._state = "done"
            self.reusable = self._parser.should_keep_alive()
        else:
            self._state = "body"
        if not self._head.done():
            reason = self._reason.decode("latin-1")
            self._head.set_result(Head(status, reason, self._headers, self._length))

    def on_body(self, body: bytes) -> None:
        if self._state != "body":
            raise UpstreamFailed("the engine sent a body where none belongs")
        sink = self._sink
        if sink is not None:
            if not sink(body):
                self._sink = None
            return
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._state == "body":
            self._state = "done"
            # False after Connection: close, from an HTTP/1.0 engine, or for a body to EOF.
            self.reusable = self._parser.should_keep_alive()

    # -- the rest ------------------------------------------------------------------------

    def _broken(self, err: UpstreamFailed) -> None:
        self._fail(err)
        self.close()

    def _fail(self, err: BaseException) -> None:
        self.reusable = False
        self._error = err
        if not self._head.done():
            self._head.set_exception(UpstreamFailed(str(err) or "connection lost"))
            self._head.exception()  # retrieved: an answer no one waits for is no warning

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Pool:
    """Idle kept-alive connections per engine address, newest first."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def connect(self, host: str, port: int) -> tuple[Connection, bool]:
        """A connection to host:port, and whether it was kept from before."""
        idle = self._idle.get((host, port))
        while idle:
            connection = idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, connection = await loop.create_connection(Connection, host, port)
        except (OSError, TimeoutError) as err:
            raise UpstreamFailed(f"cannot connect to {host}:{port}: {err}") from err
        return connection, False

    def release(self, host: str, port: int, connection: Connection) -> None:
        """Keep the connection for the next request if its answer was read to the end."""
        if connection.recycle():
            self._idle.setdefault((host, port), []).append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def request_bytes(
    method: str,
    target: str,
    host: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """The whole request as it goes on the wire."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")]
    for name, value in headers:
        lines.append(name + b": " + value + b"\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
