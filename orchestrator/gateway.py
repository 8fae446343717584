"""The OpenAI-compatible gateway: /v1 requests routed by their ``model`` to its engine.

A request names a model by id, served name or alias. If another model holds the GPU,
the request waits in ``Traffic`` while the daemon switches, then is forwarded. The
answer is passed through as it arrives, so a stream reaches the client chunk by chunk;
a client that hangs up cancels its request to the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from .answers import Error, OpenAIError, OpenAIErrorDetail, V1Model, V1ModelList
from .errors import BadRequest, ModelNotFound, OrchestratorError, RequestTimeout, UpstreamError
from .security import is_gateway_path
from .states import State
from .switcher import Switcher
from .traffic import Traffic

log = structlog.get_logger(__name__)

# Chat requests carry images and long contexts; far above the control API's 64 KiB.
MAX_V1_BODY = 32 * 1024 * 1024
# A client that trickles its body holds a connection open; a large upload still fits.
V1_BODY_TIMEOUT = 120.0
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
        # Told of every forwarded request: its model, status code and seconds.
        self._observers = tuple(observers)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Kept-alive connections to the engine: a new TCP connection per request would
            # cost more than the rest of the gateway's work. No total timeout: a long
            # generation is not an error.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
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
        model_name, payload = _requested_model(body, request)
        if model_name is None:
            raise BadRequest('the request names no model: set "model"', param="model")
        model_id = self.resolve(model_name)
        began = time.monotonic()
        code = 500
        try:
            response = await self._serve(request, model_id, body, payload)
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

    async def _serve(
        self, request: web.Request, model_id: str, body: bytes, payload: dict[str, Any] | None
    ) -> web.StreamResponse:
        spec = self.switcher.spec(model_id)
        if self.traffic.admissible() != model_id:
            # Refused now (unknown, disabled, not on disk) rather than after waiting.
            await asyncio.to_thread(self.switcher.preflight, spec)
        if payload is not None and payload.get("model") != spec.served_name:
            # The engine knows the model by its served name only.
            payload["model"] = spec.served_name
            body = json.dumps(payload).encode()
        async with self.traffic.lease(model_id) as upstream:
            return await self._pass_through(request, upstream, body, model_id)

    async def _pass_through(
        self, request: web.Request, upstream: str, body: bytes, model_id: str
    ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        url = upstream + request.path_qs
        try:
            async with self.session().request(
                request.method, url, data=body or None, headers=headers, allow_redirects=False
            ) as answer:
                response = web.StreamResponse(
                    status=answer.status,
                    reason=answer.reason,
                    headers=CIMultiDict(
                        (k, v) for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP
                    ),
                )
                if answer.content_length is not None:
                    response.content_length = answer.content_length
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            if request.transport is None or request.transport.is_closing():
                log.info("client went away", model=model_id, path=request.path)
                raise
            raise UpstreamError(
                f"the engine of {model_id} at {upstream} did not answer: {err}", model=model_id
            ) from err


async def _read_body(request: web.Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(V1_BODY_TIMEOUT):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > MAX_V1_BODY:
                    raise web.HTTPRequestEntityTooLarge(max_size=MAX_V1_BODY, actual_size=size)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {V1_BODY_TIMEOUT:g} s"
        ) from None
    return b"".join(chunks)


def _requested_model(body: bytes, request: web.Request) -> tuple[str | None, dict[str, Any] | None]:
    """The ``model`` the request names, and its JSON body when it has one."""
    query_model = request.query.get("model")
    if not body:
        return query_model, None
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if request.content_type == "application/json":
            raise BadRequest(f"request body is not valid JSON: {err}") from err
        return query_model, None  # multipart uploads and the like: passed as they are
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    model = payload.get("model", query_model)
    if model is not None and not isinstance(model, str):
        raise BadRequest('"model" must be a string', param="model")
    return model, payload


def error_response(request: web.Request, err: OrchestratorError) -> web.Response:
    """Our error as a response: OpenAI's shape on /v1, ours everywhere else."""
    body = openai_error(err) if is_gateway_path(request.path) else Error.of(err)
    return web.json_response(body.to_json(), status=err.status, headers=err.headers())
