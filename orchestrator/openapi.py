"""The HTTP API as an OpenAPI 3.1 document, built as plain data.

``GET /openapi.json`` serves ``openapi_document()``. The unit tests hold it to the
router (every route documented, nothing documented that is not routed) and fuzz the
daemon with it, so a change to a handler that is not made here too fails a test.

Two error shapes: the control API answers ``{"error": {"code", "message", ...}}``,
``/v1`` answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import copy
from typing import Any, get_args

import orchestrator

from . import naming
from .schemas import DtypeName

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
HEALTH_JSON = "application/health+json"
EVENT_STREAM = "text/event-stream"

Schema = dict[str, Any]

# API keys are optional in a deployment: with none configured every request is open.
OPTIONAL_KEY: list[dict[str, list[str]]] = [{}, {"bearer": []}, {"apiKey": []}]


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Schema:
    return _ref("schemas", name)


def _or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(
    properties: dict[str, Schema],
    required: list[str] | None = None,
    *,
    extra: bool | Schema = True,
    description: str | None = None,
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if extra is not True:
        schema["additionalProperties"] = extra
    if description:
        schema["description"] = description
    return schema


STRING: Schema = {"type": "string"}
STRING_OR_NULL: Schema = {"type": ["string", "null"]}
TIMESTAMP: Schema = {"type": ["string", "null"], "format": "date-time"}


# --- schemas: what the control API answers --------------------------------------------


def _answer_schemas() -> dict[str, Schema]:
    return {
        "Error": _obj(
            {
                "error": _obj(
                    {"code": STRING, "message": STRING},
                    ["code", "message"],
                    description=(
                        "Extra fields where they help: field, model, switch_id, log_tail,"
                        " rolled_back, repo, cache_path, path, retry_after."
                    ),
                )
            },
            ["error"],
        ),
        "OpenAIError": _obj(
            {
                "error": _obj(
                    {
                        "message": STRING,
                        "type": STRING,
                        "param": STRING_OR_NULL,
                        "code": STRING_OR_NULL,
                    },
                    ["message", "type", "param", "code"],
                )
            },
            ["error"],
        ),
        "State": {
            "type": "string",
            "enum": ["idle", "starting", "ready", "stopping", "failed"],
        },
        "Outcome": {
            "type": "string",
            "enum": ["pending", "running", "ok", "noop", "rolled_back", "failed", "refused"],
        },
        "PendingSwitch": _obj(
            {
                "id": STRING,
                "kind": {"type": "string", "enum": ["switch", "stop"]},
                "model": STRING_OR_NULL,
                "outcome": _schema("Outcome"),
                "requested_at": {"type": "number", "description": "Unix time"},
            },
            ["id", "kind", "model", "outcome", "requested_at"],
            description="A switch or stop accepted and not finished yet.",
        ),
        "Switch": _obj(
            {
                "id": STRING,
                "kind": {"type": "string", "enum": ["switch", "stop"]},
                "from": STRING_OR_NULL,
                "to": STRING_OR_NULL,
                "requested_at": TIMESTAMP,
                "finished_at": TIMESTAMP,
                "outcome": _schema("Outcome"),
                "duration": {"type": ["number", "null"], "minimum": 0},
                "error": _or_null(_obj({"code": STRING, "message": STRING}, ["code", "message"])),
                "timings": {
                    "type": ["object", "null"],
                    "additionalProperties": {"type": "number"},
                    "description": "Seconds per phase: drain, stop, up, ready, ...",
                },
            },
            ["id", "kind", "from", "to", "requested_at", "finished_at", "outcome"],
            description="A switch or stop as recorded in the history.",
        ),
        "Container": _obj(
            {
                "id": STRING,
                "name": STRING,
                "state": STRING,
                "exit_code": {"type": ["integer", "null"]},
            },
            ["id", "name", "state", "exit_code"],
        ),
        "CacheVerdict": _obj(
            {
                "repo": STRING,
                "status": {"type": "string", "enum": ["present", "incomplete", "missing"]},
                "path": STRING_OR_NULL,
                "reason": STRING,
                "revision": STRING,
                "commit": STRING_OR_NULL,
                "size_bytes": {"type": "integer", "minimum": 0},
                "problems": {"type": "array", "items": STRING},
            },
            ["repo", "status", "path", "reason"],
            description="Whether the model's weights are on disk, and if not, why.",
        ),
        "PullProgress": _obj(
            {
                "repo": STRING,
                "revision": STRING,
                "files_total": {"type": "integer", "minimum": 0},
                "files_done": {"type": "integer", "minimum": 0},
                "bytes_total": {"type": "integer", "minimum": 0},
                "bytes_done": {"type": "integer", "minimum": 0},
                "state": {"type": "string", "enum": ["downloading", "done", "failed"]},
                "error": STRING_OR_NULL,
                "fraction": {"type": ["number", "null"], "minimum": 0},
            },
            [
                "repo",
                "revision",
                "files_total",
                "files_done",
                "bytes_total",
                "bytes_done",
                "state",
                "error",
                "fraction",
            ],
        ),
        "Model": _obj(
            {
                "id": STRING,
                "display_name": STRING,
                "repo": STRING_OR_NULL,
                "served_name": STRING,
                "services": {"type": "array", "items": STRING},
                "engine_service": STRING,
                "active": {"type": "boolean"},
                "container": _or_null(_schema("Container")),
                "upstream": STRING_OR_NULL,
                "started_at": TIMESTAMP,
                "uptime": {"type": ["number", "null"]},
                "checkpoint": STRING_OR_NULL,
                "cache": _or_null(_schema("CacheVerdict")),
                "pull": _or_null(_schema("PullProgress")),
                "origin": {"type": "string", "enum": ["compose", "registry"]},
                "enabled": {"type": "boolean"},
                "source": _or_null(
                    _obj({"repo": STRING_OR_NULL, "path": STRING_OR_NULL}, ["repo", "path"])
                ),
                "image": STRING_OR_NULL,
                "engine": {"type": "object"},
                "capabilities": {"type": "object"},
                "defaults": {"type": "object"},
                "metadata": {"type": "object", "additionalProperties": STRING},
                "created_at": TIMESTAMP,
                "updated_at": TIMESTAMP,
            },
            [
                "id",
                "display_name",
                "repo",
                "served_name",
                "services",
                "engine_service",
                "active",
                "container",
                "upstream",
                "started_at",
                "uptime",
                "checkpoint",
                "cache",
                "pull",
                "origin",
                "enabled",
            ],
            description=(
                "A model, its container and cache verdict, and what the registry knows of it"
                " (source, image, engine, capabilities, defaults, metadata: only with a"
                " registry)."
            ),
        ),
        "GatewayTraffic": _obj(
            {
                "in_flight": {"type": "object", "additionalProperties": {"type": "integer"}},
                "waiting": {"type": "object", "additionalProperties": {"type": "integer"}},
                "swaps_requested": {"type": "integer", "minimum": 0},
                "auto_switch": {"type": "boolean"},
            },
            ["in_flight", "waiting", "swaps_requested", "auto_switch"],
        ),
        "Status": _obj(
            {
                "state": _schema("State"),
                "active": STRING_OR_NULL,
                "target": STRING_OR_NULL,
                "since": TIMESTAMP,
                "reason": STRING_OR_NULL,
                "serving": {"type": "boolean"},
                "upstream": STRING_OR_NULL,
                "queue": {"type": "array", "items": _schema("PendingSwitch")},
                "models": {"type": "array", "items": _schema("Model")},
                "last_switch": _or_null(_schema("Switch")),
                "pulls": {
                    "type": "object",
                    "additionalProperties": _or_null(_schema("PullProgress")),
                },
                "gateway": _or_null(_schema("GatewayTraffic")),
            },
            [
                "state",
                "active",
                "target",
                "since",
                "reason",
                "serving",
                "upstream",
                "queue",
                "models",
                "last_switch",
                "pulls",
                "gateway",
            ],
        ),
        "SwitchDone": _obj(
            {"switch": _schema("Switch"), "status": _schema("Status")},
            ["switch", "status"],
        ),
        "SwitchAccepted": _obj(
            {
                "switch": _schema("PendingSwitch"),
                "poll": {"type": "string", "description": "Where to follow it: /switches/<id>"},
                "status": _schema("Status"),
            },
            ["switch", "poll", "status"],
        ),
        "HealthPass": _obj(
            {"status": {"const": "pass"}, "model": STRING_OR_NULL},
            ["status"],
        ),
        "HealthFail": _obj(
            {
                "status": {"const": "fail"},
                "state": _schema("State"),
                "model": STRING_OR_NULL,
                "output": {"type": "string", "description": "Why the probe fails."},
            },
            ["status", "state", "model", "output"],
        ),
        "ModelLogs": _obj(
            {
                "model": STRING,
                "container": STRING_OR_NULL,
                "lines": {"type": "array", "items": STRING},
            },
            ["model", "container", "lines"],
        ),
        "V1Model": _obj(
            {
                "id": STRING,
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": STRING,
                "display_name": STRING,
                "served_name": STRING,
                "loaded": {"type": "boolean"},
                "context_length": {"type": ["integer", "null"]},
            },
            ["id", "object", "created", "owned_by", "loaded"],
        ),
        "V1ModelList": _obj(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _schema("V1Model")}},
            ["object", "data"],
        ),
    }


# --- schemas: what clients send -----------------------------------------------------

MODEL_ID_PATTERN = f"^{naming.MODEL_ID_PATTERN}$"
# Non-empty once surrounding white space is stripped.
NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}
# An image reference: printable, no white space inside.
IMAGE: Schema = {**NAME, "pattern": r"^\s*[^\s\u0000-\u001f\u007f]+\s*$"}


def _request_schemas() -> dict[str, Schema]:
    return {
        "SwitchRequest": {
            "type": "object",
            "properties": {
                "model": {**STRING_OR_NULL, "minLength": 1, "description": "The model's id."},
                "model_id": {
                    **STRING_OR_NULL,
                    "minLength": 1,
                    "description": "Same as model; when both are given they must agree.",
                },
                "wait": {
                    "type": "boolean",
                    "default": True,
                    "description": "false: answer 202 at once and switch in the background.",
                },
            },
            "anyOf": [
                {"required": ["model"], "properties": {"model": STRING}},
                {"required": ["model_id"], "properties": {"model_id": STRING}},
            ],
        },
        "StopRequest": _obj({"wait": {"type": "boolean", "default": True}}),
        "PullRequest": _obj(
            {"revision": {**STRING_OR_NULL, "minLength": 1, "description": "Default: main."}}
        ),
        "Engine": {
            "type": ["object", "null"],
            "description": "vLLM's flags; a null value removes the setting.",
            "properties": {
                "gpu_memory_utilization": {
                    "type": ["number", "null"],
                    "exclusiveMinimum": 0,
                    "maximum": 1,
                },
                "max_model_len": {"type": ["integer", "null"], "minimum": 1},
                "tensor_parallel_size": {"type": ["integer", "null"], "minimum": 1},
                "dtype": {"type": ["string", "null"], "enum": [*get_args(DtypeName), None]},
                "trust_remote_code": {"type": ["boolean", "null"]},
            },
            "additionalProperties": False,
        },
        "Capabilities": {
            "type": ["object", "null"],
            "description": (
                "What clients may rely on; context_length must not exceed"
                " engine.max_model_len. A null value removes the setting."
            ),
            "properties": {
                "context_length": {"type": ["integer", "null"], "minimum": 1},
                "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
                "vision": {"type": ["boolean", "null"]},
                "tools": {"type": ["boolean", "null"]},
                "streaming": {"type": ["boolean", "null"]},
            },
            "additionalProperties": False,
        },
        "Defaults": {
            "type": ["object", "null"],
            "description": "Sampling defaults; a null value removes the setting.",
            "properties": {
                "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
                "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            },
            "additionalProperties": False,
        },
        "Metadata": {
            "type": ["object", "null"],
            "additionalProperties": STRING,
            "description": "Free-form strings; base_model names a checkpoint's base model.",
        },
        "NewModel": {
            "type": "object",
            "description": (
                'Exactly one of "repo" (a Hub repo id, loaded offline from the cache) and'
                ' "path" (a model folder on the daemon\'s host, mounted read-only).'
            ),
            "properties": {
                "repo": {
                    **STRING_OR_NULL,
                    "minLength": 1,
                    "description": "name or namespace/name, as the Hub spells repo ids",
                },
                "path": {
                    **STRING_OR_NULL,
                    "pattern": "^(/|~/)[^:,\\u0000-\\u001f\\u007f]*$",
                    "maxLength": 4096,
                    "description": (
                        "An absolute path, or one in the daemon's home (~/); printable,"
                        " without ':' or ','."
                    ),
                },
                "id": {
                    "type": "string",
                    "pattern": MODEL_ID_PATTERN,
                    "maxLength": 64,
                    "description": "Default: derived from the repo or the folder.",
                },
                "display_name": NAME,
                "image": IMAGE,
                "engine": _schema("Engine"),
                "capabilities": _schema("Capabilities"),
                "defaults": _schema("Defaults"),
                "metadata": _schema("Metadata"),
                "enabled": {"type": "boolean", "default": True},
            },
            "oneOf": [
                {"required": ["repo"], "properties": {"repo": STRING}},
                {"required": ["path"], "properties": {"path": STRING}},
            ],
            "additionalProperties": False,
        },
        "ModelChanges": {
            "type": "object",
            "description": (
                "Sections merge field by field. A model declared in the compose file takes"
                " display_name, capabilities, defaults and enabled only."
            ),
            "properties": {
                "display_name": NAME,
                "image": IMAGE,
                "engine": _schema("Engine"),
                "capabilities": _schema("Capabilities"),
                "defaults": _schema("Defaults"),
                "metadata": _schema("Metadata"),
                "enabled": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        "ChatCompletionRequest": _openai_request(
            "messages", {"type": "array", "items": {"type": "object"}}
        ),
        "CompletionRequest": _openai_request(
            "prompt", {"type": ["string", "array"], "items": STRING}
        ),
        "EmbeddingRequest": _openai_request(
            "input", {"type": ["string", "array"], "items": STRING}
        ),
    }


def _openai_request(field: str, schema: Schema) -> Schema:
    """The gateway reads only ``model``; the rest goes to the engine as sent."""
    return _obj(
        {
            "model": {
                "type": "string",
                "description": "A model's id, served name or alias; rewritten to its served name.",
            },
            field: schema,
        },
        ["model"],
    )


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
        for prefix, body in (("", "Error"), ("V1", "OpenAIError")):
            response: dict[str, Any] = {
                "description": description,
                "content": {JSON: {"schema": _schema(body)}},
            }
            headers = _error_headers(status)
            if headers:
                response["headers"] = headers
            responses[prefix + name] = response
    return responses


def _errors(*statuses: int, v1: bool = False) -> dict[str, Any]:
    prefix = "V1" if v1 else ""
    return {str(s): _ref("responses", prefix + _ERRORS[s][0]) for s in statuses}


def _json(schema: Schema, description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _location(description: str) -> dict[str, Any]:
    return {"Location": {"required": True, "description": description, "schema": STRING}}


def _body(schema: Schema, *, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": STRING,
    }


MODEL_ID = _path_parameter("model_id", "The model's id.")


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    keyed: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        **extra,
        "responses": responses,
    }
    if keyed:
        operation["security"] = OPTIONAL_KEY
    return operation


# --- the routes ---------------------------------------------------------------------


def _switch_answers() -> dict[str, Any]:
    return {
        "200": _json(_schema("SwitchDone"), "Done: the switch's record and the new status."),
        "202": _json(
            _schema("SwitchAccepted"),
            'Accepted ("wait": false): poll the Location.',
            headers=_location("/switches/<id>"),
        ),
    }


def _control_paths() -> dict[str, Any]:
    model_answer = _obj({"model": _schema("Model")}, ["model"])
    return {
        "/switch": {
            "post": _operation(
                "switchModel",
                "Load a model, stopping the one that holds the GPU",
                "control",
                {**_switch_answers(), **_errors(400, 401, 403, 404, 409, 413, 502, 504)},
                keyed=True,
                requestBody=_body(_schema("SwitchRequest"), required=True),
            )
        },
        "/stop": {
            "post": _operation(
                "stopModel",
                "Unload the model and free the GPU",
                "control",
                {**_switch_answers(), **_errors(400, 401, 403, 413, 502)},
                keyed=True,
                requestBody=_body(_schema("StopRequest"), required=False),
            )
        },
        "/status": {
            "get": _operation(
                "getStatus",
                "The switcher's state, every model, the queue and the last switch",
                "control",
                {"200": _json(_schema("Status"), "The daemon's status.")},
            )
        },
        "/switches": {
            "get": _operation(
                "listSwitches",
                "The 50 most recent switches, newest first",
                "control",
                {
                    "200": _json(
                        _obj(
                            {"switches": {"type": "array", "items": _schema("Switch")}},
                            ["switches"],
                        ),
                        "Recent switches.",
                    )
                },
            )
        },
        "/switches/{switch_id}": {
            "get": _operation(
                "getSwitch",
                "One switch: pending while it runs, then its record",
                "control",
                {
                    "200": _json(
                        _obj(
                            {"switch": {"anyOf": [_schema("Switch"), _schema("PendingSwitch")]}},
                            ["switch"],
                        ),
                        "The switch.",
                    ),
                    **_errors(404),
                },
                parameters=[_path_parameter("switch_id", "The id a switch was answered with.")],
            )
        },
        "/models": {
            "get": _operation(
                "listModels",
                "Every model, from the compose file and the registry",
                "models",
                {
                    "200": _json(
                        _obj({"models": {"type": "array", "items": _schema("Model")}}, ["models"]),
                        "The models.",
                    )
                },
            ),
            "post": _operation(
                "addModel",
                "Add a model from a Hub repo or a local folder",
                "models",
                {
                    "201": _json(
                        model_answer,
                        "Added.",
                        headers=_location("/models/<id>"),
                    ),
                    **_errors(400, 401, 403, 404, 413),
                },
                keyed=True,
                requestBody=_body(_schema("NewModel"), required=True),
            ),
        },
        "/models/{model_id}": {
            "parameters": [MODEL_ID],
            "get": _operation(
                "getModel",
                "One model",
                "models",
                {"200": _json(model_answer, "The model."), **_errors(404)},
            ),
            "patch": _operation(
                "updateModel",
                "Change a model's settings",
                "models",
                {
                    "200": _json(model_answer, "The changed model."),
                    **_errors(400, 401, 403, 404, 409, 413),
                },
                keyed=True,
                requestBody=_body(_schema("ModelChanges"), required=True),
            ),
            "delete": _operation(
                "deleteModel",
                "Remove a model added through the API",
                "models",
                {
                    "200": _json(
                        _obj({"deleted": STRING}, ["deleted"]), "Removed: the model's id."
                    ),
                    **_errors(401, 403, 404, 409),
                },
                keyed=True,
            ),
        },
        "/models/{model_id}/enable": {
            "parameters": [MODEL_ID],
            "post": _operation(
                "enableModel",
                "Allow switches to the model",
                "models",
                {"200": _json(model_answer, "The model."), **_errors(400, 401, 403, 404, 409)},
                keyed=True,
            ),
        },
        "/models/{model_id}/disable": {
            "parameters": [MODEL_ID],
            "post": _operation(
                "disableModel",
                "Refuse switches to the model (409); not while it is in use",
                "models",
                {"200": _json(model_answer, "The model."), **_errors(400, 401, 403, 404, 409)},
                keyed=True,
            ),
        },
        "/models/{model_id}/pull": {
            "parameters": [MODEL_ID],
            "post": _operation(
                "pullModel",
                "Download the model's repo into the Hub cache in the background",
                "models",
                {
                    "202": _json(
                        _obj(
                            {"pull": _schema("PullProgress"), "poll": STRING},
                            ["pull", "poll"],
                        ),
                        "Started (or already running): progress shows on the model.",
                        headers=_location("/models/<id>"),
                    ),
                    **_errors(400, 401, 403, 404, 409, 413),
                },
                keyed=True,
                requestBody=_body(_schema("PullRequest"), required=False),
            ),
        },
        "/models/{model_id}/logs": {
            "parameters": [MODEL_ID],
            "get": _operation(
                "getModelLogs",
                "The engine container's log: the last lines, or followed live",
                "live views",
                {
                    "200": {
                        "description": (
                            "JSON with the last lines; with follow, server-sent events: one"
                            " container event, a log event per line, end when it stops."
                        ),
                        "content": {
                            JSON: {"schema": _schema("ModelLogs")},
                            EVENT_STREAM: {"schema": STRING},
                        },
                    },
                    **_errors(400, 404),
                },
                parameters=[
                    {
                        "name": "tail",
                        "in": "query",
                        "required": False,
                        "description": "How many of the last lines.",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 10_000,
                            "default": 100,
                        },
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "required": False,
                        "description": (
                            "true: stream the lines and every new one as server-sent events"
                            " (1, yes, 0 and no are also understood, in any case)."
                        ),
                        "schema": {"type": "boolean", "default": False},
                    },
                ],
            ),
        },
    }


def _probe_and_view_paths() -> dict[str, Any]:
    return {
        "/health": {
            "get": _operation(
                "getHealth",
                "Readiness: 200 only while a model is ready and nothing is about to move",
                "health",
                {
                    "200": {
                        "description": "A model is ready (the one asked for, if any).",
                        "content": {HEALTH_JSON: {"schema": _schema("HealthPass")}},
                    },
                    "503": {
                        "description": "Not serving; output says why.",
                        "content": {HEALTH_JSON: {"schema": _schema("HealthFail")}},
                    },
                    **_errors(404),
                },
                parameters=[
                    {
                        "name": "model",
                        "in": "query",
                        "required": False,
                        "description": "Pass only while this model is the ready one.",
                        "schema": STRING,
                    }
                ],
            )
        },
        "/health/live": {
            "get": _operation(
                "getLiveness",
                "Liveness: 200 while the daemon runs",
                "health",
                {
                    "200": {
                        "description": "The daemon runs.",
                        "content": {HEALTH_JSON: {"schema": _schema("HealthPass")}},
                    }
                },
            )
        },
        "/metrics": {
            "get": _operation(
                "getMetrics",
                "Prometheus metrics",
                "live views",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
            )
        },
        "/events": {
            "get": _operation(
                "getEvents",
                "Every state change as server-sent events, starting with the status",
                "live views",
                {
                    "200": {
                        "description": (
                            "status first, then switch_requested, state, switch_finished,"
                            " rolled_back, model_died, pull; each with an increasing id."
                        ),
                        "content": {EVENT_STREAM: {"schema": STRING}},
                    }
                },
            )
        },
        "/": {
            "get": _operation(
                "getDashboard",
                "The web dashboard",
                "live views",
                {
                    "200": {
                        "description": "The dashboard's page.",
                        "content": {"text/html": {"schema": STRING}},
                    }
                },
            )
        },
        "/ui/{filename}": {
            "get": _operation(
                "getDashboardFile",
                "The dashboard's scripts and style sheets",
                "live views",
                {
                    "200": {
                        "description": "The file.",
                        "content": {
                            "text/css": {"schema": STRING},
                            "text/javascript": {"schema": STRING},
                            "application/javascript": {"schema": STRING},
                            "text/html": {"schema": STRING},
                        },
                    },
                    **_errors(403, 404),
                },
                parameters=[_path_parameter("filename", "app.js, style.css, ...")],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "getOpenAPI",
                "This document",
                "live views",
                {
                    "200": _json(
                        _obj(
                            {"openapi": STRING, "info": {"type": "object"}, "paths": {}},
                            ["openapi", "info", "paths"],
                        ),
                        "The API's OpenAPI document.",
                    )
                },
            )
        },
    }


_V1_FAILURES = (400, 401, 403, 404, 409, 413, 429, 502, 504)


def _forwarded(operation_id: str, summary: str, request: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if request is not None:
        extra["requestBody"] = _body(_schema(request), required=True)
    return _operation(
        operation_id,
        summary,
        "gateway",
        {
            "200": {
                "description": (
                    "The engine's answer, passed through as it arrives (a stream chunk by chunk);"
                    " the engine's own errors pass through likewise."
                ),
                "content": {JSON: {"schema": {"type": "object"}}, EVENT_STREAM: {"schema": STRING}}
                if request is not None
                else {"*/*": {"schema": {}}},
            },
            **_errors(*_V1_FAILURES, v1=True),
        },
        keyed=True,
        **extra,
    )


PROXY_METHODS = ("get", "post", "put", "patch", "delete")


def _gateway_paths() -> dict[str, Any]:
    return {
        "/v1/models": {
            "get": _operation(
                "listV1Models",
                "Every enabled model, in OpenAI's list shape",
                "gateway",
                {
                    "200": _json(_schema("V1ModelList"), "The models."),
                    **_errors(401, 403, 404, v1=True),
                },
                keyed=True,
            )
        },
        "/v1/chat/completions": {
            "post": _forwarded(
                "createChatCompletion",
                "Chat completion by the model the body names",
                "ChatCompletionRequest",
            )
        },
        "/v1/completions": {
            "post": _forwarded(
                "createCompletion", "Completion by the model the body names", "CompletionRequest"
            )
        },
        "/v1/embeddings": {
            "post": _forwarded(
                "createEmbedding", "Embeddings by the model the body names", "EmbeddingRequest"
            )
        },
        "/v1/{tail}": {
            "description": (
                "Any other /v1 request, any method: routed by the body's model (or the model"
                " query parameter) to that model's engine and passed through."
            ),
            "parameters": [_path_parameter("tail", "The rest of the engine's path.")],
            **{
                method: _forwarded(
                    f"forwardV1{method.capitalize()}",
                    f"{method.upper()} to the engine of the model the request names",
                    None,
                )
                for method in PROXY_METHODS
            },
        },
    }


_CHANGING = frozenset({"post", "put", "patch", "delete"})
_STREAMS = frozenset({"/events", "/models/{model_id}/logs"})


def _guarded(paths: dict[str, Any]) -> dict[str, Any]:
    """What the guard in front of every handler may answer, added to each operation."""
    for path, item in paths.items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            v1 = path.startswith("/v1/")
            wanted = [403]
            if method in _CHANGING:
                wanted += [408, 415]
                # Even a change that reads no body must say JSON (see 415).
                operation.setdefault("requestBody", _body(_obj({}), required=False))
            if path in _STREAMS:
                wanted.append(503)
            for status in wanted:
                operation["responses"].setdefault(str(status), _errors(status, v1=v1)[str(status)])
    return paths


def openapi_document() -> dict[str, Any]:
    """The whole HTTP API as an OpenAPI 3.1 document; a new object on each call."""
    version = str(getattr(orchestrator, "__version__", "0.1.0"))
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "model-orchestrator",
            "version": version,
            "description": (
                "Swaps one GPU between vLLM models kept as docker-compose profiles, and"
                " routes OpenAI requests to whichever model they name. Control errors are"
                ' {"error": {"code", "message"}}; /v1 errors are OpenAI\'s shape.'
            ),
        },
        "tags": [
            {"name": "control", "description": "Switching models"},
            {"name": "models", "description": "The model registry"},
            {"name": "health", "description": "Probes, never behind a key"},
            {"name": "live views", "description": "Dashboard, events, metrics, logs"},
            {"name": "gateway", "description": "The OpenAI-compatible gateway"},
        ],
        "paths": _guarded({**_control_paths(), **_probe_and_view_paths(), **_gateway_paths()}),
        "components": {
            "schemas": {**_answer_schemas(), **_request_schemas()},
            "responses": _responses(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <key>, when keys are configured.",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same key in x-api-key.",
                },
            },
        },
    }
    # Parts are shared between operations; the caller gets a tree of its own.
    return copy.deepcopy(document)
