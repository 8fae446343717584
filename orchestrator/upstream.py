"""HTTP/1.1 to the engine on kept-alive connections, with as little work per request as can be.

aiohttp's client does far more than talking to an engine on this host needs (cookies,
redirects, proxies, content decoding, tracing, a layer of objects per request), and on
the gateway's path that work was a large part of what the gateway added to every request
and streamed token. This one writes the request in one piece from the bytes it was given
and reads the answer with a small parser: its head, then its body by Content-Length, by
chunks, or until the engine closes.

Only plain ``http://host:port`` engines are spoken to here; the gateway sends anything
else through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

CONNECT_TIMEOUT = 10.0
# Read from the engine no further ahead of a slow client than this.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
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
    """One connection to the engine: one request at a time, its answer read as it comes."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: asyncio.Future[Head] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._error: BaseException | None = None
        self._no_body = False
        # Where the parser is: "idle", "head", "length", "chunk-size", "chunk-data",
        # "chunk-end", "trailer", "eof" (body until the engine closes) or "done".
        self._state = "idle"
        self._left = 0
        self.reusable = False
        self.got_bytes = False

    # -- driven by the gateway ---------------------------------------------------------

    def send(self, request: bytes, *, no_body: bool) -> None:
        """Write a whole request; its answer is then awaited with ``head`` and ``read``."""
        assert self.transport is not None and self._state == "idle"
        self._state, self._no_body, self.got_bytes = "head", no_body, False
        self.reusable = False
        self._head = self._loop.create_future()
        self.transport.write(request)

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

    # -- asyncio's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have their methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self._state == "eof":
            self._state = "done"  # a body without length ends when the engine closes
        elif self._state not in ("idle", "done"):
            self._fail(exc or ConnectionResetError("the engine closed the connection"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parse(data)
        except UpstreamFailed as err:
            self._fail(err)
            self.close()
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # -- the parser ----------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        if self._state in ("length", "eof") and not self._buffer:
            # The common case, a piece of a body: no copy into the buffer.
            self._body(data)
            return
        self._buffer += data
        while self._buffer and self._step():
            pass

    def _body(self, data: bytes) -> None:
        if self._state == "eof":
            self._deliver(data)
            return
        piece = data[: self._left]
        self._left -= len(piece)
        self._deliver(piece)
        if not self._left:
            self._finish()
        if len(data) > len(piece):
            raise UpstreamFailed("the engine sent more than the length it announced")

    def _step(self) -> bool:
        """Consume what the buffer holds for the current state; False when it needs more."""
        buffer, state = self._buffer, self._state
        if state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise UpstreamFailed("the engine's answer has a head past 64 KiB")
                return False
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._on_head(head)
            return True
        if state in ("length", "eof"):
            data = bytes(buffer)
            buffer.clear()
            self._body(data)
            return False
        if state == "chunk-size":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size_field = bytes(buffer[:end]).split(b";", 1)[0].strip()
            del buffer[: end + 2]
            try:
                size = int(size_field, 16)
            except ValueError:
                raise UpstreamFailed(f"bad chunk size from the engine: {size_field!r}") from None
            self._left = size
            self._state = "chunk-data" if size else "trailer"
            return True
        if state == "chunk-data":
            piece = bytes(buffer[: self._left])
            del buffer[: len(piece)]
            self._left -= len(piece)
            self._deliver(piece)
            if not self._left:
                self._state = "chunk-end"
            return bool(buffer)
        if state == "chunk-end":
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise UpstreamFailed("a chunk from the engine does not end with CRLF")
            del buffer[:2]
            self._state = "chunk-size"
            return True
        if state == "trailer":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            del buffer[: end + 2]
            if end == 0:
                self._finish()
            return True
        raise UpstreamFailed("the engine sent bytes after its answer")

    def _on_head(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise UpstreamFailed(f"not an HTTP/1.1 answer from the engine: {lines[0]!r}")
        status = int(code)
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        close = version == "HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise UpstreamFailed(f"bad header line from the engine: {line!r}")
            name, value = name.strip(), value.strip()
            lowered = name.lower()
            if lowered == "content-length":
                if not value.isdigit():
                    raise UpstreamFailed(f"bad Content-Length from the engine: {value!r}")
                length = int(value)
            elif lowered == "transfer-encoding":
                chunked = value.lower().endswith("chunked")
            elif lowered == "connection":
                close = "close" in value.lower() or (
                    version == "HTTP/1.0" and "keep-alive" not in value.lower()
                )
            headers.append((name, value))
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        if chunked:
            length = None
        if self._no_body or status in (204, 304):
            self._state = "done"
        elif chunked:
            self._state = "chunk-size"
        elif length is not None:
            self._state, self._left = "length", length
            if not length:
                self._state = "done"
        else:
            self._state, close = "eof", True
        self.reusable = not close
        if not self._head.done():
            self._head.set_result(Head(status, reason, headers, length))

    def _deliver(self, piece: bytes) -> None:
        if piece:
            self._chunks.append(piece)
            self._buffered += len(piece)

    def _finish(self) -> None:
        self._state = "done"

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

    def recycle(self) -> bool:
        """Ready the connection for another request, if its answer was read to the end."""
        if not self.reusable or self.transport is None or self.transport.is_closing():
            return False
        if self._state != "done" or self._buffer or self._chunks:
            return False
        self._state = "idle"
        return True


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
