"""Plain probes answered on the connection, everything else by aiohttp, on one socket.

Each answer is compared byte for byte (the date aside) with what aiohttp serving the
same application alone sends for the same request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from orchestrator.api import plain_probe_answers
from orchestrator.daemon import Daemon
from orchestrator.probes import PlainProbes, ProbeConnection
from orchestrator.server import ConnectionGuard, listen
from tests.fakes import FakeRuntime, daemon_of

IDLE = 2.0  # seconds a connection may stay without a complete request
READ_TIMEOUT = 10.0
LOCAL = b"Host: 127.0.0.1\r\n"


@dataclass
class Served:
    daemon: Daemon
    runner: web.AppRunner
    guard: ConnectionGuard
    port: int  # through the probe connections, as serve() listens
    alone: int  # aiohttp alone, over the same application

    @property
    def requests(self) -> int:
        """Requests aiohttp's server has handled so far."""
        server = self.runner.server
        assert server is not None
        return server.requests_count


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with daemon_of(tmp_path, FakeRuntime(), "alpha") as made:
        yield made


async def serve(daemon: Daemon, max_connections: int = 64) -> AsyncIterator[Served]:
    runner = web.AppRunner(daemon.app, access_log=None, keepalive_timeout=IDLE)
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(max_connections)
    probes = PlainProbes(plain_probe_answers(daemon.app), idle_timeout=IDLE)
    listener = await listen(runner, guard, "127.0.0.1", 0, probes)
    loop = asyncio.get_running_loop()
    alone = await loop.create_server(runner.server, "127.0.0.1", 0)
    try:
        yield Served(
            daemon,
            runner,
            guard,
            listener.sockets[0].getsockname()[1],
            alone.sockets[0].getsockname()[1],
        )
    finally:
        listener.close()
        alone.close()
        await runner.cleanup()


@pytest.fixture
async def served(daemon: Daemon) -> AsyncIterator[Served]:
    async for made in serve(daemon):
        yield made


@dataclass(frozen=True)
class Answer:
    head: tuple[bytes, ...]  # status line and headers, the date left out
    body: bytes


async def exchange(
    port: int, request: bytes, answers: int, *, heads: frozenset[int] = frozenset()
) -> tuple[list[Answer], bool]:
    """Send ``request`` as it is; read ``answers`` answers (those numbered in ``heads``
    answer a HEAD: no body), then whether the daemon closed the connection after them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        read: list[Answer] = []
        for number in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            lines = head[:-4].split(b"\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in lines
                    if line.lower().startswith(b"content-length:")
                ),
                0,  # an interim answer: 100 Continue
            )
            body = b"" if number in heads else await reader.readexactly(length)
            kept = tuple(line for line in lines if not line.startswith(b"Date: "))
            read.append(Answer(kept, body))
        closed = await asyncio.wait_for(reader.read(1), READ_TIMEOUT) == b""
        return read, closed
    finally:
        writer.close()


async def both(
    served: Served, request: bytes, answers: int = 1, *, heads: frozenset[int] = frozenset()
) -> tuple[list[Answer], bool, int]:
    """What the daemon's socket answers, asserted to be what aiohttp alone answers; and
    how many of the requests sent to the daemon's socket reached aiohttp's server."""
    before = served.requests
    ours = await exchange(served.port, request, answers, heads=heads)
    reached = served.requests - before
    theirs = await exchange(served.alone, request, answers, heads=heads)
    assert ours == theirs
    return *ours, reached


def probe(path: bytes = b"/health", *, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\n" + LOCAL + extra + b"\r\n"


CLOSE = b"Connection: close\r\n"


class TestPlainProbes:
    @pytest.mark.parametrize("path", [b"/health", b"/health/live"])
    async def test_answered_as_aiohttp_answers_without_reaching_it(
        self, served: Served, path: bytes
    ) -> None:
        answers, closed, reached = await both(
            served, probe(path) + probe(path, method=b"HEAD") + probe(path, extra=CLOSE), 3,
            heads=frozenset({1}),
        )  # fmt: skip
        assert closed
        assert answers[0].head[0].startswith(b"HTTP/1.1 ")
        assert answers[2].head[-1] == b"Connection: close"
        assert answers[0].body == answers[2].body != b""
        assert reached == 0

    async def test_health_follows_the_switcher(self, served: Served) -> None:
        idle, _, _ = await both(served, probe(extra=CLOSE))
        assert idle[0].head[0] == b"HTTP/1.1 503 Service Unavailable"
        await (await served.daemon.switcher.switch_to("alpha")).future
        ready, _, reached = await both(served, probe(extra=CLOSE))
        assert reached == 0
        assert ready[0].head[0] == b"HTTP/1.1 200 OK"
        assert b'"model": "alpha"' in ready[0].body

    @pytest.mark.parametrize(
        ("request_line", "closed"),
        [
            (b"GET /health HTTP/1.0\r\n\r\n", True),
            (b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
        ],
    )
    async def test_http_1_0(self, served: Served, request_line: bytes, closed: bool) -> None:
        """No Host is needed; keep-alive only when asked for."""
        if not closed:
            request_line += b"GET /health HTTP/1.0\r\n\r\n"  # the second one ends it
        answers, was_closed, reached = await both(served, request_line, 1 if closed else 2)
        assert was_closed
        assert reached == 0
        assert answers[0].head[0].startswith(b"HTTP/1.0 503")
        assert (b"Connection: keep-alive" in answers[0].head) is not closed

    async def test_a_probe_sent_in_pieces(self, served: Served) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        for byte in probe(extra=CLOSE):
            writer.write(bytes([byte]))
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), READ_TIMEOUT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert served.requests == 0


class TestHandedToAiohttp:
    @pytest.mark.parametrize(
        "request_bytes",
        [
            probe(extra=b"Origin: http://evil.example\r\n" + CLOSE),
            probe(extra=b"Sec-Fetch-Site: cross-site\r\n" + CLOSE),
            b"GET /health HTTP/1.1\r\nHost: evil.example\r\n" + CLOSE + b"\r\n",
            b"GET /health HTTP/1.1\r\n" + LOCAL + LOCAL + CLOSE + b"\r\n",
            probe(b"/health?model=alpha", extra=CLOSE),
            probe(b"/health/", extra=CLOSE),
            probe(b"/status", extra=CLOSE),
            probe(b"http://127.0.0.1/health", extra=CLOSE),
            probe(method=b"POST", extra=CLOSE),
            probe(method=b"OPTIONS", extra=CLOSE),
            probe(extra=b"Content-Length: 2\r\n" + CLOSE)[:-2] + b"\r\n{}",
            probe(extra=b"Transfer-Encoding: chunked\r\n" + CLOSE) + b"0\r\n\r\n",
            probe(extra=b"Expect: 100-continue\r\n" + CLOSE),
        ],
    )
    async def test_what_is_not_a_plain_probe(self, served: Served, request_bytes: bytes) -> None:
        _, _, reached = await both(served, request_bytes)
        assert reached == 1

    async def test_a_malformed_request_is_aiohttps_to_refuse(self, served: Served) -> None:
        answers, closed, _ = await both(served, b"GARBAGE\r\n\r\n")
        assert answers[0].head[0].endswith(b" 400 Bad Request")
        assert closed

    async def test_a_head_too_long_is_aiohttps_to_judge(self, served: Served) -> None:
        cookie = b"Cookie: " + b"x" * 9000 + b"\r\n"
        answers, _, reached = await both(served, probe(extra=cookie + CLOSE))
        assert answers[0].head[0].endswith(b" 400 Bad Request")  # aiohttp's bound on a field
        assert reached == 1

    async def test_pipelined_probes_around_another_request_keep_their_order(
        self, served: Served
    ) -> None:
        """Probes answered here first; from the first other request on, aiohttp answers
        everything on the connection, probes included."""
        request = probe() + probe(b"/status") + probe(b"/health/live", extra=CLOSE)
        answers, closed, reached = await both(served, request, 3)
        assert [a.head[0].split(b" ")[1] for a in answers] == [b"503", b"200", b"200"]
        assert b'"state": "idle"' in answers[1].body
        assert closed
        assert reached == 3

    async def test_answers_in_one_piece_then_a_request_for_aiohttp(self, served: Served) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(probe())
        first = await asyncio.wait_for(reader.readuntil(b"}"), READ_TIMEOUT)
        assert first.startswith(b"HTTP/1.1 503 ")
        assert served.requests == 0
        writer.write(probe(b"/status", extra=CLOSE))
        rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT)
        writer.close()
        assert rest.startswith(b"HTTP/1.1 200 OK")
        assert served.requests == 1


class TestConnections:
    async def test_a_connection_with_no_request_is_closed_when_idle(self, served: Served) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /heal")  # never finished
        assert await asyncio.wait_for(reader.read(), IDLE + READ_TIMEOUT) == b""
        writer.close()
        assert served.requests == 0

    async def test_a_connection_stays_while_it_asks(self, served: Served) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(probe())
        await asyncio.wait_for(reader.readuntil(b"}"), READ_TIMEOUT)
        writer.write(probe())
        assert (await asyncio.wait_for(reader.readuntil(b"}"), READ_TIMEOUT)).startswith(
            b"HTTP/1.1 503"
        )
        assert await asyncio.wait_for(reader.read(), IDLE + READ_TIMEOUT) == b""
        writer.close()

    async def test_the_oldest_idle_connection_makes_room(self, daemon: Daemon) -> None:
        async for served in serve(daemon, max_connections=2):
            oldest = await asyncio.open_connection("127.0.0.1", served.port)
            kept = await asyncio.open_connection("127.0.0.1", served.port)
            kept[1].write(probe())
            await asyncio.wait_for(kept[0].readuntil(b"}"), READ_TIMEOUT)
            newest = await asyncio.open_connection("127.0.0.1", served.port)
            assert await asyncio.wait_for(oldest[0].read(), READ_TIMEOUT) == b""
            assert served.guard.evicted == 1
            newest[1].write(probe(extra=CLOSE))
            assert (await asyncio.wait_for(newest[0].read(), READ_TIMEOUT)).startswith(
                b"HTTP/1.1 503"
            )
            for _, writer in (oldest, kept, newest):
                writer.close()


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.calls.append("close")


async def test_answers_not_taken_stop_the_reading(daemon: Daemon) -> None:
    """A client that sends probes and never reads the answers is read no further once
    they fill the transport's buffer, until it takes them."""

    async def unreached(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("a plain probe reached aiohttp")

    probes = PlainProbes(plain_probe_answers(daemon.app), idle_timeout=IDLE)
    connection = ProbeConnection(web.Server(unreached), probes, lost=lambda c: None)
    transport = RecordingTransport()
    connection.connection_made(transport)
    connection.data_received(probe() * 3)
    assert transport.written.count(b"HTTP/1.1 503") == 3
    connection.pause_writing()
    connection.resume_writing()
    assert transport.calls == ["pause_reading", "resume_reading"]
    connection.connection_lost(None)
