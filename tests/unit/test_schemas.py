"""The request and answer models: each rule refused on its dotted field, one source for the
document's schemas, and answers that keep their wire shape."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import answers
from orchestrator.errors import BadRequest, ModelNotCached
from orchestrator.history import Kind, Outcome, SwitchRecord
from orchestrator.naming import MODEL_ID_PATTERN
from orchestrator.openapi import openapi_document
from orchestrator.registry import ModelEntry, RegistryLimits, apply_changes, resolve_path
from orchestrator.schemas import (
    ModelChanges,
    NewModel,
    PullRequest,
    StopRequest,
    SwitchRequest,
    parse,
)
from orchestrator.states import State

REPO = {"repo": "org/x"}


def refused(model: type[BaseModel], body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse(model, body)
    return caught.value


# Each rule of a new model's body, broken once: the body and the field named.
NEW_MODEL_REFUSALS = [
    ({"engine": {"gpu_memory_utilization": 0}}, "engine.gpu_memory_utilization"),
    ({"engine": {"gpu_memory_utilization": 1.01}}, "engine.gpu_memory_utilization"),
    ({"engine": {"gpu_memory_utilization": "0.5"}}, "engine.gpu_memory_utilization"),
    ({"engine": {"gpu_memory_utilization": float("nan")}}, "engine.gpu_memory_utilization"),
    ({"engine": {"max_model_len": 0}}, "engine.max_model_len"),
    ({"engine": {"max_model_len": 4096.0}}, "engine.max_model_len"),
    ({"engine": {"max_model_len": True}}, "engine.max_model_len"),
    ({"engine": {"tensor_parallel_size": -2}}, "engine.tensor_parallel_size"),
    ({"engine": {"dtype": "int4"}}, "engine.dtype"),
    ({"engine": {"trust_remote_code": 1}}, "engine.trust_remote_code"),
    ({"engine": {"quantization": "awq"}}, "engine.quantization"),
    ({"engine": "fast"}, "engine"),
    ({"capabilities": {"context_length": 0}}, "capabilities.context_length"),
    ({"capabilities": {"max_output_tokens": 1.5}}, "capabilities.max_output_tokens"),
    ({"capabilities": {"vision": "yes"}}, "capabilities.vision"),
    ({"capabilities": {"tools": 0}}, "capabilities.tools"),
    ({"capabilities": {"streaming": "true"}}, "capabilities.streaming"),
    ({"capabilities": {"audio": True}}, "capabilities.audio"),
    ({"defaults": {"temperature": 2.01}}, "defaults.temperature"),
    ({"defaults": {"temperature": -1}}, "defaults.temperature"),
    ({"defaults": {"top_p": 1.5}}, "defaults.top_p"),
    ({"defaults": {"top_k": 5}}, "defaults.top_k"),
    (
        {"engine": {"max_model_len": 2048}, "capabilities": {"context_length": 4096}},
        "capabilities.context_length",
    ),
    ({"metadata": {"base_model": None}}, "metadata"),
    ({"metadata": ["a"]}, "metadata"),
    ({"display_name": "   "}, "display_name"),
    ({"display_name": "x" * 201}, "display_name"),
    ({"display_name": None}, "display_name"),
    ({"image": "two words"}, "image"),
    ({"image": "vllm:$TAG"}, "image"),
    ({"image": "vllm\u0085x"}, "image"),
    ({"image": None}, "image"),
    ({"enabled": None}, "enabled"),
    ({"enabled": "false"}, "enabled"),
    ({"id": "x"}, "id"),
    ({"id": "_x"}, "id"),
    ({"id": "a/b"}, "id"),
    ({"id": "x" * 65}, "id"),
    ({"id": None}, "id"),
    ({"flavour": "x"}, "flavour"),
]


@pytest.mark.parametrize(("body", "field"), NEW_MODEL_REFUSALS)
def test_new_model_rules_name_their_field(body: dict[str, Any], field: str) -> None:
    """Each broken rule is a 400 naming the field by its dotted path, in words."""
    error = refused(NewModel, {**REPO, **body})
    assert (error.status, error.code) == (400, "bad_request")
    assert error.details == {"field": field}
    assert error.message.startswith(f'"{field}" ')


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"repo": "org/x", "path": "/srv/x"},
        {"repo": None, "path": None},
    ],
)
def test_a_new_model_needs_exactly_one_source(body: dict[str, Any]) -> None:
    error = refused(NewModel, body)
    assert error.details == {"field": "repo"}
    assert "exactly one" in error.message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"repo": "/root/.cache/huggingface/x"}, "Hub repo id"),
        ({"repo": "not a repo"}, "Hub repo id"),
        ({"repo": ""}, "Hub repo id"),
        ({"path": "relative/x"}, "absolute path"),
        ({"path": "~nobody/x"}, "absolute path"),
        ({"path": "/srv/a:b"}, "':'"),
        ({"path": "/srv/a,b"}, "','"),
        ({"path": "/srv/a$b"}, "'$'"),
        ({"path": "/srv/\x14x"}, "control characters"),
        ({"path": "/srv/\u200bx"}, "control characters"),
        ({"path": "/srv/a/../etc"}, "'..'"),
        ({"path": "/" + "x" * 4096}, "absolute path"),
    ],
)
def test_bad_sources_are_refused_in_words(body: dict[str, Any], words: str) -> None:
    error = refused(NewModel, body)
    assert error.details == {"field": next(iter(body))}
    assert words in error.message


def test_unknown_fields_are_refused_with_the_known_ones() -> None:
    error = refused(NewModel, {**REPO, "engine": {"quantization": "awq"}})
    assert "known: gpu_memory_utilization, max_model_len" in error.message
    assert "repo, path, id" in refused(NewModel, {**REPO, "flavour": 1}).message


def test_a_valid_body_is_read_as_sent_with_names_stripped() -> None:
    new = parse(
        NewModel,
        {
            **REPO,
            "id": "x-1",
            "display_name": "  Qwen small ",
            "image": " standin:v2 ",
            "engine": {"gpu_memory_utilization": 1, "dtype": None},
            "capabilities": {"context_length": 4096},
            "metadata": {"base_model": "org/base"},
        },
    )
    assert (new.display_name, new.image, new.id) == ("Qwen small", "standin:v2", "x-1")
    assert new.engine is not None and new.engine.model_dump(exclude_unset=True) == {
        "gpu_memory_utilization": 1.0,
        "dtype": None,
    }
    assert new.enabled is True
    assert parse(NewModel, REPO).model_fields_set == {"repo"}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "model", 'missing "model"'),
        ({"model": None, "model_id": None}, "model", 'missing "model"'),
        ({"model": 5}, "model", '"model" must be a non-empty string'),
        ({"model": ""}, "model", '"model" must be a non-empty string'),
        ({"model_id": []}, "model_id", '"model_id" must be a non-empty string'),
        ({"model": "a", "model_id": "b"}, "model", "different models"),
        ({"model": "a", "wait": "no"}, "wait", '"wait" must be true or false'),
        ({"model": "a", "wait": 0}, "wait", '"wait" must be true or false'),
    ],
)
def test_switch_request_rules(body: dict[str, Any], field: str, words: str) -> None:
    error = refused(SwitchRequest, body)
    assert error.details == {"field": field}
    assert words in error.message


def test_switch_request_takes_either_name_and_ignores_the_rest() -> None:
    assert parse(SwitchRequest, {"model_id": "beta", "extra": 1}).target == "beta"
    request = parse(SwitchRequest, {"model": "alpha", "model_id": "alpha", "wait": False})
    assert (request.target, request.wait) == ("alpha", False)
    assert parse(StopRequest, {}).wait is True
    assert refused(StopRequest, {"wait": "yes"}).details == {"field": "wait"}


@pytest.mark.parametrize("body", [[1], "x", 3, None])
def test_a_body_must_be_an_object(body: Any) -> None:
    error = refused(SwitchRequest, body)
    assert error.message == "request body must be a JSON object"
    assert error.details == {}


@pytest.mark.parametrize("revision", ["", 3, "../x", "/dev/zero", "a b", "a@{1}", "x.lock"])
def test_bad_revisions_are_refused(revision: Any) -> None:
    error = refused(PullRequest, {"revision": revision})
    assert error.details == {"field": "revision"}


def test_good_revisions_pass() -> None:
    assert parse(PullRequest, {}).revision is None
    assert parse(PullRequest, {"revision": "v1.0"}).revision == "v1.0"
    assert parse(PullRequest, {"revision": "a" * 40}).revision == "a" * 40


# --- changes merged into an entry ---------------------------------------------------------


def test_changes_merge_and_a_null_removes() -> None:
    entry = ModelEntry(id="x", origin="registry", engine={"max_model_len": 4096, "dtype": "auto"})
    changes = parse(ModelChanges, {"engine": {"dtype": None}, "defaults": None})
    changed = apply_changes(entry, changes, RegistryLimits())
    assert changed.engine == {"max_model_len": 4096}
    assert changed.defaults == {}
    assert changed.display_name is None


def test_the_context_rule_holds_for_the_merged_settings() -> None:
    """A change that alone breaks no rule may break one with what the model has."""
    entry = ModelEntry(id="x", origin="registry", engine={"max_model_len": 4096})
    changes = parse(ModelChanges, {"capabilities": {"context_length": 8192}})
    with pytest.raises(BadRequest) as caught:
        apply_changes(entry, changes, RegistryLimits())
    assert caught.value.details == {"field": "capabilities.context_length"}
    assert "more than engine.max_model_len 4096" in caught.value.message
    lifted = parse(ModelChanges, {"engine": {"max_model_len": None}})
    wide = replace(entry, capabilities={"context_length": 8192})
    assert apply_changes(wide, lifted, RegistryLimits()).engine == {}


def test_images_and_paths_are_held_to_the_settings(tmp_path: Path) -> None:
    limits = RegistryLimits(checkpoint_roots=(tmp_path,), allowed_images=("vllm/*",))
    entry = ModelEntry(id="x", origin="registry")
    with pytest.raises(BadRequest, match="allowed_images") as caught:
        apply_changes(entry, parse(ModelChanges, {"image": "other/image"}), limits)
    assert caught.value.details == {"field": "image"}
    assert apply_changes(entry, parse(ModelChanges, {"image": "vllm/x"}), limits).image == "vllm/x"
    (tmp_path / "run").mkdir()
    assert resolve_path(str(tmp_path / "run"), limits) == str(tmp_path.resolve() / "run")
    with pytest.raises(BadRequest, match="checkpoint_roots") as caught:
        resolve_path("/", limits)
    assert caught.value.details == {"field": "path"}


# --- the document's schemas come from the models ------------------------------------------


def test_the_documents_enums_are_the_codes() -> None:
    schemas = openapi_document()["components"]["schemas"]
    assert schemas["Outcome"]["enum"] == [outcome.value for outcome in Outcome]
    assert schemas["State"]["enum"] == [state.value for state in State]
    assert schemas["Kind"]["enum"] == [kind.value for kind in Kind]
    assert schemas["NewModel"]["properties"]["id"]["pattern"] == f"^{MODEL_ID_PATTERN}$"


def test_every_model_the_document_names_is_a_component_of_its_own_name() -> None:
    document = json.dumps(openapi_document())
    schemas = openapi_document()["components"]["schemas"]
    for name in schemas:
        assert f'"#/components/schemas/{name}"' in document, f"{name} is never referred to"
    assert {"SwitchRequest", "NewModel", "ModelChanges", "Status", "Switch", "Error"} <= set(
        schemas
    )


def test_answers_are_documented_as_sent_and_bodies_as_read() -> None:
    schemas = openapi_document()["components"]["schemas"]
    switch = schemas["Switch"]
    assert {"from", "to"} <= set(switch["required"])
    assert switch["properties"]["requested_at"] == {"type": "string", "format": "date-time"}
    assert schemas["HealthPass"]["required"] == ["status", "model"]
    assert schemas["NewModel"]["additionalProperties"] is False
    assert "default" not in schemas["NewModel"]["properties"]["display_name"]
    assert "title" not in schemas["EngineSettings"]["properties"]["dtype"]


# --- answers keep their wire shape ----------------------------------------------------------


def test_a_switch_is_sent_with_from_and_to_and_iso_times() -> None:
    record = SwitchRecord(
        id="abc",
        kind=Kind.SWITCH,
        from_model="alpha",
        to_model="beta",
        requested_at=0.0,
        finished_at=1.5,
        outcome=Outcome.OK,
        duration=1.23456,
        error={"code": "x", "message": "y", "log_tail": "z"},
    )
    sent = answers.Switch.of(record).to_json()
    assert sent == {
        "id": "abc",
        "kind": "switch",
        "from": "alpha",
        "to": "beta",
        "requested_at": datetime.fromtimestamp(0.0, UTC).isoformat(),
        "finished_at": datetime.fromtimestamp(1.5, UTC).isoformat(),
        "outcome": "ok",
        "duration": 1.235,
        "error": {"code": "x", "message": "y", "log_tail": "z"},
        "timings": None,
        "path": None,
    }


def test_an_error_carries_its_details() -> None:
    err = ModelNotCached("not here", repo="org/a", cache_path="/hub")
    assert answers.Error.of(err).to_json() == err.to_body()
