"""HTTP API: thin aiohttp handlers over the switcher.

Handlers parse a body with its model from ``schemas``, call one method, and render
JSON. Every error, ours or aiohttp's, leaves through ``error_middleware`` as
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from .cache import SnapshotVerdict
from .catalog import Catalog
from .errors import (
    AssetNotFound,
    BadRequest,
    ContainerNotFound,
    OrchestratorError,
    RequestTimeout,
    SwitchNotFound,
    TooManyStreams,
)
from .events import EventHub
from .gateway import MAX_V1_BODY, Gateway, error_response
from .history import History, Operation, SwitchRecord
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import openapi_document
from .pull import PullProgress
from .registry import ModelEntry
from .runtime import ModelRuntime
from .schemas import ModelChanges, NewModel, Parsed, PullRequest, StopRequest, SwitchRequest, parse
from .security import (
    AccessPolicy,
    add_response_headers,
    audit,
    guard_middleware,
    is_gateway_path,
)
from .server import ConnectionGuard
from .states import State
from .switcher import Switcher
from .watcher import Watcher

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024
# A client that sends its headers and then trickles the body holds a connection open.
BODY_TIMEOUT = 30.0
HEALTH_JSON = "application/health+json"

SWITCHER = web.AppKey[Switcher]("switcher")
RUNTIME = web.AppKey[ModelRuntime]("runtime")
WATCHER = web.AppKey[Watcher]("watcher")
HISTORY = web.AppKey[History]("history")
CATALOG = web.AppKey[Catalog | None]("catalog")
GATEWAY = web.AppKey[Gateway | None]("gateway")
EVENTS = web.AppKey[EventHub]("events")
METRICS = web.AppKey[Metrics]("metrics")
# Clients that may follow /events at once; each model's log has the same bound.
STREAM_LIMIT = web.AppKey[int]("stream_limit")

WEB_DIR = Path(__file__).parent / "web"
DASHBOARD_ASSETS = frozenset(p.name for p in WEB_DIR.iterdir() if p.is_file())
SSE_HEARTBEAT = 15.0
DEFAULT_LOG_TAIL = 100
MAX_LOG_TAIL = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OrchestratorError as err:
        if err.status >= 500:
            log.warning("request failed", path=request.path, code=err.code, error=err.message)
        return error_response(request, err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = (err.reason or "error").lower().replace(" ", "_")
        message = err.text if err.text and not err.text.startswith(f"{err.status}:") else err.reason
        if err.status == 413:
            limit = MAX_V1_BODY if is_gateway_path(request.path) else MAX_BODY
            message = f"request body is larger than {limit // 1024} KiB"
        translated = OrchestratorError(message)
        translated.status, translated.code = err.status, code
        response = error_response(request, translated)
        response.headers.update({k: v for k, v in err.headers.items() if k.lower() == "allow"})
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(request, OrchestratorError("internal error; see the daemon's log"))


async def _json_body(request: web.Request) -> Any:
    """The decoded JSON body, {} for none; what it must hold is the models' to say."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()  # raises 413 past client_max_size
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {BODY_TIMEOUT:g} s") from None
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from err


async def _parsed(request: web.Request, model: type[Parsed]) -> Parsed:
    return parse(model, await _json_body(request))


def render_verdict(verdict: SnapshotVerdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        name: str(value) if isinstance(value, Path) else value
        for name, value in dataclasses.asdict(verdict).items()
    }


async def cache_verdicts(switcher: Switcher) -> dict[str, SnapshotVerdict | None]:
    """Each model's cache verdict; file-system work, so off the event loop."""

    def verify() -> dict[str, SnapshotVerdict | None]:
        return {spec.id: switcher.verdicts.of(spec) for spec in switcher.models.values()}

    return await asyncio.to_thread(verify)


def render_pull(progress: PullProgress | None) -> dict[str, Any] | None:
    return None if progress is None else progress.to_json()


def render_entry(entry: ModelEntry | None) -> dict[str, Any]:
    """What the registry knows of a model beyond what compose says."""
    if entry is None:
        return {"origin": "compose", "enabled": True}
    return {
        "origin": entry.origin,
        "enabled": entry.enabled,
        "source": {"repo": entry.repo, "path": entry.path} if entry.origin == "registry" else None,
        "image": entry.image,
        "engine": entry.engine,
        "capabilities": entry.capabilities,
        "defaults": entry.defaults,
        "metadata": entry.metadata,
        "created_at": _iso(entry.created_at),
        "updated_at": _iso(entry.updated_at),
    }


def render_models(
    app: web.Application, verdicts: dict[str, SnapshotVerdict | None]
) -> list[dict[str, Any]]:
    switcher, runtime, watcher, catalog = app[SWITCHER], app[RUNTIME], app[WATCHER], app[CATALOG]
    status = switcher.status
    now = time.time()
    models = []
    for spec in switcher.models.values():
        engine = watcher.container(spec.engine_service)
        running = engine is not None and engine.running
        started = (
            engine.started_at.timestamp() if running and engine and engine.started_at else None
        )
        upstream: str | None = None
        if status.active == spec.id and status.upstream:
            upstream = status.upstream
        elif running:
            upstream = runtime.upstream_url(spec, engine)
        models.append(
            {
                "id": spec.id,
                "display_name": spec.display_name,
                "repo": spec.repo,
                "served_name": spec.served_name,
                "services": list(spec.services),
                "engine_service": spec.engine_service,
                "active": status.active == spec.id,
                "container": None
                if engine is None
                else {
                    "id": engine.id[:12],
                    "name": engine.name,
                    "state": engine.status,
                    "exit_code": engine.exit_code,
                },
                "upstream": upstream,
                "started_at": _iso(started),
                "uptime": None if started is None else round(now - started, 1),
                "checkpoint": None if spec.checkpoint is None else str(spec.checkpoint),
                "cache": render_verdict(verdicts.get(spec.id)),
                "pull": render_pull(catalog.pull_progress(spec.id)) if catalog else None,
                **render_entry(catalog.entry_or_none(spec.id) if catalog else None),
            }
        )
    return models


async def render_status(app: web.Application) -> dict[str, Any]:
    switcher, catalog, gateway = app[SWITCHER], app[CATALOG], app[GATEWAY]
    status = switcher.status
    models = render_models(app, await cache_verdicts(switcher))
    last = app[HISTORY].last
    return {
        "state": str(status.state),
        "active": status.active,
        "target": status.target,
        "since": _iso(status.since),
        "reason": status.reason,
        "serving": switcher.serving,
        "upstream": status.upstream,
        "queue": [op.describe() for op in switcher.queued()],
        "models": models,
        "last_switch": None if last is None else render_switch(last),
        "pulls": {
            model_id: render_pull(progress)
            for model_id, progress in (catalog.pulls().items() if catalog else [])
        },
        "gateway": None if gateway is None else render_traffic(gateway),
    }


def render_traffic(gateway: Gateway) -> dict[str, Any]:
    return dataclasses.asdict(gateway.traffic.snapshot())


def render_switch(record: SwitchRecord) -> dict[str, Any]:
    body = record.to_json()
    body["from"] = body.pop("from_model")
    body["to"] = body.pop("to_model")
    body["requested_at"] = _iso(record.requested_at)
    body["finished_at"] = _iso(record.finished_at)
    if record.duration is not None:
        body["duration"] = round(record.duration, 3)
    return body


async def _answer(request: web.Request, op: Operation, wait: bool) -> web.Response:
    if not wait and not op.future.done():
        location = f"/switches/{op.id}"
        return web.json_response(
            {
                "switch": op.describe(),
                "poll": location,
                "status": await render_status(request.app),
            },
            status=202,
            headers={"Location": location},
        )
    # Shielded: a client that hangs up must not cancel a switch others may be waiting on.
    record = await asyncio.shield(op.future)
    return web.json_response(
        {
            "switch": render_switch(record),
            "status": await render_status(request.app),
        }
    )


async def post_switch(request: web.Request) -> web.Response:
    body = await _parsed(request, SwitchRequest)
    audit(request, "switch", model=body.target)
    op = await request.app[SWITCHER].switch_to(body.target)
    return await _answer(request, op, body.wait)


async def post_stop(request: web.Request) -> web.Response:
    body = await _parsed(request, StopRequest)
    audit(request, "stop")
    op = await request.app[SWITCHER].stop()
    return await _answer(request, op, body.wait)


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(await render_status(request.app))


async def get_switch(request: web.Request) -> web.Response:
    switch_id = request.match_info["switch_id"]
    history = request.app[HISTORY]
    op = history.operation(switch_id)
    if op is not None and not op.future.done():
        return web.json_response({"switch": op.describe()})
    record = await history.get(switch_id)
    if record is None:
        raise SwitchNotFound(f"no switch with id {switch_id!r}")
    return web.json_response({"switch": render_switch(record)})


async def get_switches(request: web.Request) -> web.Response:
    records = await request.app[HISTORY].recent(limit=50)
    return web.json_response({"switches": [render_switch(r) for r in records]})


async def get_health(request: web.Request) -> web.Response:
    """Answered from the switcher's in-memory state: no Docker call, no waiting on a switch."""
    switcher = request.app[SWITCHER]
    status = switcher.status
    wanted = request.query.get("model")
    if wanted is not None:
        switcher.spec(wanted)  # 404 for a model that does not exist
    passing = switcher.serving and (wanted is None or wanted == status.active)
    if passing:
        body = {"status": "pass", "model": status.active}
    else:
        body = {
            "status": "fail",
            "state": str(status.state),
            "model": status.active,
            "output": _health_reason(switcher, wanted),
        }
    return web.json_response(body, status=200 if passing else 503, content_type=HEALTH_JSON)


def _health_reason(switcher: Switcher, wanted: str | None) -> str:
    status = switcher.status
    if status.state is State.READY and wanted is not None and wanted != status.active:
        return f"{wanted} is not loaded; {status.active} is"
    if switcher.switch_under_way:
        return f"a switch is under way ({status.state}, target {status.target or 'none'})"
    if status.state is State.READY and not status.healthy:
        return f"{status.active} is loaded but not answering its health check"
    if status.reason:
        return status.reason
    return "no model is loaded" if status.state is State.IDLE else f"state is {status.state}"


async def _rendered_models(request: web.Request) -> list[dict[str, Any]]:
    return render_models(request.app, await cache_verdicts(request.app[SWITCHER]))


async def _rendered_model(request: web.Request, model_id: str) -> dict[str, Any]:
    request.app[SWITCHER].spec(model_id)  # 404 for an unknown model
    return next(m for m in await _rendered_models(request) if m["id"] == model_id)


async def get_models(request: web.Request) -> web.Response:
    return web.json_response({"models": await _rendered_models(request)})


async def get_model(request: web.Request) -> web.Response:
    model = await _rendered_model(request, request.match_info["model_id"])
    return web.json_response({"model": model})


def _catalog(request: web.Request) -> Catalog:
    catalog = request.app[CATALOG]
    if catalog is None:
        raise web.HTTPNotFound(text="this daemon runs without a model registry")
    return catalog


async def post_model(request: web.Request) -> web.Response:
    new = await _parsed(request, NewModel)
    entry = await _catalog(request).add(new)
    audit(request, "register", model=entry.id, image=entry.image, repo=entry.repo, path=entry.path)
    model = await _rendered_model(request, entry.id)
    return web.json_response(
        {"model": model}, status=201, headers={"Location": f"/models/{entry.id}"}
    )


async def patch_model(request: web.Request) -> web.Response:
    changes = await _parsed(request, ModelChanges)
    entry = await _catalog(request).update(request.match_info["model_id"], changes)
    fields = sorted(changes.model_fields_set)
    audit(request, "change", model=entry.id, fields=fields, image=entry.image)
    return web.json_response({"model": await _rendered_model(request, entry.id)})


async def delete_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    await _catalog(request).remove(model_id)
    audit(request, "delete", model=model_id)
    return web.json_response({"deleted": model_id})


async def post_enable(request: web.Request) -> web.Response:
    entry = await _catalog(request).set_enabled(request.match_info["model_id"], True)
    audit(request, "enable", model=entry.id)
    return web.json_response({"model": await _rendered_model(request, entry.id)})


async def post_disable(request: web.Request) -> web.Response:
    entry = await _catalog(request).set_enabled(request.match_info["model_id"], False)
    audit(request, "disable", model=entry.id)
    return web.json_response({"model": await _rendered_model(request, entry.id)})


async def post_pull(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    body = await _parsed(request, PullRequest)
    progress = _catalog(request).start_pull(model_id, body.revision)
    audit(request, "pull", model=model_id, revision=body.revision)
    return web.json_response(
        {"pull": render_pull(progress), "poll": f"/models/{model_id}"},
        status=202,
        headers={"Location": f"/models/{model_id}"},
    )


async def get_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "pass"}, content_type=HEALTH_JSON)


async def get_v1_models(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    catalog = request.app[CATALOG]
    lengths = catalog.context_lengths() if catalog is not None else {}
    return web.json_response(gateway.list_models(lengths))


async def proxy_v1(request: web.Request) -> web.StreamResponse:
    return await _gateway(request).forward(request)


def _gateway(request: web.Request) -> Gateway:
    gateway = request.app[GATEWAY]
    if gateway is None:
        raise web.HTTPNotFound(text="this daemon runs without the /v1 gateway")
    return gateway


# --- live views: metrics, events, logs, the dashboard ------------------------------------


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx in front must not hold events back
        }
    )
    await response.prepare(request)
    return response


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def get_events(request: web.Request) -> web.StreamResponse:
    """Every state change as a server-sent event, starting with the current status."""
    hub = request.app[EVENTS]
    limit = request.app[STREAM_LIMIT]
    if hub.subscribers >= limit:
        raise TooManyStreams(
            f"{limit} clients already follow /events; close one, or poll /status",
            retry_after=5,
        )
    async with hub.subscribe() as queue:
        response = await _event_stream(request)
        await response.write(_sse("status", await render_status(request.app)))
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), SSE_HEARTBEAT)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(_sse(event.kind, event.to_json(), event.id))


def _tail_parameter(request: web.Request) -> int:
    raw = request.query.get("tail", str(DEFAULT_LOG_TAIL))
    # str.isdigit() accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= MAX_LOG_TAIL:
        raise BadRequest(f"tail must be a whole number from 1 to {MAX_LOG_TAIL}", field="tail")
    return int(raw)


def _follow_parameter(request: web.Request) -> bool:
    raw = request.query.get("follow", "false").lower()
    if raw not in {"1", "true", "yes", "0", "false", "no"}:
        raise BadRequest("follow must be true or false", field="follow")
    return raw in {"1", "true", "yes"}


async def get_model_logs(request: web.Request) -> web.StreamResponse:
    """The model's engine log: the last lines, or (follow) those and every new one as SSE."""
    switcher, runtime = request.app[SWITCHER], request.app[RUNTIME]
    spec = switcher.spec(request.match_info["model_id"])
    tail, follow = _tail_parameter(request), _follow_parameter(request)
    engine = request.app[WATCHER].container(spec.engine_service)
    if not follow:
        text = await runtime.logs_tail(engine.id, tail) if engine is not None else ""
        return web.json_response(
            {
                "model": spec.id,
                "container": None if engine is None else engine.name,
                "lines": text.splitlines(),
            }
        )
    if engine is None:
        raise ContainerNotFound(
            f"model {spec.id} has no container yet; follow its log once a switch has started it",
            model=spec.id,
        )
    follower = runtime.follow_logs(engine.id, tail)  # refused here when too many follow
    try:
        response = await _event_stream(request)
        await response.write(_sse("container", {"model": spec.id, "container": engine.name}))
        async for line in follower.lines():
            await response.write(_sse("log", line))
        await response.write(_sse("end", {"model": spec.id}))
    finally:
        follower.close()
    return response


@functools.cache
def _openapi_json() -> str:
    # The document is fixed for the life of the process: build and encode it once.
    return json.dumps(openapi_document())


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(text=_openapi_json(), content_type="application/json")


async def get_dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def get_dashboard_asset(request: web.Request) -> web.FileResponse:
    # Only the files shipped with the package, by name: aiohttp's static route answers a
    # missing file with a plain-text 404 from inside FileResponse, past the error middleware.
    filename = request.match_info["filename"]
    if filename not in DASHBOARD_ASSETS:
        raise AssetNotFound(f"no dashboard file named {filename!r}; the dashboard is at /")
    return web.FileResponse(WEB_DIR / filename)


def create_app(
    *,
    switcher: Switcher,
    runtime: ModelRuntime,
    watcher: Watcher,
    history: History,
    events: EventHub,
    metrics: Metrics,
    catalog: Catalog | None = None,
    gateway: Gateway | None = None,
    policy: AccessPolicy | None = None,
    max_streams: int = 64,
    connections: ConnectionGuard | None = None,
) -> web.Application:
    """The HTTP API over the daemon's parts, which ``build_daemon`` wires together."""
    middlewares = [error_middleware, guard_middleware(policy or AccessPolicy())]
    if connections is not None:
        middlewares.insert(0, connections.middleware)
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app.on_response_prepare.append(add_response_headers)
    app[STREAM_LIMIT] = max_streams
    app[SWITCHER], app[RUNTIME], app[WATCHER], app[HISTORY] = switcher, runtime, watcher, history
    app[CATALOG], app[GATEWAY], app[EVENTS], app[METRICS] = catalog, gateway, events, metrics
    app.router.add_post("/switch", post_switch)
    app.router.add_post("/stop", post_stop)
    app.router.add_get("/status", get_status)
    app.router.add_get("/switches", get_switches)
    app.router.add_get("/switches/{switch_id}", get_switch)
    app.router.add_get("/models", get_models)
    app.router.add_post("/models", post_model)
    app.router.add_get("/models/{model_id}", get_model)
    app.router.add_patch("/models/{model_id}", patch_model)
    app.router.add_delete("/models/{model_id}", delete_model)
    app.router.add_post("/models/{model_id}/enable", post_enable)
    app.router.add_post("/models/{model_id}/disable", post_disable)
    app.router.add_post("/models/{model_id}/pull", post_pull)
    app.router.add_get("/health", get_health)
    app.router.add_get("/health/live", get_live)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/events", get_events)
    app.router.add_get("/models/{model_id}/logs", get_model_logs)
    app.router.add_get("/openapi.json", get_openapi)
    app.router.add_get("/", get_dashboard)
    app.router.add_get("/ui/{filename}", get_dashboard_asset)
    app.router.add_get("/v1/models", get_v1_models)
    app.router.add_route("*", "/v1/{tail:.*}", proxy_v1)
    return app
