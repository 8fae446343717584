"""HTTP API: thin aiohttp handlers over the switcher.

Handlers parse a body with its model from ``schemas``, call one method, and render an
answer model from ``answers``. Every error, ours or aiohttp's, leaves through
``error_middleware`` as ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from . import answers
from .balancer import Balancer
from .cache import SnapshotVerdict
from .catalog import Catalog
from .compose import ModelSpec
from .errors import (
    AssetNotFound,
    BadRequest,
    ContainerNotFound,
    OrchestratorError,
    RequestTimeout,
    SwitchNotFound,
    TooManyStreams,
)
from .events import EventHub, sse_message
from .gateway import MAX_V1_BODY, Gateway, error_response
from .history import History, Operation
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import openapi_document
from .probes import Answer
from .registry import ModelEntry
from .runtime import ModelRuntime
from .schemas import (
    ModelChanges,
    NewModel,
    Parsed,
    PullRequest,
    SleepRequest,
    StopRequest,
    SwitchRequest,
    parse,
)
from .security import (
    AccessPolicy,
    add_response_headers,
    audit,
    guard_middleware,
    is_gateway_path,
    is_plain_probe,
)
from .server import ConnectionGuard
from .states import State, Status
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
CATALOG = web.AppKey[Catalog]("catalog")
GATEWAY = web.AppKey[Gateway | None]("gateway")
EVENTS = web.AppKey[EventHub]("events")
METRICS = web.AppKey[Metrics]("metrics")
HEALTH = web.AppKey["HealthAnswers"]("health")
POLICY = web.AppKey[AccessPolicy]("policy")
BALANCER = web.AppKey[Balancer | None]("balancer")
# Where the agent check listens, for /status (haproxy-config reads it); None: off.
AGENT = web.AppKey[answers.AgentAddress | None]("agent")
# Clients that may follow /events at once; each model's log has the same bound.
STREAM_LIMIT = web.AppKey[int]("stream_limit")

WEB_DIR = Path(__file__).parent / "web"
DASHBOARD_ASSETS = frozenset(p.name for p in WEB_DIR.iterdir() if p.is_file())
SSE_HEARTBEAT = 15.0
DEFAULT_LOG_TAIL = 100
MAX_LOG_TAIL = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def _render(
    answer: answers.Answer,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    return web.json_response(
        answer.to_json(), status=status, headers=headers, content_type=content_type
    )


async def cache_verdicts(switcher: Switcher) -> dict[str, SnapshotVerdict | None]:
    """Each model's cache verdict; file-system work, so off the event loop."""

    def verify() -> dict[str, SnapshotVerdict | None]:
        return {spec.id: switcher.verdicts.of(spec) for spec in switcher.models.values()}

    return await asyncio.to_thread(verify)


def _registry_facts(entry: ModelEntry) -> dict[str, Any]:
    """What the registry knows of a model beyond what compose says."""
    return {
        "origin": entry.origin,
        "enabled": entry.enabled,
        "source": {"repo": entry.repo, "path": entry.path} if entry.origin == "registry" else None,
        "image": entry.image,
        "engine": entry.engine,
        "capabilities": entry.capabilities,
        "defaults": entry.defaults,
        "metadata": entry.metadata,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
    }


def _model(
    app: web.Application, spec: ModelSpec, verdict: SnapshotVerdict | None, now: float
) -> answers.Model:
    switcher, runtime, watcher, catalog = app[SWITCHER], app[RUNTIME], app[WATCHER], app[CATALOG]
    status = switcher.status
    engine = watcher.container(spec.engine_service)
    running = engine is not None and engine.running
    started = engine.started_at.timestamp() if running and engine and engine.started_at else None
    upstream: str | None = None
    sleeper = status.sleeper(spec.id)
    if status.active == spec.id and status.upstream:
        upstream = status.upstream
    elif sleeper is not None:
        upstream = sleeper.upstream
    elif running:
        upstream = runtime.upstream_url(spec, engine)
    progress = catalog.pull_progress(spec.id)
    entry = catalog.entry_or_none(spec.id) or ModelEntry(id=spec.id, origin="compose")
    return answers.Model.model_validate(
        {
            "id": spec.id,
            "display_name": spec.display_name,
            "repo": spec.repo,
            "served_name": spec.served_name,
            "services": spec.services,
            "engine_service": spec.engine_service,
            "active": status.active == spec.id,
            "residency": status.residency(spec.id),
            "sleep": spec.sleep,
            "container": None if engine is None else answers.Container.of(engine),
            "upstream": upstream,
            "started_at": started,
            "uptime": None if started is None else round(now - started, 1),
            "checkpoint": spec.checkpoint,
            "startup_timeout": spec.startup_timeout,
            "aliases": _aliases(app, spec),
            "cache": verdict,
            "pull": None if progress is None else answers.PullProgress.of(progress),
            **_registry_facts(entry),
        }
    )


def _aliases(app: web.Application, spec: ModelSpec) -> list[str]:
    """Every other name /v1 requests may give the model: its own aliases and the config's."""
    gateway = app[GATEWAY]
    configured = [] if gateway is None else [a for a, m in gateway.aliases.items() if m == spec.id]
    return list(dict.fromkeys([*spec.aliases, *configured]))


async def _models(app: web.Application) -> list[answers.Model]:
    verdicts = await cache_verdicts(app[SWITCHER])
    now = time.time()
    return [_model(app, spec, verdicts.get(spec.id), now) for spec in app[SWITCHER].models.values()]


async def _one_model(app: web.Application, model_id: str) -> answers.ModelAnswer:
    app[SWITCHER].spec(model_id)  # 404 for an unknown model
    return answers.ModelAnswer(model=next(m for m in await _models(app) if m.id == model_id))


async def _status(app: web.Application) -> answers.Status:
    switcher, catalog, gateway = app[SWITCHER], app[CATALOG], app[GATEWAY]
    status = switcher.status
    last = app[HISTORY].last
    return answers.Status(
        state=status.state,
        active=status.active,
        target=status.target,
        since=status.since,
        reason=status.reason,
        serving=switcher.serving,
        upstream=status.upstream,
        queue=[answers.PendingSwitch.of(op) for op in switcher.queued()],
        models=await _models(app),
        last_switch=None if last is None else answers.Switch.of(last),
        warm_pool=answers.WarmPool(
            asleep=[s.model for s in status.asleep],
            ram_bytes=sum(s.ram_bytes for s in status.asleep),
            max_asleep=switcher.pool.max_asleep,
            ram_budget_bytes=switcher.pool.ram_budget,
            sleep_ttl=switcher.pool.sleep_ttl,
        ),
        standby=answers.Standby(
            models=list(switcher.standbys.models), limit=switcher.standbys.limit
        ),
        pulls={
            model_id: answers.PullProgress.of(progress)
            for model_id, progress in catalog.pulls().items()
        },
        gateway=None if gateway is None else answers.GatewayTraffic.of(gateway.traffic.snapshot()),
        agent=app[AGENT],
    )


async def _answer(request: web.Request, op: Operation, wait: bool) -> web.Response:
    if not wait and not op.future.done():
        location = f"/switches/{op.id}"
        accepted = answers.SwitchAccepted(
            switch=answers.PendingSwitch.of(op),
            poll=location,
            status=await _status(request.app),
        )
        return _render(accepted, status=202, headers={"Location": location})
    # Shielded: a client that hangs up must not cancel a switch others may be waiting on.
    record = await asyncio.shield(op.future)
    return _render(
        answers.SwitchDone(switch=answers.Switch.of(record), status=await _status(request.app))
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


async def post_sleep(request: web.Request) -> web.Response:
    body = await _parsed(request, SleepRequest)
    audit(request, "sleep")
    op = await request.app[SWITCHER].sleep()
    return await _answer(request, op, body.wait)


async def get_status(request: web.Request) -> web.Response:
    return _render(await _status(request.app))


async def get_switch(request: web.Request) -> web.Response:
    switch_id = request.match_info["switch_id"]
    history = request.app[HISTORY]
    op = history.operation(switch_id)
    if op is not None and not op.future.done():
        return _render(answers.SwitchAnswer(switch=answers.PendingSwitch.of(op)))
    record = await history.get(switch_id)
    if record is None:
        raise SwitchNotFound(f"no switch with id {switch_id!r}")
    return _render(answers.SwitchAnswer(switch=answers.Switch.of(record)))


async def get_switches(request: web.Request) -> web.Response:
    records = await request.app[HISTORY].recent(limit=50)
    return _render(answers.SwitchList(switches=[answers.Switch.of(r) for r in records]))


class HealthAnswers:
    """/health's answer, rendered when what it says changes rather than for every probe.

    Load balancers ask thousands of times a second, a switch included, and the answer
    changes a few times a switch. The switcher replaces its status snapshot at each
    transition and never alters one, so the snapshot, compared by identity, and whether
    a switch is under way tell whether the rendered answer still holds.
    """

    def __init__(self, switcher: Switcher) -> None:
        self._switcher = switcher
        self._status: Status | None = None
        self._under_way = False
        self._code = 503
        self._body = b""

    def current(self) -> tuple[int, bytes]:
        """The status code and body /health answers with now."""
        switcher = self._switcher
        status = switcher.status
        under_way = switcher.switch_under_way
        if status is not self._status or under_way != self._under_way:
            answer = _health_answer(switcher, None)
            self._code = 200 if isinstance(answer, answers.HealthPass) else 503
            self._body = json.dumps(answer.to_json()).encode()
            self._status, self._under_way = status, under_way
        return self._code, self._body


def _health_answer(switcher: Switcher, wanted: str | None) -> answers.Answer:
    status = switcher.status
    if switcher.serving and (wanted is None or wanted == status.active):
        return answers.HealthPass(model=status.active)
    return answers.HealthFail(
        state=status.state, model=status.active, output=_health_reason(switcher, wanted)
    )


_LIVENESS = json.dumps(answers.Liveness().to_json()).encode()


def plain_probe_answers(app: web.Application) -> Answer:
    """What the connections answer before the application sees the request: load
    balancers' plain probes of /health and /health/live, with the bytes the handlers
    below would send (see ``probes``). A probe with a question in its query, one a page
    sent, or one under a stranger Host is the application's."""
    health, policy = app[HEALTH], app[POLICY]

    def answer(method: str, path: str, headers: Mapping[str, str]) -> tuple[int, bytes] | None:
        if not is_plain_probe(policy, method, path, headers):
            return None
        return health.current() if path == "/health" else (200, _LIVENESS)

    return answer


async def get_health(request: web.Request) -> web.Response:
    """Answered from the switcher's in-memory state: no Docker call, no waiting on a switch."""
    if request.query_string:
        switcher = request.app[SWITCHER]
        wanted = request.query.get("model")
        can_switch = _flag_parameter(request, "can_switch")
        if wanted is not None:
            switcher.spec(wanted)  # 404 for a model that does not exist
        elif can_switch:
            raise BadRequest(
                "can_switch asks about one model: /health?model=<id>&can_switch=true",
                field="model",
            )
        answer = _health_answer(switcher, wanted)
        if can_switch and wanted is not None and isinstance(answer, answers.HealthFail):
            answer = _switchable_answer(request.app, wanted, answer)
        failing = isinstance(answer, answers.HealthFail)
        return _render(answer, status=503 if failing else 200, content_type=HEALTH_JSON)
    code, body = request.app[HEALTH].current()
    return web.Response(body=body, status=code, content_type=HEALTH_JSON, charset="utf-8")


def _switchable_answer(
    app: web.Application, wanted: str, failed: answers.HealthFail
) -> answers.Answer:
    """Pass when this daemon would take a switch to ``wanted`` now (see ``Balancer``)."""
    balancer = app[BALANCER]
    if balancer is None:
        reason: str | None = "this daemon runs without the /v1 gateway"
    else:
        reason = balancer.refusal(wanted)
    if reason is not None:
        output = f"{failed.output}; a switch to {wanted} would not be taken now: {reason}"
        return failed.model_copy(update={"output": output})
    loaded = app[SWITCHER].status.active
    doing = f"would switch from {loaded}" if loaded else "would load it"
    return answers.HealthSwitchable(model=wanted, loaded=loaded, output=f"{wanted}: {doing}")


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


async def get_models(request: web.Request) -> web.Response:
    return _render(answers.ModelList(models=await _models(request.app)))


async def get_model(request: web.Request) -> web.Response:
    return _render(await _one_model(request.app, request.match_info["model_id"]))


async def post_model(request: web.Request) -> web.Response:
    new = await _parsed(request, NewModel)
    entry = await request.app[CATALOG].add(new)
    audit(request, "register", model=entry.id, image=entry.image, repo=entry.repo, path=entry.path)
    answer = await _one_model(request.app, entry.id)
    return _render(answer, status=201, headers={"Location": f"/models/{entry.id}"})


async def patch_model(request: web.Request) -> web.Response:
    changes = await _parsed(request, ModelChanges)
    entry = await request.app[CATALOG].update(request.match_info["model_id"], changes)
    fields = sorted(changes.model_fields_set)
    audit(request, "change", model=entry.id, fields=fields, image=entry.image)
    return _render(await _one_model(request.app, entry.id))


async def delete_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    await request.app[CATALOG].remove(model_id)
    audit(request, "delete", model=model_id)
    return _render(answers.Deleted(deleted=model_id))


async def post_enable(request: web.Request) -> web.Response:
    entry = await request.app[CATALOG].set_enabled(request.match_info["model_id"], True)
    audit(request, "enable", model=entry.id)
    return _render(await _one_model(request.app, entry.id))


async def post_disable(request: web.Request) -> web.Response:
    entry = await request.app[CATALOG].set_enabled(request.match_info["model_id"], False)
    audit(request, "disable", model=entry.id)
    return _render(await _one_model(request.app, entry.id))


async def post_pull(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    body = await _parsed(request, PullRequest)
    progress = request.app[CATALOG].start_pull(model_id, body.revision)
    audit(request, "pull", model=model_id, revision=body.revision)
    location = f"/models/{model_id}"
    started = answers.PullStarted(pull=answers.PullProgress.of(progress), poll=location)
    return _render(started, status=202, headers={"Location": location})


async def get_live(request: web.Request) -> web.Response:
    return web.Response(body=_LIVENESS, content_type=HEALTH_JSON, charset="utf-8")


async def get_v1_models(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    return _render(gateway.list_models(request.app[CATALOG].context_lengths()))


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
        await response.write(sse_message("status", (await _status(request.app)).to_json()))
        while True:
            try:
                # A timeout, not wait_for: wait_for wraps each get in a task of its own.
                async with asyncio.timeout(SSE_HEARTBEAT):
                    event = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:  # the daemon is stopping
                return response
            await response.write(event.sse)


def _tail_parameter(request: web.Request) -> int:
    raw = request.query.get("tail", str(DEFAULT_LOG_TAIL))
    # str.isdigit() accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= MAX_LOG_TAIL:
        raise BadRequest(f"tail must be a whole number from 1 to {MAX_LOG_TAIL}", field="tail")
    return int(raw)


def _flag_parameter(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in {"1", "true", "yes", "0", "false", "no"}:
        raise BadRequest(f"{name} must be true or false", field=name)
    return raw in {"1", "true", "yes"}


async def get_model_logs(request: web.Request) -> web.StreamResponse:
    """The model's engine log: the last lines, or (follow) those and every new one as SSE."""
    switcher, runtime = request.app[SWITCHER], request.app[RUNTIME]
    spec = switcher.spec(request.match_info["model_id"])
    tail, follow = _tail_parameter(request), _flag_parameter(request, "follow")
    engine = request.app[WATCHER].container(spec.engine_service)
    if not follow:
        text = await runtime.logs_tail(engine.id, tail) if engine is not None else ""
        container = None if engine is None else engine.name
        logs = answers.ModelLogs(model=spec.id, container=container, lines=text.splitlines())
        return _render(logs)
    if engine is None:
        raise ContainerNotFound(
            f"model {spec.id} has no container yet; follow its log once a switch has started it",
            model=spec.id,
        )
    follower = runtime.follow_logs(engine.id, tail)  # refused here when too many follow
    try:
        response = await _event_stream(request)
        await response.write(sse_message("container", {"model": spec.id, "container": engine.name}))
        async for line in follower.lines():
            await response.write(sse_message("log", line))
        await response.write(sse_message("end", {"model": spec.id}))
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


async def _end_streams(app: web.Application) -> None:
    # Streams never end on their own; the daemon's shutdown must not wait on them.
    app[EVENTS].close()


def create_app(
    *,
    switcher: Switcher,
    runtime: ModelRuntime,
    watcher: Watcher,
    history: History,
    events: EventHub,
    metrics: Metrics,
    catalog: Catalog,
    gateway: Gateway | None = None,
    policy: AccessPolicy | None = None,
    max_streams: int = 64,
    connections: ConnectionGuard | None = None,
    balancer: Balancer | None = None,
    agent: answers.AgentAddress | None = None,
) -> web.Application:
    """The HTTP API over the daemon's parts, which ``build_daemon`` wires together."""
    policy = policy or AccessPolicy()
    middlewares = [error_middleware, guard_middleware(policy)]
    if connections is not None:
        middlewares.insert(0, connections.middleware)
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app.on_response_prepare.append(add_response_headers)
    app.on_shutdown.append(_end_streams)
    app[STREAM_LIMIT] = max_streams
    app[SWITCHER], app[RUNTIME], app[WATCHER], app[HISTORY] = switcher, runtime, watcher, history
    app[CATALOG], app[GATEWAY], app[EVENTS], app[METRICS] = catalog, gateway, events, metrics
    app[HEALTH] = HealthAnswers(switcher)
    app[BALANCER], app[AGENT] = balancer, agent
    app[POLICY] = policy
    app.router.add_post("/switch", post_switch)
    app.router.add_post("/stop", post_stop)
    app.router.add_post("/sleep", post_sleep)
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
