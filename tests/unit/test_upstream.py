"""The gateway's HTTP/1.1 client against a scripted engine on a real local socket.

Each engine here reads one request head (and its body, by Content-Length) and answers
with exactly the bytes a test gives, cut into the pieces it gives, so that every place
an answer can be split is tried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import cast

import pytest

from orchestrator.gateway import Gateway
from orchestrator.switcher import Switcher
from orchestrator.traffic import Traffic
from orchestrator.upstream import HIGH_WATER, Connection, Pool, UpstreamFailed, request_bytes
from tests.waiting import eventually

Script = Sequence[Sequence[bytes]]  # per request on a connection: the pieces of its answer


@asynccontextmanager
async def engine(script: Script, *, close_after: bool = False) -> AsyncIterator[list[bytes]]:
    """A server answering the n-th request on each connection with script[n]; yields the
    requests it was sent."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for pieces in script:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                received.append(head + await reader.readexactly(length))
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
            if close_after:
                writer.close()
                return
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    received.append(str(port).encode())  # the port, for the test; requests follow
    async with server:
        yield received


def port_of(received: list[bytes]) -> int:
    return int(received.pop(0))


async def ask(pool: Pool, port: int, method: str = "POST", body: bytes = b"{}") -> Connection:
    connection, _ = await pool.connect("127.0.0.1", port)
    wire = request_bytes(method, "/v1/x", f"127.0.0.1:{port}", [(b"X-A", b"1")], body)
    connection.send(wire, no_body=method == "HEAD")
    return connection


def every_split(answer: bytes) -> list[list[bytes]]:
    """The answer whole, byte by byte, and cut once at every position."""
    cuts = [[answer], [answer[i : i + 1] for i in range(len(answer))]]
    cuts += [[answer[:i], answer[i:]] for i in range(1, len(answer))]
    return cuts


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-B: 2 \r\n\r\nhello"


@pytest.mark.parametrize("pieces", every_split(CHUNKED))
async def test_chunked_answer_cut_anywhere(pieces: list[bytes]) -> None:
    async with engine([pieces, [LENGTH]]) as received:
        pool = Pool()
        port = port_of(received)
        connection = await ask(pool, port)
        head = await connection.head()
        assert (head.status, head.length) == (200, None)
        assert ("Content-Type", "text/event-stream") in head.headers
        assert await connection.read_all() == b"hello, world"
        assert "X-Trailer" not in dict(head.headers)  # a trailer is not a header
        pool.release("127.0.0.1", port, connection)
        again = await ask(pool, port)
        assert again is connection  # kept alive for the next request
        assert (await again.head()).status == 201
        assert await again.read_all() == b"hello"
        pool.close()


@pytest.mark.parametrize("pieces", every_split(LENGTH))
async def test_answer_with_length_cut_anywhere(pieces: list[bytes]) -> None:
    async with engine([pieces]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        head = await connection.head()
        assert (head.status, head.reason, head.length) == (201, "Created", 5)
        assert ("X-B", "2") in head.headers
        assert await connection.read_all() == b"hello"
        assert received[0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n{}" in received[0]
        pool.close()


async def test_answer_until_close_and_interim_answer() -> None:
    """100 Continue is skipped; a body without length ends when the engine closes."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nall of it"
    async with engine([[answer]], close_after=True) as received:
        pool = Pool()
        port = port_of(received)
        connection = await ask(pool, port)
        assert (await connection.head()).status == 200
        async with asyncio.timeout(5):  # a body not ended by the close would wait forever
            assert await connection.read_all() == b"all of it"
        pool.release("127.0.0.1", port, connection)
        assert (await pool.connect("127.0.0.1", port))[1] is False  # not kept
        pool.close()


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
        ("POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ],
)
async def test_answers_without_body(method: str, answer: bytes) -> None:
    async with engine([[answer], [LENGTH]]) as received:
        pool = Pool()
        port = port_of(received)
        connection = await ask(pool, port, method=method, body=b"")
        await connection.head()
        assert await connection.read_all() == b""
        pool.release("127.0.0.1", port, connection)
        assert await (await ask(pool, port)).read_all() == b"hello"
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
        # Two ways to smuggle a second answer past a proxy that reads the lengths apart.
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
        b"HTTP/1.1 200 OK\n\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    ],
)
async def test_broken_answers_fail_and_are_not_kept(answer: bytes) -> None:
    """The engine keeps the connection open: the failure comes from reading the answer."""
    async with engine([[answer]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        with pytest.raises(UpstreamFailed):
            async with asyncio.timeout(5):
                await connection.head()
                await connection.read_all()
        assert not connection.recycle()
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\nContent-",
    ],
)
async def test_answers_cut_short_by_the_engine_fail(answer: bytes) -> None:
    async with engine([[answer]], close_after=True) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        with pytest.raises(UpstreamFailed):
            await connection.head()
            await connection.read_all()
        assert not connection.recycle()
        pool.close()


async def test_a_head_that_does_not_end_fails() -> None:
    pieces = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad: " + b"a" * 1000 + b"\r\n"] * 70
    async with engine([pieces]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        with pytest.raises(UpstreamFailed, match="head past 64 KiB"):
            async with asyncio.timeout(5):
                await connection.head()
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nab",
    ],
)
async def test_answer_the_engine_ends_the_connection_with_is_not_kept(answer: bytes) -> None:
    async with engine([[answer]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        assert await connection.read_all() == b"ab"
        assert not connection.recycle()
        pool.close()


async def test_body_sent_to_a_head_request_is_not_taken_for_the_next_answer() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"
    async with engine([[answer]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received), method="HEAD", body=b"")
        assert (await connection.head()).length == 2
        await eventually(lambda: connection._error is not None, what="the stray body noticed")
        assert await connection.read_all() == b""
        assert not connection.recycle()
        pool.close()


@pytest.mark.parametrize("extra", [b"c", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ncd"])
async def test_bytes_past_the_answer_are_not_taken_for_the_next_one(extra: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab" + extra
    async with engine([[answer]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        assert await connection.read_all() == b"ab"
        assert not connection.recycle()
        pool.close()


async def test_closed_kept_connection_is_not_handed_out() -> None:
    async with engine([[LENGTH]], close_after=True) as received:
        pool = Pool()
        port = port_of(received)
        connection = await ask(pool, port)
        assert await connection.read_all() == b"hello"
        pool.release("127.0.0.1", port, connection)
        await eventually(lambda: connection.transport is None, what="the engine's close")
        assert (await pool.connect("127.0.0.1", port))[1] is False
        pool.close()


async def test_refused_connection_fails() -> None:
    async with engine([]) as received:
        port = port_of(received)
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        await Pool().connect("127.0.0.1", port)


class Sink:
    """Takes forwarded pieces; says it can take no more once it holds ``room`` of them."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.pieces: list[bytes] = []
        self.room = room

    def __call__(self, piece: bytes) -> bool:
        self.pieces.append(piece)
        return len(self.pieces) < self.room


@pytest.mark.parametrize("pieces", every_split(CHUNKED))
async def test_forwarded_pieces_reach_the_sink_and_the_end_reaches_read(
    pieces: list[bytes],
) -> None:
    async with engine([pieces]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        await connection.head()
        first = await connection.read()
        sink = Sink()
        connection.forward(sink)
        rest = await connection.read_all()  # what was queued before forwarding, if any
        assert first + rest + b"".join(sink.pieces) == b"hello, world"
        assert not (rest and sink.pieces)
        assert connection.recycle()
        pool.close()


async def test_a_sink_that_falls_behind_hands_the_rest_back_to_read() -> None:
    body = [b"%d," % n for n in range(50)]
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [answer] + [b"%x\r\n%b\r\n" % (len(p), p) for p in body] + [b"0\r\n\r\n"]
    async with engine([pieces]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        await connection.head()
        first = await connection.read()
        sink = Sink(room=3)
        connection.forward(sink)
        rest = await connection.read_all()
        assert len(sink.pieces) == 3
        assert first + b"".join(sink.pieces) + rest == b"".join(body)
        pool.close()


async def test_nothing_overtakes_pieces_waiting_to_be_read() -> None:
    """Forwarding asked for while pieces wait is not taken up: they would be overtaken."""
    body = [b"%d," % n for n in range(20)]
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in body)
    async with engine([[answer + chunks + b"0\r\n\r\n"]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        await connection.head()
        await eventually(lambda: connection._state == "done", what="the whole answer read")
        first = await connection.read()
        sink = Sink()
        connection.forward(sink)
        assert first + await connection.read_all() == b"".join(body)
        assert sink.pieces == []
        pool.close()


async def test_the_next_answer_on_a_kept_connection_is_not_forwarded() -> None:
    async with engine([[CHUNKED], [CHUNKED]]) as received:
        pool = Pool()
        port = port_of(received)
        connection = await ask(pool, port)
        await connection.head()
        await connection.read()
        sink = Sink()
        connection.forward(sink)
        await connection.read_all()
        taken = list(sink.pieces)
        pool.release("127.0.0.1", port, connection)
        again = await ask(pool, port)
        assert again is connection
        await again.head()
        assert await again.read_all() == b"hello, world"
        assert sink.pieces == taken
        pool.close()


async def test_reading_pauses_ahead_of_a_slow_reader() -> None:
    """Past the high-water mark the engine's socket is not read until the client catches up."""
    size = HIGH_WATER * 4
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with engine([[answer]]) as received:
        pool = Pool()
        connection = await ask(pool, port_of(received))
        await connection.head()
        await eventually(lambda: connection._paused, what="reading paused")
        assert connection._buffered <= HIGH_WATER + 256 * 1024
        assert len(await connection.read_all()) == size
        pool.close()


async def test_gateway_sends_again_when_a_kept_connection_was_closed_under_it() -> None:
    """An engine that drops a kept-alive connection as it is reused never saw the request:
    the gateway sends it once more on a new connection; a new one that fails is an error."""
    async with engine([[LENGTH], []], close_after=True) as received:
        port = port_of(received)
        gateway = Gateway(cast(Switcher, None), cast(Traffic, None))
        wire = request_bytes("POST", "/v1/x", "engine", [], b"{}")
        first, _ = await gateway._exchange("127.0.0.1", port, wire, no_body=False)
        assert await first.read_all() == b"hello"
        gateway._pool.release("127.0.0.1", port, first)
        second, head = await gateway._exchange("127.0.0.1", port, wire, no_body=False)
        assert second is not first and head.status == 201
        assert await second.read_all() == b"hello"
        assert len(received) == 3  # the first request, the one dropped, and it again
        await gateway.close()
    with pytest.raises(UpstreamFailed):
        await gateway._exchange("127.0.0.1", port, wire, no_body=False)
