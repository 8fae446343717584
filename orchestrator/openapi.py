"""The HTTP API as an OpenAPI 3.1 document: the operations, with schemas from the models.

``GET /openapi.json`` serves ``openapi_document()``. Its schemas are generated from the
pydantic models the handlers parse bodies with (``schemas``) and render answers with
(``answers``); this module adds what only the router knows: paths, parameters, status
codes, headers, and the errors each operation may answer. The operations name model
classes where a schema goes; ``_linked`` turns each into a reference to its component.
The unit tests hold the document to the router (every route documented, nothing
documented that is not routed) and fuzz the daemon with it.

Two error shapes: the control API answers ``Error``, ``/v1`` answers ``OpenAIError``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

import orchestrator

from . import answers, schemas

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
HEALTH_JSON = "application/health+json"
EVENT_STREAM = "text/event-stream"
REF_TEMPLATE = "#/components/schemas/{model}"

Schema = dict[str, Any]
# Where a schema goes, an operation may name the model class it is generated from.
Described = type[BaseModel] | Schema
STRING: Schema = {"type": "string"}

# API keys are optional in a deployment: with none configured every request is open.
OPTIONAL_KEY: list[dict[str, list[str]]] = [{}, {"bearer": []}, {"apiKey": []}]
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}


class _Components(GenerateJsonSchema):
    """Schemas as the document shows them: a property's name is title enough."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


@functools.cache
def component_schemas(models: frozenset[type[BaseModel]]) -> dict[str, Schema]:
    """The models' schemas and those they refer to: bodies as read, answers as sent."""
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "serialization" if issubclass(model, answers.Answer) else "validation")
        for model in sorted(models, key=lambda model: model.__name__)
    ]
    _, document = models_json_schema(modes, ref_template=REF_TEMPLATE, schema_generator=_Components)
    return dict(document["$defs"])


def _linked(node: Any, models: set[type[BaseModel]]) -> Any:
    """A copy of ``node`` with each model class in it replaced by a reference to its schema."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        models.add(node)
        return {"$ref": REF_TEMPLATE.format(model=node.__name__)}
    if isinstance(node, dict):
        return {key: _linked(value, models) for key, value in node.items()}
    if isinstance(node, list):
        return [_linked(value, models) for value in node]
    return node


# --- responses --------------------------------------------------------------------------

# Each error status: (component name, what it means).
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request is malformed or a field is out of range (error.field)."),
    401: ("Unauthorized", "API keys are configured and the request carries none."),
    403: (
        "Forbidden",
        "The API key is not one of the configured keys, or the request came from a page of"
        " another origin, or named a Host that a loopback-bound daemon does not answer to.",
    ),
    404: ("NotFound", "No such model, switch or route."),
    409: ("Conflict", "The model's state forbids it: disabled, not cached, in use."),
    408: ("RequestTimeout", "The body did not arrive within 30 s (120 s on /v1)."),
    413: ("TooLarge", "The body is larger than 64 KiB (32 MiB on /v1)."),
    415: (
        "UnsupportedMediaType",
        "A request that changes something must send its body as application/json.",
    ),
    429: ("TooBusy", "The model's queue is full; come back after Retry-After seconds."),
    502: ("BadGateway", "The engine exited, Docker failed, or the engine did not answer."),
    503: ("TooManyStreams", "Every place for this kind of stream is taken; retry later."),
    504: ("Timeout", "The model did not become healthy within its startup timeout."),
}


def _error_headers(status: int) -> dict[str, Any]:
    if status == 401:
        return {"WWW-Authenticate": {"required": True, "schema": STRING}}
    if status in {429, 503}:
        return {"Retry-After": {"required": True, "schema": {"type": "integer"}}}
    return {}


def _responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (name, description) in _ERRORS.items():
        for prefix, body in (("", answers.Error), ("V1", answers.OpenAIError)):
            responses[prefix + name] = _json(body, description, headers=_error_headers(status))
    return responses


def _errors(*statuses: int, v1: bool = False) -> dict[str, Any]:
    prefix = "V1" if v1 else ""
    return {str(s): {"$ref": f"#/components/responses/{prefix}{_ERRORS[s][0]}"} for s in statuses}


def _json(
    schema: Described, description: str | None = None, media: str = JSON, **extra: Any
) -> dict[str, Any]:
    """A response; an answer model's first docstring line describes it unless told."""
    if description is None:
        assert isinstance(schema, type) and schema.__doc__, schema
        description = schema.__doc__.splitlines()[0]
    response = {"description": description, "content": {media: {"schema": schema}}}
    return response | {name: value for name, value in extra.items() if value}


def _location(description: str) -> dict[str, Any]:
    return {"Location": {"required": True, "description": description, "schema": STRING}}


def _parameter(name: str, where: str, description: str, schema: Schema) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


Operation = tuple[str, str, dict[str, Any]]  # method, path, the operation
PROXY_METHODS = ("get", "post", "put", "patch", "delete")
FORWARD = "to the engine of the model the request names"

SUMMARIES = {
    "switchModel": "Load a model, stopping the one that holds the GPU",
    "stopModel": "Unload every model, asleep ones too, and free the GPU",
    "sleepModel": "Put the awake model to sleep (vLLM sleep mode) without waking another",
    "getStatus": "The switcher's state, every model, the queue and the last switch",
    "listSwitches": "The 50 most recent switches, newest first",
    "getSwitch": "One switch: pending while it runs, then its record",
    "listModels": "Every model, from the compose file and the registry",
    "addModel": "Add a model from a Hub repo or a local folder",
    "getModel": "One model",
    "updateModel": "Change a model's settings",
    "deleteModel": "Remove a model added through the API",
    "enableModel": "Allow switches to the model",
    "disableModel": "Refuse switches to the model (409); not while it is in use",
    "pullModel": "Download the model's repo into the Hub cache in the background",
    "getHealth": "Readiness: 200 only while a model is ready and nothing is about to move",
    "getLiveness": "Liveness: 200 while the daemon runs",
    "getModelLogs": "The engine container's log: the last lines, or followed live",
    "getMetrics": "Prometheus metrics",
    "getEvents": "Every state change as server-sent events, starting with the status",
    "getDashboard": "The web dashboard",
    "getDashboardFile": "The dashboard's scripts and style sheets",
    "getOpenAPI": "This document",
    "listV1Models": "Every enabled model, in OpenAI's list shape",
    "createChatCompletion": "Chat completion by the model the body names",
    "createCompletion": "Completion by the model the body names",
    "createEmbedding": "Embeddings by the model the body names",
    **{
        f"forwardV1{method.capitalize()}": f"{method.upper()} {FORWARD}" for method in PROXY_METHODS
    },
}


def _op(
    label: str,
    operation_id: str,
    responses: dict[str, Any],
    errors: tuple[int, ...] = (),
    *,
    body: type[BaseModel] | None = None,
    optional_body: bool = False,
    parameters: list[Schema] | None = None,
) -> Operation:
    """An operation, labelled "POST /switch"; its tag, key and the guard's answers come later."""
    method, path = label.split(" ", 1)
    operation: dict[str, Any] = {"operationId": operation_id, "summary": SUMMARIES[operation_id]}
    if body is not None:
        content = {JSON: {"schema": body}}
        operation["requestBody"] = {"required": not optional_body, "content": content}
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {**responses, **_errors(*errors, v1=_is_v1(path))}
    return method.lower(), path, operation


def _is_v1(path: str) -> bool:
    return path.startswith("/v1/")


# --- the routes, by tag ---------------------------------------------------------------


def _control() -> list[Operation]:
    location = _location("/switches/<id>")
    switched = {
        "200": _json(answers.SwitchDone),
        "202": _json(answers.SwitchAccepted, 'Accepted ("wait": false).', headers=location),
    }
    return [
        _op(
            "POST /switch",
            "switchModel",
            switched,
            (400, 404, 409, 413, 502, 504),
            body=schemas.SwitchRequest,
        ),
        _op(
            "POST /stop",
            "stopModel",
            switched,
            (400, 413, 502),
            body=schemas.StopRequest,
            optional_body=True,
        ),
        _op(
            "POST /sleep",
            "sleepModel",
            switched,
            (400, 409, 413, 502),
            body=schemas.SleepRequest,
            optional_body=True,
        ),
        _op("GET /status", "getStatus", {"200": _json(answers.Status)}),
        _op("GET /switches", "listSwitches", {"200": _json(answers.SwitchList)}),
        _op("GET /switches/{switch_id}", "getSwitch", {"200": _json(answers.SwitchAnswer)}, (404,)),
    ]


def _models() -> list[Operation]:
    location = _location("/models/<id>")
    one = {"200": _json(answers.ModelAnswer)}
    added = {"201": _json(answers.ModelAnswer, "Added.", headers=location)}
    pulled = {"202": _json(answers.PullStarted, headers=location)}
    by_id = "/models/{model_id}"
    return [
        _op("GET /models", "listModels", {"200": _json(answers.ModelList)}),
        _op("POST /models", "addModel", added, (400, 404, 413), body=schemas.NewModel),
        _op(f"GET {by_id}", "getModel", one, (404,)),
        _op(f"PATCH {by_id}", "updateModel", one, (400, 404, 409, 413), body=schemas.ModelChanges),
        _op(f"DELETE {by_id}", "deleteModel", {"200": _json(answers.Deleted)}, (404, 409)),
        _op(f"POST {by_id}/enable", "enableModel", one, (400, 404, 409)),
        _op(f"POST {by_id}/disable", "disableModel", one, (400, 404, 409)),
        _op(
            f"POST {by_id}/pull",
            "pullModel",
            pulled,
            (400, 404, 409, 413),
            body=schemas.PullRequest,
            optional_body=True,
        ),
    ]


def _health() -> list[Operation]:
    wanted = _parameter("model", "query", "Pass only while this model is the ready one.", STRING)
    can_switch = _parameter(
        "can_switch",
        "query",
        "With model: pass also while the model is not loaded but this daemon would switch"
        " to it now (enabled, cached, no switch under way, nothing in flight). 1, yes, 0"
        " and no are also understood, in any case.",
        {"type": "boolean", "default": False},
    )
    passed = {"anyOf": [answers.HealthPass, answers.HealthSwitchable]}
    why = "A model is ready, or (can_switch) would be switched to."
    health = {
        "200": _json(passed, why, HEALTH_JSON),
        "503": _json(answers.HealthFail, media=HEALTH_JSON),
    }
    live = {"200": _json(answers.Liveness, media=HEALTH_JSON)}
    return [
        _op("GET /health", "getHealth", health, (400, 404), parameters=[wanted, can_switch]),
        _op("GET /health/live", "getLiveness", live),
    ]


def _views() -> list[Operation]:
    logs = _json(
        answers.ModelLogs,
        "JSON with the last lines; with follow, server-sent events: one container event,"
        " a log event per line, end when it stops.",
    )
    logs["content"][EVENT_STREAM] = {"schema": STRING}
    lines = {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100}
    follow = _parameter(
        "follow",
        "query",
        "true: stream the lines and every new one as server-sent events"
        " (1, yes, 0 and no are also understood, in any case).",
        {"type": "boolean", "default": False},
    )
    logged = [_parameter("tail", "query", "How many of the last lines.", lines), follow]
    events = (
        "status first, then switch_requested, state, switch_finished, rolled_back,"
        " model_died, pull; each with an increasing id."
    )
    assets = ("application/javascript", "text/css", "text/html", "text/javascript")
    asset = {"description": "The file.", "content": {kind: {"schema": STRING} for kind in assets}}
    document = {
        "type": "object",
        "properties": {"openapi": STRING, "info": {"type": "object"}, "paths": {}},
        "required": ["openapi", "info", "paths"],
    }
    metrics = _json(STRING, "Prometheus text exposition format 0.0.4.", "text/plain")
    return [
        _op(
            "GET /models/{model_id}/logs",
            "getModelLogs",
            {"200": logs},
            (400, 404),
            parameters=logged,
        ),
        _op("GET /metrics", "getMetrics", {"200": metrics}),
        _op("GET /events", "getEvents", {"200": _json(STRING, events, EVENT_STREAM)}),
        _op("GET /", "getDashboard", {"200": _json(STRING, "The dashboard's page.", "text/html")}),
        _op("GET /ui/{filename}", "getDashboardFile", {"200": asset}, (403, 404)),
        _op("GET /openapi.json", "getOpenAPI", {"200": _json(document, "The API's document.")}),
    ]


_V1_FAILURES = (400, 401, 403, 404, 409, 413, 429, 502, 504)


def _forwarded(label: str, operation_id: str, request: type[BaseModel] | None = None) -> Operation:
    content: dict[str, Any] = {"*/*": {"schema": {}}}
    if request is not None:
        content = {JSON: {"schema": {"type": "object"}}, EVENT_STREAM: {"schema": STRING}}
    passed = {
        "description": (
            "The engine's answer, passed through as it arrives (a stream chunk by chunk);"
            " the engine's own errors pass through likewise."
        ),
        "content": content,
    }
    return _op(label, operation_id, {"200": passed}, _V1_FAILURES, body=request)


def _gateway() -> list[Operation]:
    listed = {"200": _json(answers.V1ModelList)}
    return [
        _op("GET /v1/models", "listV1Models", listed, (404,)),
        _forwarded(
            "POST /v1/chat/completions", "createChatCompletion", schemas.ChatCompletionRequest
        ),
        _forwarded("POST /v1/completions", "createCompletion", schemas.CompletionRequest),
        _forwarded("POST /v1/embeddings", "createEmbedding", schemas.EmbeddingRequest),
        *(
            _forwarded(f"{method} /v1/{{tail}}", f"forwardV1{method.capitalize()}")
            for method in PROXY_METHODS
        ),
    ]


TAGS = {
    "control": ("Switching models", _control),
    "models": ("The model registry", _models),
    "health": ("Probes, never behind a key", _health),
    "live views": ("Dashboard, events, metrics, logs", _views),
    "gateway": ("The OpenAI-compatible gateway", _gateway),
}
# What each placeholder of a path stands for.
PATH_PARAMETERS = {
    "model_id": "The model's id.",
    "switch_id": "The id a switch was answered with.",
    "filename": "app.js, style.css, ...",
    "tail": "The rest of the engine's path.",
}
PATH_DESCRIPTIONS = {
    "/v1/{tail}": (
        "Any other /v1 request, any method: routed by the body's model (or the model"
        " query parameter) to that model's engine and passed through."
    ),
}
_CHANGING = frozenset({"post", "put", "patch", "delete"})
_STREAMS = frozenset({"/events", "/models/{model_id}/logs"})


def _path_item(path: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if path in PATH_DESCRIPTIONS:
        item["description"] = PATH_DESCRIPTIONS[path]
    names = [name for name in PATH_PARAMETERS if f"{{{name}}}" in path]
    if names:
        item["parameters"] = [
            _parameter(name, "path", PATH_PARAMETERS[name], STRING) for name in names
        ]
    return item


def _guarded(tag: str, method: str, path: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The operation tagged, with the key it may need and what the guard may answer."""
    operation["tags"] = [tag]
    wanted = [403]
    if method in _CHANGING or _is_v1(path):
        operation["security"] = OPTIONAL_KEY
        wanted.append(401)
    if method in _CHANGING:
        wanted += [408, 415]
        # Even a change that reads no body must say JSON (see 415).
        body = {JSON: {"schema": {"type": "object"}}}
        operation.setdefault("requestBody", {"required": False, "content": body})
    if path in _STREAMS:
        wanted.append(503)
    for status, ref in _errors(*wanted, v1=_is_v1(path)).items():
        operation["responses"].setdefault(status, ref)
    return operation


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for tag, (_, operations) in TAGS.items():
        for method, path, operation in operations():
            item = paths.setdefault(path, _path_item(path))
            item[method] = _guarded(tag, method, path, operation)
    return paths


def openapi_document() -> dict[str, Any]:
    """The whole HTTP API as an OpenAPI 3.1 document; a new object on each call."""
    models: set[type[BaseModel]] = set()
    paths, responses = _linked(_paths(), models), _linked(_responses(), models)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "model-orchestrator",
            "version": str(getattr(orchestrator, "__version__", "0.1.0")),
            "description": (
                "Swaps one GPU between vLLM models kept as docker-compose profiles, and"
                " routes OpenAI requests to whichever model they name. Control errors are"
                ' {"error": {"code", "message"}}; /v1 errors are OpenAI\'s shape.'
            ),
        },
        "tags": [{"name": tag, "description": text} for tag, (text, _) in TAGS.items()],
        "paths": paths,
        "components": {
            # Cached for all callers: the caller gets a tree of its own.
            "schemas": copy.deepcopy(component_schemas(frozenset(models))),
            "responses": responses,
            "securitySchemes": copy.deepcopy(SECURITY_SCHEMES),
        },
    }
