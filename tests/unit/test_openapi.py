"""The OpenAPI document: valid, true to the router, and fuzzed against a running daemon.

The fuzzing runs the daemon as ``serve()`` wires it (catalog, switcher, traffic, gateway,
API keys) over the fake Docker boundary, on 127.0.0.1 in a thread with its own event
loop, with "alpha" loaded. Every documented operation but the streams, /metrics, the
dashboard's page and the /v1 catch-all gets positive and negative cases from
schemathesis. Each answer must be no 5xx, one of the documented status codes, with the
documented content type, headers and body; and a refused request (any 4xx) must leave
"alpha" loaded and ready, with nothing started, stopped or queued.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import orchestrator
from orchestrator.compose import ModelSpec
from orchestrator.docker import ContainerInfo
from orchestrator.openapi import PROXY_METHODS, openapi_document
from orchestrator.states import State
from tests.fakes import TWO_MODEL_COMPOSE, FakeRuntime, make_snapshot, open_daemon
from tests.hubserver import FakeHub

T = TypeVar("T")
AnyCase = Case[Any]

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# Streams that never end, pages that are not JSON, and the catch-all: not fuzzed.
NOT_FUZZED = {"GET /events", "GET /metrics", "GET /"} | {
    f"{method.upper()} /v1/{{tail}}" for method in PROXY_METHODS
}
# Cases per operation: enough to find what breaks in about half a second each; the run is
# the same every time (derandomized). Raise it to look harder.
EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The gateway reads only "model" from a body; the rest is the engine's to judge, and the
# stub engine here takes anything, so data the schema refuses may rightly get a 200.
FORWARDED = {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"}


def documented_operations() -> dict[str, dict[str, Any]]:
    """Every operation in the document, by its label: "POST /switch"."""
    operations = {}
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                operations[f"{method.upper()} {path}"] = operation
    return operations


FUZZED = sorted(set(documented_operations()) - NOT_FUZZED)


# --- the document itself ---------------------------------------------------------------


def test_document_is_valid_openapi() -> None:
    """openapi-spec-validator accepts the document, schemas included."""
    validate(openapi_document())


def test_document_names_the_daemon_and_its_version() -> None:
    info = openapi_document()["info"]
    assert info["title"] == "model-orchestrator"
    assert info["version"] == orchestrator.__version__


def test_changes_and_the_gateway_take_an_optional_key() -> None:
    """Every POST, PATCH, DELETE and /v1 operation may carry a key; no GET outside /v1 does."""
    for label, operation in documented_operations().items():
        method, path = label.split(" ", 1)
        keyed = method != "GET" or path.startswith("/v1/")
        security = operation.get("security")
        if keyed:
            assert security == [{}, {"bearer": []}, {"apiKey": []}], label
            assert {"401", "403"} <= set(operation["responses"]), label
        else:
            assert security is None, label


# --- the document and the router agree --------------------------------------------------


@dataclass(frozen=True, order=True)
class Routed:
    path: str  # as the document spells it
    method: str


def _documented_path(resource: web.AbstractResource) -> str:
    if isinstance(resource, web.StaticResource):
        return resource.canonical.rstrip("/") + "/{filename}"
    return resource.canonical


def routed_operations(app: web.Application) -> set[Routed]:
    """Every route the app serves, HEAD left out; the "*" route as the usual methods."""
    routed = set()
    for resource in app.router.resources():
        path = _documented_path(resource)
        for route in resource:
            if route.method == "HEAD":
                continue
            methods = PROXY_METHODS if route.method == "*" else (route.method.lower(),)
            routed |= {Routed(path, method) for method in methods}
    return routed


# A value for each path parameter, to send documented paths through the router.
SAMPLE_PARAMETERS = {
    "model_id": "alpha",
    "switch_id": "0123456789ab",
    "filename": "app.js",
    "tail": "audio/speech",
}


async def _resolves_to(app: web.Application, method: str, path: str) -> Routed | None:
    concrete = path.format(**SAMPLE_PARAMETERS)
    match = await app.router.resolve(make_mocked_request(method.upper(), concrete, app=app))
    if match.http_exception is not None:
        return None
    route = match.route
    return Routed(_documented_path(route.resource), method) if route.resource else None


def test_every_route_is_documented(daemon: LiveDaemon) -> None:
    """Each route of create_app's router, with each of its methods, has an operation."""
    documented = set()
    for label in documented_operations():
        method, path = label.split(" ", 1)
        documented.add(Routed(path, method.lower()))
    missing = routed_operations(daemon.daemon.app) - documented
    assert not missing, f"routes without an operation in the document: {sorted(missing)}"


def test_every_documented_operation_is_routed(daemon: LiveDaemon) -> None:
    """Each operation reaches the route of its own path; explicit /v1 ones the catch-all."""
    catch_all = "/v1/{tail}"
    unrouted = []
    for label in documented_operations():
        method, path = label.split(" ", 1)
        reached = daemon.call(_resolves_to(daemon.daemon.app, method.lower(), path))
        expected = {Routed(path, method.lower())}
        if path.startswith("/v1/"):
            expected.add(Routed(catch_all, method.lower()))
        if reached not in expected:
            unrouted.append(f"{label} (reaches {reached})")
    assert not unrouted, f"documented but not routed: {unrouted}"


# --- a daemon to fuzz ---------------------------------------------------------------------


class StubRuntime(FakeRuntime):
    """The fake Docker boundary whose engines answer HTTP, from one stub server."""

    engine_url = ""

    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None:
        return None if engine is None else f"{self.engine_url}/{spec.id}"

    async def probe(self, url: str) -> bool:
        return await super().probe("http://fake/" + url.removeprefix(self.engine_url + "/"))


async def _engine_answer(request: web.Request) -> web.Response:
    """What an engine says to anything: a small OpenAI-like object."""
    await request.read()
    return web.json_response(
        {"id": "stub-1", "object": "stub", "model": request.match_info["model"], "choices": []}
    )


@dataclass(frozen=True)
class Snapshot:
    state: State
    active: str | None
    queued: int
    runtime_calls: int


class LiveDaemon:
    """The daemon over the fake runtime, served on 127.0.0.1 by a loop in its own thread."""

    def __init__(self, root: Path, hub_url: str) -> None:
        self.root = root
        self.hub_url = hub_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="daemon", daemon=True)
        self.runners: list[web.AppRunner] = []

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._open())

    def stop(self) -> None:
        try:
            self.call(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _open(self) -> None:
        engines = web.Application()
        engines.router.add_route("*", "/{model}/{tail:.*}", _engine_answer)
        self.runtime = StubRuntime()
        self.runtime.engine_url = await self._serve(engines)
        self.daemon = await open_daemon(
            self.root,
            self.runtime,
            hub_endpoint=self.hub_url,
            api_keys=[API_KEY],
            drain_timeout=2.0,
        )
        self.store, self.catalog, self.switcher = (
            self.daemon.store,
            self.daemon.catalog,
            self.daemon.switcher,
        )
        self.base_url = await self._serve(self.daemon.app)
        await self._load_alpha()

    async def _close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        await self.daemon.close()

    async def _load_alpha(self) -> None:
        while queued := self.switcher.queued():
            await asyncio.wait([op.future for op in queued])
        status = self.switcher.status
        if status.state is State.READY and status.active == "alpha" and status.healthy:
            return
        op = await self.switcher.switch_to("alpha")
        await op.future

    async def _snapshot(self) -> Snapshot:
        status = self.switcher.status
        return Snapshot(
            status.state, status.active, len(self.switcher.queued()), len(self.runtime.calls)
        )

    async def _switch_ids(self) -> list[str]:
        return [record.id for record in await self.store.recent_switches(limit=5)]

    def load_alpha(self) -> None:
        """Back to the starting point after a case that was allowed to change the model."""
        self.call(self._load_alpha())

    def snapshot(self) -> Snapshot:
        return self.call(self._snapshot())

    def switch_ids(self) -> list[str]:
        return self.call(self._switch_ids())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    root = tmp_path_factory.mktemp("fuzzed")
    (root / "docker-compose.yml").write_text(TWO_MODEL_COMPOSE)
    for repo in ("org/a", "org/b"):
        make_snapshot(root / "models" / "hub", repo)
    (root / "host" / "home").mkdir(parents=True)
    # Pulls reach this empty hub, which knows no repo, rather than the real one.
    with FakeHub({}) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(root / "host" / "home"))
        made = LiveDaemon(root, hub.url)
        made.start()
        try:
            yield made
        finally:
            made.stop()


def test_the_fuzzed_daemon_starts_with_alpha_ready(daemon: LiveDaemon) -> None:
    snapshot = daemon.snapshot()
    assert (snapshot.state, snapshot.active, snapshot.queued) == (State.READY, "alpha", 0)


# --- fuzzing ----------------------------------------------------------------------------


@functools.cache
def _schema() -> Any:
    return schemathesis.openapi.from_dict(openapi_document())


def _operation(label: str) -> Any:
    operation = _schema().find_operation_by_label(label)
    assert operation is not None, label
    return operation


def _has_inputs(label: str) -> bool:
    method, path = label.split(" ", 1)
    item = openapi_document()["paths"][path]
    operation = item[method.lower()]
    return bool(item.get("parameters") or operation.get("parameters") or "requestBody" in operation)


def _named(case: AnyCase, names: dict[str, str]) -> AnyCase:
    """The case with its ids replaced by ones the daemon knows, so it gets past the 404s."""
    if case.path_parameters:
        case.path_parameters = {
            key: names.get(key, value) for key, value in case.path_parameters.items()
        }
    if case.query and "model" in case.query:
        case.query = {**case.query, "model": names["model"]}
    if isinstance(case.body, dict):
        body = dict(case.body)
        for key in ("model", "model_id"):
            if body.get(key) is not None:
                body[key] = names["model"]
        if isinstance(body.get("repo"), str):
            body["repo"] = names["repo"]
        case.body = body
    return case


def _confined(root: Path) -> Callable[[AnyCase], AnyCase]:
    """Folder paths moved under the test's own folder.

    A model added with a path has that folder walked for its verdict on every /status and
    /models; "/" would walk this machine's whole disk on each request. Paths keep what the
    validation looks at: their start, ':', ',', control characters, and (near enough)
    their length. "~/" stays, with HOME pointed into the test's folder too.
    """

    def confine(case: AnyCase) -> AnyCase:
        body = case.body
        path = body.get("path") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(path, str) and path.startswith("/"):
            case.body = {**body, "path": f"{root}{path}"}
        return case

    return confine


def cases(label: str, daemon: LiveDaemon) -> st.SearchStrategy[AnyCase]:
    """Positive and negative cases, and positive ones naming models and switches that exist."""
    operation = _operation(label)
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    strategies = [positive]
    if _has_inputs(label):
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        models = st.sampled_from(["alpha", "beta"])
        names = st.fixed_dictionaries(
            {
                "model_id": models,
                "model": models,
                "switch_id": st.sampled_from(daemon.switch_ids() or ["none"]),
                "filename": st.sampled_from(["app.js", "style.css", "index.html"]),
                "repo": st.sampled_from(["org/a", "org/fresh", "Qwen/Qwen2.5-0.5B-Instruct"]),
            }
        )
        strategies.append(st.builds(_named, positive, names))
    return st.one_of(strategies).map(_confined(daemon.root / "host"))


def _left_out(case: AnyCase) -> bool:
    """Cases of the log's follow parameter that the fuzzing leaves out.

    follow=true streams until the container stops. The other spellings the handler
    understands (1, yes, 0, no, in any case; documented) are not refused, though a
    boolean schema calls them invalid.
    """
    follow = (case.query or {}).get("follow")
    if case.operation.label != "GET /models/{model_id}/logs" or follow is None:
        return False
    text = str(follow)
    return text != "false" and text.lower() in {"1", "true", "yes", "0", "false", "no"}


def _refusal_moved_nothing(
    daemon: LiveDaemon, case: AnyCase, status: int, before: Snapshot, headers: dict[str, str]
) -> None:
    """A 4xx leaves the model as it was: nothing started, stopped or queued."""
    if 400 <= status < 500:
        after = daemon.snapshot()
        assert after == before, (
            f"refused with {status}, yet the daemon went from {before} to {after}:\n"
            + case.as_curl_command(headers=headers)
        )


@pytest.mark.parametrize("label", FUZZED)
def test_fuzz(label: str, daemon: LiveDaemon) -> None:
    """No 5xx, answers as documented, and a refused request never moves the model."""
    checks = [*CHECKS] if label in FORWARDED else [*CHECKS, negative_data_rejection]
    if label == "GET /health":
        checks.remove(not_a_server_error)  # its 503 is the documented "not serving"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(label, daemon))
    def exchange(case: AnyCase) -> None:
        assume(not _left_out(case))
        daemon.load_alpha()
        before = daemon.snapshot()
        response = case.call(base_url=daemon.base_url, headers=AUTH, timeout=30)
        _refusal_moved_nothing(daemon, case, response.status_code, before, AUTH)
        case.validate_response(response, checks=checks, headers=AUTH)

    exchange()


@dataclass(frozen=True)
class Edge:
    """A request the generators seldom make, and the status it must get."""

    label: str
    status: int
    model_id: str | None = None
    query: dict[str, str] | None = None
    body: Any = None

    def case(self) -> AnyCase:
        extra: dict[str, Any] = {}
        if self.body is not None:
            extra = {"body": self.body, "media_type": "application/json"}
        return _operation(self.label).Case(  # type: ignore[no-any-return]
            path_parameters=None if self.model_id is None else {"model_id": self.model_id},
            query=self.query,
            **extra,
        )


EDGES = [
    # "²".isdigit() holds, yet int("²") fails.
    Edge("GET /models/{model_id}/logs", 400, "alpha", {"tail": "\u00b2"}),
    Edge("GET /models/{model_id}/logs", 400, "alpha", {"tail": "10001"}),
    Edge("GET /models/{model_id}/logs", 400, "alpha", {"follow": "maybe"}),
    Edge("GET /health", 404, query={"model": "nope"}),
    Edge("POST /switch", 400, body={"model": "alpha", "model_id": "beta"}),
    Edge("POST /switch", 404, body={"model": "nope"}),
    Edge("PATCH /models/{model_id}", 409, "alpha", body={"enabled": False}),
    Edge("POST /models/{model_id}/disable", 409, "alpha", body={}),
    Edge("DELETE /models/{model_id}", 409, "alpha", body={}),
    Edge("POST /models/{model_id}/pull", 400, "alpha", body={"revision": ""}),
    Edge("POST /models", 400, body={"repo": "org/x", "engine": {"gpu_memory_utilization": 0}}),
    Edge(
        "POST /models",
        400,
        body={
            "repo": "org/x",
            "engine": {"max_model_len": 4096},
            "capabilities": {"context_length": 8192},
        },
    ),
]


@pytest.mark.parametrize("edge", EDGES, ids=lambda edge: f"{edge.label} {edge.query or edge.body}")
def test_edge(edge: Edge, daemon: LiveDaemon) -> None:
    """Refusals the fuzzing seldom reaches: the documented status, body, and nothing moves."""
    case = edge.case()
    daemon.load_alpha()
    before = daemon.snapshot()
    response = case.call(base_url=daemon.base_url, headers=AUTH, timeout=30)
    _refusal_moved_nothing(daemon, case, response.status_code, before, AUTH)
    case.validate_response(response, checks=CHECKS, headers=AUTH)
    assert response.status_code == edge.status, response.content


# Bodies that would change something, were the key not missing or wrong.
KEYED_BODIES: dict[str, Any] = {
    "POST /switch": {"model": "beta"},
    "POST /models": {"repo": "org/keyless"},
    "PATCH /models/{model_id}": {"display_name": "Keyless"},
    "POST /v1/chat/completions": {"model": "beta", "messages": []},
    "POST /v1/completions": {"model": "beta", "prompt": "hi"},
    "POST /v1/embeddings": {"model": "beta", "input": "hi"},
    "POST /v1/{tail}": {"model": "beta"},
    "PUT /v1/{tail}": {"model": "beta"},
    "PATCH /v1/{tail}": {"model": "beta"},
}
KEYED = sorted(
    label for label, operation in documented_operations().items() if "security" in operation
)


@pytest.mark.parametrize("label", KEYED)
@pytest.mark.parametrize("key", [None, "not-the-key"])
def test_keys_are_asked_for(label: str, key: str | None, daemon: LiveDaemon) -> None:
    """Without a key 401, with a wrong one 403: as documented, and nothing moves."""
    operation = _operation(label)
    parameters = {
        name: SAMPLE_PARAMETERS[name].replace("alpha", "beta")
        for name in SAMPLE_PARAMETERS
        if f"{{{name}}}" in operation.path
    }
    body = KEYED_BODIES.get(label)
    case = operation.Case(
        path_parameters=parameters,
        query={"model": "beta"} if label.endswith("/v1/{tail}") else None,
        **({} if body is None else {"body": body, "media_type": "application/json"}),
    )
    headers = {} if key is None else {"x-api-key": key}
    daemon.load_alpha()
    before = daemon.snapshot()
    response = case.call(base_url=daemon.base_url, headers=headers, timeout=30)
    assert response.status_code == (401 if key is None else 403)
    _refusal_moved_nothing(daemon, case, response.status_code, before, headers)
    case.validate_response(response, checks=CHECKS, headers=headers)


CHANGING = sorted(
    label
    for label in documented_operations()
    if label.split(" ", 1)[0] in {"POST", "PUT", "PATCH", "DELETE"}
)


@pytest.mark.parametrize("label", CHANGING)
@pytest.mark.parametrize("media_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_changes_refuse_bodies_that_are_not_json(
    label: str, media_type: str, daemon: LiveDaemon
) -> None:
    """Every documented change, sent with a key as a page would send it: 415, as documented,
    and nothing moves."""
    operation = _operation(label)
    parameters = {
        name: SAMPLE_PARAMETERS[name].replace("alpha", "beta")
        for name in SAMPLE_PARAMETERS
        if f"{{{name}}}" in operation.path
    }
    body = KEYED_BODIES.get(label, {})
    case = operation.Case(
        path_parameters=parameters,
        query={"model": "beta"} if label.endswith("/v1/{tail}") else None,
        body=json.dumps(body) if media_type == "text/plain" else "model=beta",
        media_type=media_type,
    )
    daemon.load_alpha()
    before = daemon.snapshot()
    response = case.call(base_url=daemon.base_url, headers=AUTH, timeout=30)
    assert response.status_code == 415, response.content
    _refusal_moved_nothing(daemon, case, response.status_code, before, AUTH)
    case.validate_response(response, checks=CHECKS, headers=AUTH)
