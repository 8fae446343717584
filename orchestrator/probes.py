"""Load balancers' probes answered on the connection, before aiohttp sees them.

A balancer asks /health thousands of times a second, and during a switch those asks
share the machine's cores with docker, compose and the new engine's start. Through
aiohttp each cost the daemon 55-60 us of CPU (a request object, the router, the
middlewares, a response object and its headers); answered here, from the bytes /health
already holds, 22-23 us (benchmarks/health.py). Under a switch, when every process
waits for a core, that difference is most of what the probes waited.

Every connection starts here. llhttp (through httptools) parses what arrives; a request
that ``answer`` takes is answered at once, with the status line and headers aiohttp
would write. At the first request it does not take, and at anything this side does
not handle (a body, an upgrade, a malformed request, a head too long), the connection
is handed to aiohttp's own handler with every byte not yet answered, and stays there:
aiohttp remains what judges and answers everything but the plain probe.

While a connection is here it keeps aiohttp's rule for idle connections: one with no
complete request within ``idle_timeout`` of its start or of its last answer is closed.
A client that sends probes without reading the answers stops being read once the
answers it has not taken fill the transport's buffer.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

# method, path as sent, the headers it names → the status and body to answer, or None
Answer = Callable[[str, str, Mapping[str, str]], tuple[int, bytes] | None]

CONTENT_TYPE = b"application/health+json; charset=utf-8"
# A probe's head is a few hundred bytes; a longer one is aiohttp's to judge.
MAX_HEAD = 8192
# The headers ``answer`` is shown, by their names as llhttp hands them over (lower case).
_SHOWN = {b"host": "Host", b"origin": "Origin", b"sec-fetch-site": "Sec-Fetch-Site"}
# Headers that mean more than a read: a body, or a wish this side does not serve.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


@dataclass(frozen=True)
class PlainProbes:
    """What the connections answer themselves, and how long one may stay idle."""

    answer: Answer
    idle_timeout: float


class ProbeConnection(asyncio.Protocol):
    """One client connection: plain probes answered here, the rest by aiohttp."""

    def __init__(
        self,
        server: web.Server,
        probes: PlainProbes,
        lost: Callable[[ProbeConnection], None],
    ) -> None:
        self._server, self._probes, self._lost = server, probes, lost
        self.transport: asyncio.Transport | None = None
        # aiohttp's handler, once the connection is handed over; None while here.
        self.handler: RequestHandler | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending = bytearray()  # received, not yet answered
        self._answers: list[bytes] = []
        self._in_request = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._plain = True
        self._closing = False
        self._writing_paused = False
        self._reading_paused = False  # by this side, for answers not taken
        self._idle_until = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio's protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._rest_idle()

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)
            return
        if self._closing:
            return
        self._pending += data
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._plain = False
        if not self._plain or len(self._pending) > MAX_HEAD:
            self._hand_over()
            return
        if self._in_request:
            return  # the rest of a request is still to come
        self._pending.clear()
        if self._answers:
            assert self.transport is not None
            self.transport.write(b"".join(self._answers))
            self._answers.clear()
            if self._closing:
                self.transport.close()
            else:
                self._rest_idle()

    def eof_received(self) -> None:
        # Nothing returned: the transport closes, here as under aiohttp's handler.
        if self.handler is not None:
            self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.handler is not None:
            self.handler.connection_lost(exc)
        self._lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.handler is not None:
            self.handler.pause_writing()
        elif self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.handler is not None:
            self.handler.resume_writing()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- llhttp's callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = {}

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        shown = _SHOWN.get(name)
        if shown is not None:
            if shown in self._headers:
                self._plain = False  # two Hosts, say: aiohttp's to judge
            self._headers[shown] = value.decode("utf-8", "surrogateescape")  # as aiohttp
        elif name in _NOT_PLAIN or (name == b"content-length" and value.strip() != b"0"):
            self._plain = False

    def on_body(self, body: bytes) -> None:
        self._plain = False

    def on_message_complete(self) -> None:
        self._in_request = False
        if not self._plain or self._closing:
            return
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._plain = False
            return
        method = self._parser.get_method().decode("latin-1")
        found = self._probes.answer(method, self._url.decode("latin-1"), self._headers)
        if found is None:
            self._plain = False
            return
        status, body = found
        keep_alive = self._parser.should_keep_alive()
        self._answers.append(_answer(version, status, body, method == "HEAD", keep_alive))
        if not keep_alive:
            self._closing = True

    # -- ours --------------------------------------------------------------------------------

    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        """Close at once if idle here; aiohttp's handler closes once its request is done."""
        if self.handler is not None:
            self.handler.force_close()
        elif self.transport is not None:
            self.transport.close()

    def _hand_over(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        transport = self.transport
        assert transport is not None
        handler = self._server()
        self.handler = handler
        handler.connection_made(transport)
        if self._writing_paused:
            handler.pause_writing()
        pending, self._pending = bytes(self._pending), bytearray()
        self._answers.clear()
        if pending:
            handler.data_received(pending)

    def _rest_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle_until = loop.time() + self._probes.idle_timeout
        if self._idle_timer is None:
            self._idle_timer = loop.call_at(self._idle_until, self._idle_check)

    def _idle_check(self) -> None:
        # Put off rather than set again at every answer: one timer a connection.
        self._idle_timer = None
        if self.handler is not None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._idle_until:
            self._idle_timer = loop.call_at(self._idle_until, self._idle_check)
        else:
            self.transport.close()


def _answer(version: str, status: int, body: bytes, head: bool, keep_alive: bool) -> bytes:
    before, after = _framing(version, status, len(body), keep_alive)
    return before + _date() + after + (b"" if head else body)


@functools.lru_cache(maxsize=64)
def _framing(version: str, status: int, length: int, keep_alive: bool) -> tuple[bytes, bytes]:
    """The head aiohttp writes for a web.Response with this body and content type, on
    either side of the date; a few kinds, each made once."""
    before = [
        f"HTTP/{version} {status} {HTTPStatus(status).phrase}".encode(),
        b"Content-Type: " + CONTENT_TYPE,
        b"Content-Length: %d" % length,
        b"Date: ",
    ]
    after = [b"", b"Server: " + SERVER_SOFTWARE.encode()]
    if keep_alive and version == "1.0":
        after.append(b"Connection: keep-alive")
    elif not keep_alive and version == "1.1":
        after.append(b"Connection: close")
    return b"\r\n".join(before), b"\r\n".join(after) + b"\r\n\r\n"


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]
