"""What the gateway sends the engine and what it hands back, against an engine in this process.

The daemon is wired as serve() wires it over the fake Docker boundary; only the engine's
address is real: a small aiohttp server that keeps every request it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from orchestrator import gateway
from orchestrator.compose import ModelSpec
from orchestrator.daemon import Daemon
from orchestrator.docker import ContainerInfo
from orchestrator.errors import BadRequest
from orchestrator.gateway import _requested_model
from tests.fakes import FakeRuntime, daemon_of

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
ALIAS = "gpt-4o"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class EngineRuntime(FakeRuntime):
    """The fake Docker boundary, with every model's engine at ``engine_url``/<model id>."""

    engine_url: str = ""

    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None:
        return None if engine is None else f"{self.engine_url}/{spec.id}"

    async def probe(self, url: str) -> bool:
        return await super().probe("http://fake/" + url.removeprefix(self.engine_url + "/"))


@dataclass
class Engine:
    seen: list[Seen] = field(default_factory=list)
    # Set once a stream asked to go on "forever" could not write any more.
    cut_off: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        asked = json.loads(body)
        if not asked.get("stream"):
            answer = web.json_response({"object": "chat.completion", "echo": len(body)})
            answer.set_cookie("engine-session", "secret")
            return answer
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        if "tokens" in asked:  # numbered tokens, each padded to "size" bytes
            for number in range(asked["tokens"]):
                await stream.write(token(number, asked.get("size", 0)))
                await asyncio.sleep(0)
        elif asked.get("forever"):
            try:
                for number in itertools.count():
                    await stream.write(token(number, 0))
                    await asyncio.sleep(0.01)
            finally:  # cancelled as its client (the gateway) hung up, or a failed write
                self.cut_off.set()
        else:
            for word in ("one", "two", "three"):
                await stream.write(f"data: {json.dumps({'content': word})}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream


def token(number: int, size: int) -> bytes:
    return b"data: %d %s\n\n" % (number, b"x" * size)


@pytest.fixture
async def engine(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[Engine, str]]:
    made = Engine()
    app = web.Application()
    app.router.add_route("*", "/{model}/v1/{tail:.*}", made.handle)
    server = await aiohttp_server(app)
    yield made, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def daemon(tmp_path: Path, engine: tuple[Engine, str]) -> AsyncIterator[Daemon]:
    runtime = EngineRuntime(engine_url=engine[1])
    async with daemon_of(tmp_path, runtime, "alpha", "beta", aliases={ALIAS: "alpha"}) as made:
        yield made


@pytest.fixture
async def client(aiohttp_client: ClientFactory, daemon: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(daemon.app)


async def test_body_naming_the_served_name_goes_through_byte_for_byte(
    client: TestClient[Any, Any], engine: tuple[Engine, str], daemon: Daemon
) -> None:
    """Spacing, key order and number spelling all reach the engine as the client wrote them."""
    assert daemon.switcher.spec("alpha").served_name == "alpha"
    body = (
        b'{ "model" : "alpha",\n  "temperature": 1.0, "n": 1e0,"messages":[{"role":"user",'
        b'"content":"hi"}] }'
    )
    answer = await client.post(CHAT, data=body, headers=JSON)
    assert answer.status == 200, await answer.text()
    assert engine[0].seen[-1].body == body


async def test_body_naming_an_alias_has_only_its_model_replaced(
    client: TestClient[Any, Any], engine: tuple[Engine, str], daemon: Daemon
) -> None:
    """The engine knows the served name: that value changes, and every other byte stays."""
    served = daemon.switcher.spec("alpha").served_name
    head, tail = '{"messages": [{"content": "héllo ✓"}], "model": ', ', "temperature": 1.0}'
    answer = await client.post(CHAT, data=f'{head}"{ALIAS}"{tail}'.encode(), headers=JSON)
    assert answer.status == 200, await answer.text()
    assert engine[0].seen[-1].body == (head + json.dumps(served) + tail).encode()


async def test_model_from_the_query_is_added_to_the_body(
    client: TestClient[Any, Any], engine: tuple[Engine, str], daemon: Daemon
) -> None:
    answer = await client.post(f"{CHAT}?model={ALIAS}", data=b'{"messages": []}', headers=JSON)
    assert answer.status == 200, await answer.text()
    sent = json.loads(engine[0].seen[-1].body)
    assert sent == {"messages": [], "model": daemon.switcher.spec("alpha").served_name}


async def test_engine_gets_the_clients_headers_and_none_of_ours(
    client: TestClient[Any, Any], engine: tuple[Engine, str]
) -> None:
    """No key of ours, no headers aiohttp would add, and no cookie the engine once set."""
    for _ in range(2):
        client.session.cookie_jar.clear()  # the client sends no cookie: any would be ours
        answer = await client.post(
            CHAT,
            data=b'{"model": "alpha"}',
            headers={**JSON, "Authorization": "Bearer ours", "X-Trace": "t1"},
            skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding"],
        )
        assert answer.status == 200, await answer.text()
    for seen in engine[0].seen:
        names = {name.lower() for name in seen.headers}
        assert seen.headers["X-Trace"] == "t1"
        assert not names & {"authorization", "user-agent", "accept-encoding", "cookie"}, names


async def test_short_answer_is_passed_whole(
    client: TestClient[Any, Any], engine: tuple[Engine, str]
) -> None:
    answer = await client.post(CHAT, data=b'{"model": "alpha"}', headers=JSON)
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    assert await answer.json() == {"object": "chat.completion", "echo": len(b'{"model": "alpha"}')}


async def test_stream_is_passed_chunk_by_chunk(
    client: TestClient[Any, Any], engine: tuple[Engine, str]
) -> None:
    answer = await client.post(CHAT, data=b'{"model": "alpha", "stream": true}', headers=JSON)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/event-stream"
    lines = [line for line in (await answer.read()).split(b"\n\n") if line]
    assert lines[-1] == b"data: [DONE]"
    assert [json.loads(line[6:])["content"] for line in lines[:-1]] == ["one", "two", "three"]


async def test_a_long_stream_arrives_whole_and_in_order(
    client: TestClient[Any, Any], engine: tuple[Engine, str]
) -> None:
    """Past its first piece a stream goes from the engine's connection straight to the
    client's; the client gets the same bytes."""
    asked = {"model": "alpha", "stream": True, "tokens": 500}
    answer = await client.post(CHAT, json=asked)
    assert answer.status == 200
    assert answer.headers["Transfer-Encoding"] == "chunked"
    expected = b"".join(token(n, 0) for n in range(500)) + b"data: [DONE]\n\n"
    assert await answer.read() == expected


async def test_a_client_that_falls_behind_gets_every_token_in_order(
    client: TestClient[Any, Any], engine: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the client falls behind, the tokens wait for it on the relaying side (and the
    engine is read no further past a bound), until it has taken what it was sent."""
    # As if the client's buffer were always full: every piece the connection forwards
    # hands the next back to the relaying task, which waits for the client, then
    # forwards again.
    monkeypatch.setattr(gateway, "SINK_HIGH_WATER", 0)
    tokens, size = 300, 1000
    asked = {"model": "alpha", "stream": True, "tokens": tokens, "size": size}
    answer = await client.post(CHAT, json=asked)
    assert answer.status == 200
    expected = b"".join(token(n, size) for n in range(tokens)) + b"data: [DONE]\n\n"
    assert await answer.read() == expected


async def test_a_client_that_hangs_up_ends_the_engines_stream(
    client: TestClient[Any, Any], engine: tuple[Engine, str]
) -> None:
    """Its connection to the engine is closed, which is what stops a generation."""
    answer = await client.post(CHAT, json={"model": "alpha", "stream": True, "forever": True})
    assert answer.status == 200
    for number in range(3):
        assert await answer.content.readuntil(b"\n\n") == token(number, 0)
    answer.close()
    await asyncio.wait_for(engine[0].cut_off.wait(), 10)


def requested(body: bytes, query: str = "", content_type: str = "application/json") -> Any:
    request = make_mocked_request("POST", f"{CHAT}{query}", headers={"Content-Type": content_type})
    return _requested_model(body, request)


class TestRequestedModel:
    def test_unchanged_body_is_the_same_bytes(self) -> None:
        body = b'{"model": "org/alpha", "x": [1, 2]}'
        asked = requested(body)
        assert asked.model == "org/alpha"
        assert asked.for_engine("org/alpha") is body

    def test_last_model_is_the_one_named_and_replaced(self) -> None:
        """json.loads keeps the last of two keys; so does the engine, so that one changes."""
        asked = requested(b'{"model": "a", "model": "alpha" }')
        assert asked.model == "alpha"
        assert asked.for_engine("org/alpha") == b'{"model": "a", "model": "org/alpha" }'

    def test_body_in_another_encoding_is_read_and_written_again(self) -> None:
        body = json.dumps({"model": "alpha", "prompt": "hi"}).encode("utf-16")
        asked = requested(body)
        assert asked.model == "alpha"
        assert json.loads(asked.for_engine("org/alpha")) == {"model": "org/alpha", "prompt": "hi"}

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b'{"model": "alpha",}', "not valid JSON"),
            (b'{"model": "alpha"} {}', "not valid JSON"),
            (b'["alpha"]', "must be a JSON object"),
            (b'{"model": 3}', '"model" must be a string'),
        ],
    )
    def test_bad_bodies_are_refused_as_before(self, body: bytes, message: str) -> None:
        with pytest.raises(BadRequest, match=message):
            requested(body)

    def test_a_body_that_is_not_json_passes_as_it_is(self) -> None:
        asked = requested(
            b"--boundary\r\n", query="?model=alpha", content_type="multipart/form-data"
        )
        assert asked.model == "alpha"
        assert asked.for_engine("org/alpha") == b"--boundary\r\n"
