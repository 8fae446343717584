"""What clients send to the control API, as pydantic models: the one source of its rules.

Handlers parse each body with one of these models, and the OpenAPI document's request
schemas are generated from the same classes, so what the document promises and what the
daemon accepts cannot drift apart. Bodies are read strictly, as JSON types: ``1`` is not
``true`` and ``"1"`` is not ``1``. A refusal is ``BadRequest`` naming the field by its
dotted path (``engine.gpu_memory_utilization``) in ``error.field``, with the rule it broke.

Rules that depend on the daemon's settings or on the other models (which folders a
checkpoint may come from, which images may run, which ids are taken) are the catalog's;
it refuses with ``refusal`` so that its answers read like these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Self, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .cache import is_repo_id, looks_like_path, revision_problem
from .errors import BadRequest
from .naming import MODEL_ID_PATTERN

Parsed = TypeVar("Parsed", bound=BaseModel)

# Our own error types: a rule reads after the name of its field, a refusal on its own.
RULE = "rule"
REFUSAL = "refusal"


def _broken(rule: str, *, field: str | None = None) -> PydanticCustomError:
    """A rule broken, on ``field`` if given, else on the value being validated."""
    context = {"rule": rule} if field is None else {"rule": rule, "field": field}
    # Passed as context, not as the template, so that a brace in the rule stays a brace.
    return PydanticCustomError(RULE, "{rule}", context)


def _refused(message: str, *, field: str) -> PydanticCustomError:
    return PydanticCustomError(REFUSAL, "{message}", {"message": message, "field": field})


def refusal(field: str, rule: str) -> BadRequest:
    """A body refused for breaking ``rule``; also for rules the catalog checks itself."""
    return BadRequest(f'"{field}" {rule}', field=field)


def _rule(rule: str, *tests: Callable[[Any], bool]) -> WrapValidator:
    """Any failure of the type and constraints before it, or of ``tests``, is ``rule``."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            valid = handler(value)
        except ValidationError:
            raise _broken(rule) from None
        if not all(test(valid) for test in tests):
            raise _broken(rule)
        return valid

    return WrapValidator(check)


def _strip(value: str) -> str:
    return value.strip()


def _visible(value: str) -> bool:
    return bool(value.strip())


def _printable(value: str) -> bool:
    return value.strip().isprintable()


def _hub_repo(value: str) -> bool:
    return not looks_like_path(value) and is_repo_id(value)


def _no_parent_steps(path: str) -> str:
    if ".." in path.split("/"):
        raise _broken("must not contain '..': give the folder's own path")
    return path


def _ref_name(revision: str) -> str:
    problem = revision_problem(revision)
    if problem is not None:
        raise _refused(
            f"revision {revision!r} {problem}: give a branch, a tag or a 40-character commit hash",
            field="revision",
        )
    return revision


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _omittable(**field: Any) -> Any:
    """A field a body may leave out but not set to null; ask ``model_fields_set`` if it did.

    The None left behind is no value, so the document shows no default.
    """
    return Field(default=None, json_schema_extra=_no_default, **field)


# --- the values ---------------------------------------------------------------------------

Flag = Annotated[bool, _rule("must be true or false")]
NonEmpty = Annotated[str, Field(min_length=1), _rule("must be a non-empty string")]
Count = Annotated[int, Field(gt=0), _rule("must be a whole number greater than 0")]
Fraction = Annotated[float, Field(gt=0, le=1), _rule("must be a number in (0, 1]")]
Temperature = Annotated[float, Field(ge=0, le=2), _rule("must be a number in [0, 2]")]
Probability = Annotated[float, Field(ge=0, le=1), _rule("must be a number in [0, 1]")]
DtypeName = Literal["auto", "float16", "bfloat16", "float32"]
Dtype = Annotated[DtypeName, _rule(f"must be one of {', '.join(get_args(DtypeName))}")]
Metadata = Annotated[dict[str, str], _rule("must be an object of strings")]
# The Compose specification's rule for profile names, which model ids are.
ModelId = Annotated[
    str,
    Field(max_length=64, pattern=f"^{MODEL_ID_PATTERN}$"),
    _rule("must be 2 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"),
]
# Checked before white space around it is stripped, as the document says.
Name = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"\S"),
    _rule("must be a non-empty string of at most 200 characters", _visible),
    AfterValidator(_strip),
]
# "$" would be read by compose as a variable.
Image = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^\s*[^\s\u0000-\u001f\u007f$]+\s*$"),
    _rule("must be an image reference without spaces or '$', at most 200 characters", _printable),
    AfterValidator(_strip),
]
Repo = Annotated[
    str,
    Field(min_length=1),
    _rule("must be a Hub repo id such as Qwen/Qwen3-4B-Instruct-2507", _hub_repo),
]
# Compose's short volume syntax splits on ":" and ","; "$" would be read as a variable.
FolderPath = Annotated[
    str,
    Field(max_length=4096, pattern=r"^(/|~/)[^:,$\u0000-\u001f\u007f]*$"),
    _rule(
        "must be an absolute path (or one in ~/) to a model folder on this host, without"
        " ':', ',', '$' or control characters",
        str.isprintable,
    ),
    AfterValidator(_no_parent_steps),
]
Revision = Annotated[NonEmpty, AfterValidator(_ref_name)]


# --- the bodies ---------------------------------------------------------------------------


class Request(BaseModel):
    # Strict: a body is read as the JSON types the document names, never coerced. "model_id"
    # is a field, not pydantic's namespace.
    model_config = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, protected_namespaces=()
    )


class SwitchRequest(Request):
    """The model to load; "model_id" is the seed's name for "model"."""

    # Other fields have always been ignored here; clients may send them.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                {"required": ["model"], "properties": {"model": {"type": "string"}}},
                {"required": ["model_id"], "properties": {"model_id": {"type": "string"}}},
            ]
        },
    )

    model: NonEmpty | None = Field(default=None, description="The model's id.")
    model_id: NonEmpty | None = Field(
        default=None, description="Same as model; when both are given they must agree."
    )
    wait: Flag = Field(
        default=True, description="false: answer 202 at once and switch in the background."
    )

    @model_validator(mode="after")
    def _names_one_model(self) -> Self:
        if self.model is not None and self.model_id is not None and self.model != self.model_id:
            raise _refused('"model" and "model_id" name different models; give one', field="model")
        if self.model is None and self.model_id is None:
            raise _refused('missing "model": give the id of the model to switch to', field="model")
        return self

    @property
    def target(self) -> str:
        """The model to switch to, by whichever field named it."""
        target = self.model or self.model_id
        assert target is not None  # _names_one_model refused a body that names none
        return target


class StopRequest(Request):
    model_config = ConfigDict(extra="ignore")

    wait: Flag = Field(
        default=True, description="false: answer 202 at once and stop in the background."
    )


class SleepRequest(StopRequest):
    """POST /sleep: the awake model sleeps, none wakes."""


class PullRequest(Request):
    model_config = ConfigDict(extra="ignore")

    revision: Revision | None = Field(
        default=None, description="A branch, a tag or a commit hash. Default: main."
    )


class EngineSettings(Request):
    """vLLM's flags, by their names; a null value removes the setting."""

    gpu_memory_utilization: Fraction | None = None
    max_model_len: Count | None = None
    tensor_parallel_size: Count | None = None
    dtype: Dtype | None = None
    trust_remote_code: Flag | None = None


class Capabilities(Request):
    """What clients may rely on; context_length must not exceed engine.max_model_len.
    A null value removes the setting."""

    context_length: Count | None = None
    max_output_tokens: Count | None = None
    vision: Flag | None = None
    tools: Flag | None = None
    streaming: Flag | None = None


class Defaults(Request):
    """Sampling defaults; a null value removes the setting."""

    temperature: Temperature | None = None
    top_p: Probability | None = None


class ModelSettings(Request):
    """What a model may be given when it is added or changed."""

    display_name: Name = _omittable()
    image: Image = _omittable(description="Must match the daemon's allowed_images.")
    engine: EngineSettings | None = None
    capabilities: Capabilities | None = None
    defaults: Defaults | None = None
    metadata: Metadata | None = Field(
        default=None, description="Free-form strings; base_model names a checkpoint's base model."
    )
    enabled: Flag = _omittable()

    @model_validator(mode="after")
    def _context_fits(self) -> Self:
        max_len = self.engine.max_model_len if self.engine else None
        context = self.capabilities.context_length if self.capabilities else None
        if max_len is not None and context is not None and context > max_len:
            raise _broken(
                f"is {context}, more than engine.max_model_len {max_len}",
                field="capabilities.context_length",
            )
        return self


class NewModel(ModelSettings):
    """Exactly one of "repo" (a Hub repo id, loaded offline from the cache) and "path"
    (a model folder on the daemon's host, mounted read-only)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["repo"], "properties": {"repo": {"type": "string"}}},
                {"required": ["path"], "properties": {"path": {"type": "string"}}},
            ]
        }
    )

    repo: Repo | None = Field(
        default=None, description="name or namespace/name, as the Hub spells it"
    )
    path: FolderPath | None = Field(
        default=None,
        description="Must lie inside the daemon's checkpoint_roots, symlinks resolved.",
    )
    id: ModelId = _omittable(description="Default: derived from the repo or the folder.")
    enabled: Flag = True

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.repo is None) == (self.path is None):
            raise _refused(
                'give exactly one of "repo" (a Hub repo id) or "path" (a folder)', field="repo"
            )
        return self


class ModelChanges(ModelSettings):
    """Sections merge field by field. A model declared in the compose file takes
    display_name, capabilities, defaults and enabled only."""


def check_merged(engine: Mapping[str, Any], capabilities: Mapping[str, Any]) -> None:
    """The rules between sections, for a model's settings once a change is merged in."""
    parse(ModelSettings, {"engine": engine, "capabilities": capabilities})


# --- what the gateway reads: the model, nothing else ---------------------------------------


class OpenAIRequest(BaseModel):
    """The gateway reads only model; the rest goes to the engine as sent."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str = Field(
        description="A model's id, served name or alias; rewritten to its served name."
    )


class ChatCompletionRequest(OpenAIRequest):
    messages: list[dict[str, Any]] = _omittable()


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = _omittable()


class EmbeddingRequest(OpenAIRequest):
    input: str | list[str] = _omittable()


# --- parsing ------------------------------------------------------------------------------


def parse(model: type[Parsed], data: Any) -> Parsed:
    """``data``, a decoded JSON body, as ``model``; BadRequest for the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _bad_request(err.errors()[0], model) from None


def _bad_request(error: ErrorDetails, model: type[BaseModel]) -> BadRequest:
    context = error.get("ctx") or {}
    field = context.get("field") or ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == REFUSAL:
        return BadRequest(error["msg"], field=field)
    if kind == RULE:
        rule = error["msg"]
    elif kind == "extra_forbidden":
        known = ", ".join(_fields_at(model, error["loc"][:-1]))
        rule = f"is not a field here (known: {known})"
    elif kind in {"model_type", "model_attributes_type", "dict_type"}:
        rule = "must be a JSON object"
    else:  # a constraint without a rule of ours: pydantic's own words
        rule = f"is not valid: {error['msg']}"
    return refusal(field, rule) if field else BadRequest(f"request body {rule}")


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The fields of the model nested at ``loc``: what an unknown field may have meant."""
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        model = next(
            kind
            for kind in (annotation, *get_args(annotation))
            if isinstance(kind, type) and issubclass(kind, BaseModel)
        )
    return list(model.model_fields)
