"""The OpenAI-compatible gateway: /v1 requests routed by their ``model`` to its engine.

A request names a model by id, served name or alias. If another model holds the GPU,
the request waits in ``Traffic`` while the daemon switches, then is forwarded. The
answer is passed through as it arrives, so a stream reaches the client chunk by chunk;
a client that hangs up cancels its request to the engine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from .answers import Error, OpenAIError, OpenAIErrorDetail, V1Model, V1ModelList
from .errors import BadRequest, ModelNotFound, OrchestratorError, RequestTimeout, UpstreamError
from .security import is_gateway_path
from .states import State
from .switcher import Switcher
from .traffic import Traffic
from .upstream import Connection, Head, Pool, UpstreamFailed, request_bytes

log = structlog.get_logger(__name__)

# Chat requests carry images and long contexts; far above the control API's 64 KiB.
MAX_V1_BODY = 32 * 1024 * 1024
# A client that trickles its body holds a connection open; a large upload still fits.
V1_BODY_TIMEOUT = 120.0
# An answer of known length up to this size is read whole and sent as one write, headers
# and body together: the client wakes once, not twice. Longer ones are streamed.
BUFFERED_ANSWER = 1024 * 1024
# What may wait in the client's transport before tokens go back through the relaying task.
SINK_HIGH_WATER = 64 * 1024
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Our own credentials stay here; the engine has its own, if any.
_NOT_FORWARDED = _HOP_BY_HOP | {"authorization", "x-api-key"}
# The same, as the raw header names are compared; and Expect: the whole body goes at once.
_NOT_FORWARDED_RAW = frozenset(name.encode() for name in _NOT_FORWARDED | {"expect"})
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(err: OrchestratorError) -> OpenAIError:
    """Our error in the shape OpenAI's clients parse."""
    status = err.status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    detail = OpenAIErrorDetail(
        message=err.message, type=kind, param=err.details.get("param"), code=err.code
    )
    return OpenAIError(error=detail)


class RequestObserver(Protocol):
    def observe_request(self, model: str, code: int, seconds: float) -> None: ...


class Gateway:
    def __init__(
        self,
        switcher: Switcher,
        traffic: Traffic,
        *,
        aliases: Mapping[str, str] | None = None,
        observers: Sequence[RequestObserver] = (),
    ) -> None:
        self.switcher = switcher
        self.traffic = traffic
        self.aliases = dict(aliases or {})
        self._session: aiohttp.ClientSession | None = None
        self._pool = Pool()
        # Told of every forwarded request: its model, status code and seconds.
        self._observers = tuple(observers)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Kept-alive connections to the engine: a new TCP connection per request would
            # cost more than the rest of the gateway's work. No total timeout: a long
            # generation is not an error. The engine is sent the client's headers and no
            # others of aiohttp's (an Accept-Encoding the client never sent would get it a
            # compressed answer it did not ask for), and no cookies: one client's must
            # never reach the engine in another's request.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING),
            )
        return self._session

    async def close(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()

    def resolve(self, name: str) -> str:
        """The model id a request's ``model`` names: an id, a served name or an alias."""
        models = self.switcher.models
        if name in models:
            return name
        target = self.aliases.get(name)
        if target in models:
            return target
        for spec in models.values():
            if name == spec.served_name or name in spec.aliases:
                return spec.id
        known = ", ".join(sorted(models)) or "none"
        raise ModelNotFound(f"the model {name!r} does not exist; known models: {known}")

    def list_models(self, context_lengths: Mapping[str, int | None]) -> V1ModelList:
        status = self.switcher.status
        created = int(time.time())
        return V1ModelList(
            data=[
                V1Model(
                    id=spec.id,
                    created=created,
                    display_name=spec.display_name,
                    served_name=spec.served_name,
                    loaded=status.state is State.READY and status.active == spec.id,
                    context_length=context_lengths.get(spec.id),
                )
                for spec in self.switcher.models.values()
                if spec.id not in self.switcher.disabled
            ]
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        asked = _requested_model(body, request)
        if asked.model is None:
            raise BadRequest('the request names no model: set "model"', param="model")
        model_id = self.resolve(asked.model)
        began = time.monotonic()
        code = 500
        try:
            # The engine knows the model by its served name only.
            forwarded = asked.for_engine(self.switcher.spec(model_id).served_name)
            response = await self._serve(request, model_id, forwarded)
            code = response.status
            return response
        except OrchestratorError as err:
            code = err.status
            raise
        except asyncio.CancelledError:
            code = 499  # the client closed the connection first (nginx's convention)
            raise
        finally:
            for observer in self._observers:
                observer.observe_request(model_id, code, time.monotonic() - began)

    async def _serve(self, request: web.Request, model_id: str, body: bytes) -> web.StreamResponse:
        if self.traffic.admissible() != model_id:
            # Refused now (unknown, disabled, not on disk) rather than after waiting.
            await asyncio.to_thread(self.switcher.preflight, self.switcher.spec(model_id))
        async with self.traffic.lease(model_id) as upstream:
            return await self._pass_through(request, upstream, body, model_id)

    async def _pass_through(
        self, request: web.Request, upstream: str, body: bytes, model_id: str
    ) -> web.StreamResponse:
        address = _plain_http(upstream)
        if address is None:
            return await self._pass_through_aiohttp(request, upstream, body, model_id)
        host, port, authority, prefix = address
        wire = request_bytes(
            request.method,
            prefix + request.path_qs,
            authority,
            [item for item in request.raw_headers if item[0].lower() not in _NOT_FORWARDED_RAW],
            body,
        )
        connection: Connection | None = None
        try:
            connection, head = await self._exchange(host, port, wire, request.method == "HEAD")
            response = await _relay(request, connection, head)
        except UpstreamFailed as err:
            raise UpstreamError(
                f"the engine of {model_id} at {upstream} did not answer: {err}", model=model_id
            ) from err
        except ConnectionError:
            if request.transport is None or request.transport.is_closing():
                log.info("client went away", model=model_id, path=request.path)
            raise
        finally:
            if connection is not None:
                # Kept for the next request if the answer was read to its end; else closed,
                # which also tells the engine to stop a generation no one reads any more.
                self._pool.release(host, port, connection)
        return response

    async def _exchange(
        self, host: str, port: int, wire: bytes, no_body: bool
    ) -> tuple[Connection, Head]:
        """The request sent on a kept connection (or a new one), and the answer's head."""
        for attempt in (1, 2):
            connection, kept = await self._pool.connect(host, port)
            connection.send(wire, no_body=no_body)
            try:
                return connection, await connection.head()
            except UpstreamFailed:
                connection.close()
                # The engine closed a kept connection as it was reused (uvicorn closes idle
                # ones after 5 s): the request never reached it, so it goes once more.
                if attempt == 1 and kept and not connection.got_bytes:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
        raise AssertionError("unreachable")

    async def _pass_through_aiohttp(
        self, request: web.Request, upstream: str, body: bytes, model_id: str
    ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        try:
            async with self.session().request(
                request.method,
                _upstream_url(upstream, request.path_qs),
                data=body or None,
                headers=headers,
                allow_redirects=False,
            ) as answer:
                return await _answer(request, answer)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            if request.transport is None or request.transport.is_closing():
                log.info("client went away", model=model_id, path=request.path)
                raise
            raise UpstreamError(
                f"the engine of {model_id} at {upstream} did not answer: {err}", model=model_id
            ) from err


async def _answer(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """The engine's answer passed on: whole when short and of known length, else streamed."""
    headers = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP)
    length = answer.content_length
    if length is not None and length <= BUFFERED_ANSWER and request.method != "HEAD":
        body = await answer.read()
        return web.Response(status=answer.status, reason=answer.reason, headers=headers, body=body)
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    if length is not None:
        response.content_length = length
    writer = await response.prepare(request)
    assert writer is not None, "a new response is prepared once"
    # Straight from the engine's reader to the client's writer: each streamed token
    # passes through here, so no layer is added that is not needed.
    read = answer.content.readany
    while chunk := await read():
        await writer.write(chunk)
    await response.write_eof()
    return response


async def _relay(request: web.Request, connection: Connection, head: Head) -> web.StreamResponse:
    """The engine's answer passed on: whole when short and of known length, else streamed."""
    headers = CIMultiDict((k, v) for k, v in head.headers if k.lower() not in _HOP_BY_HOP)
    reason = head.reason or None
    length = head.length
    if length is not None and length <= BUFFERED_ANSWER and request.method != "HEAD":
        body = await connection.read_all()
        return web.Response(status=head.status, reason=reason, headers=headers, body=body)
    response = web.StreamResponse(status=head.status, reason=reason, headers=headers)
    if length is not None:
        response.content_length = length
    elif request.version == aiohttp.HttpVersion11 and request.method != "HEAD":
        response.enable_chunked_encoding()
    writer = await response.prepare(request)
    assert writer is not None, "a new response is prepared once"
    transport = request.transport
    sink = _chunk_sink(transport) if response.chunked and transport is not None else None
    read = connection.read
    while chunk := await read():
        await writer.write(chunk)
        if sink is not None:
            # Once the client has taken what waits for it, each token goes from the
            # engine's connection straight to the client's (see ``_chunk_sink``).
            await writer.drain()
            connection.forward(sink)
    await response.write_eof()
    return response


def _chunk_sink(transport: asyncio.Transport) -> Callable[[bytes], bool]:
    """Writes a piece of body to the client as one HTTP/1.1 chunk, as aiohttp's writer
    would, from the engine connection's callback; False once the client falls behind.

    A token streamed at 95 a second otherwise woke the relaying task for each one, and
    passed through aiohttp's writer: about a fifth of what the daemon spent on a lone
    stream (1.30 against 1.05 % of a core, means of six interleaved runs each).
    """
    write, waiting, closing = transport.write, transport.get_write_buffer_size, transport.is_closing

    def take(piece: bytes) -> bool:
        if closing():
            return False  # the relay's next write raises, and the engine's connection closes
        write(b"%x\r\n%b\r\n" % (len(piece), piece))
        return waiting() < SINK_HIGH_WATER

    return take


@functools.lru_cache(maxsize=64)
def _plain_http(upstream: str) -> tuple[str, int, str, str] | None:
    """Host, port, Host header and path prefix of an ``http://`` engine; None for others."""
    url = URL(upstream)
    if url.scheme != "http" or url.host is None or url.port is None or url.user is not None:
        return None
    if url.query_string or url.fragment:
        return None
    return url.raw_host or url.host, url.port, url.raw_authority, url.raw_path.rstrip("/")


@functools.lru_cache(maxsize=256)
def _upstream_url(upstream: str, path_qs: str) -> URL:
    # Clients call the same few paths over and over; parsing the URL once per path saves
    # that work on every request. The bound keeps odd query strings from piling up.
    return URL(upstream + path_qs)


async def _read_body(request: web.Request) -> bytes:
    content = request.content
    if content.is_eof():
        # The whole body came with the headers, as a short request's does: no waiting, so
        # no deadline to arm.
        body = content.read_nowait()
        if len(body) > MAX_V1_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_V1_BODY, actual_size=len(body))
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(V1_BODY_TIMEOUT):
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > MAX_V1_BODY:
                    raise web.HTTPRequestEntityTooLarge(max_size=MAX_V1_BODY, actual_size=size)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {V1_BODY_TIMEOUT:g} s"
        ) from None
    return b"".join(chunks)


class Asked:
    """The ``model`` a request names, and how to hand its body to the engine."""

    __slots__ = ("_payload", "_span", "body", "model")

    def __init__(
        self,
        model: str | None,
        body: bytes,
        payload: dict[str, Any] | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.model = model
        self.body = body
        self._payload = payload
        self._span = span  # where the body holds the value of "model", in bytes

    def for_engine(self, served_name: str) -> bytes:
        """The body with ``model`` set to the name the engine knows, else unchanged.

        Only the value of ``model`` is replaced, in place: the rest goes through byte for
        byte, never decoded and encoded again, however long the conversation.
        """
        payload = self._payload
        if payload is None or payload.get("model") == served_name:
            return self.body
        name = json.dumps(served_name).encode()
        if self._span is not None:
            start, end = self._span
            return b"".join((self.body[:start], name, self.body[end:]))
        # No "model" in the body (it came in the query), or a body we could not map.
        return json.dumps({**payload, "model": served_name}).encode()


def _requested_model(body: bytes, request: web.Request) -> Asked:
    """The ``model`` the request names, and its JSON body when it has one."""
    query_model = request.query.get("model")
    if not body:
        return Asked(query_model, body)
    found = _json_object(body)
    if found is None:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if request.content_type == "application/json":
                raise BadRequest(f"request body is not valid JSON: {err}") from err
            return Asked(query_model, body)  # multipart uploads and the like: passed as they are
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        span = None
    else:
        payload, span = found
    model = payload.get("model", query_model)
    if model is not None and not isinstance(model, str):
        raise BadRequest('"model" must be a string', param="model")
    return Asked(model, body, payload, span)


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match else at


def _json_object(body: bytes) -> tuple[dict[str, Any], tuple[int, int] | None] | None:
    """A body holding one JSON object: the object, and the byte span of its ``model``.

    Each member's value is decoded by the standard decoder, so this costs about what
    ``json.loads`` does. None for anything else (not UTF-8, not an object, not valid):
    ``json.loads`` then decides, and says what is wrong.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    space, decode = _skip_space, _DECODER.raw_decode
    found: dict[str, Any] = {}
    span: tuple[int, int] | None = None
    try:
        at = space(text, 0)
        if text[at : at + 1] != "{":
            return None
        at = space(text, at + 1)
        if text[at : at + 1] == "}":
            at += 1
        else:
            while True:
                if text[at : at + 1] != '"':
                    return None
                key, at = decode(text, at)
                at = space(text, at)
                if text[at : at + 1] != ":":
                    return None
                start = space(text, at + 1)
                found[key], at = decode(text, start)
                if key == "model":
                    span = (start, at)  # the last one wins, as in json.loads
                at = space(text, at)
                if text[at : at + 1] == "}":
                    at += 1
                    break
                if text[at : at + 1] != ",":
                    return None
                at = space(text, at + 1)
    except ValueError:  # json.JSONDecodeError, from a member's value
        return None
    if space(text, at) != len(text):
        return None
    if span is not None and len(text) != len(body):
        # Not ASCII: the span counts characters, the body bytes.
        span = (len(text[: span[0]].encode()), len(text[: span[1]].encode()))
    return found, span


def error_response(request: web.Request, err: OrchestratorError) -> web.Response:
    """Our error as a response: OpenAI's shape on /v1, ours everywhere else."""
    body = openai_error(err) if is_gateway_path(request.path) else Error.of(err)
    return web.json_response(body.to_json(), status=err.status, headers=err.headers())
