"""The model registry: what each model is called, what it can do, and models added at run time.

Models come from two places. The user's compose file declares some; their lifecycle
settings stay in that file, and the registry only keeps what the user changed about
them through the API (enabled, display name, capabilities, sampling defaults). The
others are added through the API: each becomes a profile in a compose document that
the daemon renders from the registry, merged into its normalized copy and run
exactly like a hand-written profile.

Every value is validated here, and a refusal names the field it is about.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from .cache import HUB_MOUNT, is_repo_id, looks_like_path
from .errors import BadRequest
from .naming import MODEL_ID

Origin = Literal["compose", "registry"]

# The container folder a local checkpoint is mounted at, read-only, below which each
# model gets its own folder.
CHECKPOINT_MOUNT = "/models"
ENGINE_PORT = 8000
SERVICE_PREFIX = "model-"
ORIGIN_LABEL = "io.model-orchestrator.origin"

DTYPES = ("auto", "float16", "bfloat16", "float32")

# What the engine's flags take; the flag is the field's name in vLLM's spelling.
ENGINE_FIELDS = (
    "gpu_memory_utilization",
    "max_model_len",
    "tensor_parallel_size",
    "dtype",
    "trust_remote_code",
)
CAPABILITY_FIELDS = ("context_length", "max_output_tokens", "vision", "tools", "streaming")
DEFAULT_FIELDS = ("temperature", "top_p")

# What the API lets a user change on a model declared in compose: the rest is the file's.
COMPOSE_EDITABLE = frozenset({"display_name", "capabilities", "defaults", "enabled"})
REGISTRY_EDITABLE = COMPOSE_EDITABLE | {"image", "engine", "metadata"}


@dataclass(frozen=True)
class ModelEntry:
    id: str
    origin: Origin
    display_name: str | None = None  # None: the compose file's, else the id
    repo: str | None = None  # a Hub repo id, loaded offline from the cache
    path: str | None = None  # a local model folder on the host, mounted read-only
    image: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> ModelEntry:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in stored.items() if k in known})


# --- validation ------------------------------------------------------------------


def _refuse(field_name: str, message: str) -> BadRequest:
    return BadRequest(f"{field_name}: {message}", field=field_name)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _refuse(field_name, "must be a non-empty string")
    if len(value) > 200:
        raise _refuse(field_name, "must be at most 200 characters")
    return value.strip()


def _boolean(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(field_name, "must be true or false")
    return value


def _positive_int(field_name: str, value: Any) -> int:
    if not _integer(value) or value <= 0:
        raise _refuse(field_name, "must be a whole number greater than 0")
    return int(value)


def _in_range(field_name: str, value: Any, low: float, high: float, *, open_low: bool) -> float:
    if not _number(value) or not (value > low if open_low else value >= low) or value > high:
        bracket = "(" if open_low else "["
        raise _refuse(field_name, f"must be a number in {bracket}{low:g}, {high:g}]")
    return float(value)


def _section(body: Mapping[str, Any], name: str, known: tuple[str, ...]) -> dict[str, Any]:
    raw = body.get(name, {})
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _refuse(name, "must be an object")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _refuse(f"{name}.{unknown[0]}", f"unknown field (known: {', '.join(known)})")
    return raw


def validate_engine(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = _section(body, "engine", ENGINE_FIELDS)
    engine: dict[str, Any] = {}
    for name, value in raw.items():
        where = f"engine.{name}"
        if value is None:
            continue
        if name == "gpu_memory_utilization":
            engine[name] = _in_range(where, value, 0.0, 1.0, open_low=True)
        elif name in {"max_model_len", "tensor_parallel_size"}:
            engine[name] = _positive_int(where, value)
        elif name == "dtype":
            if value not in DTYPES:
                raise _refuse(where, f"must be one of {', '.join(DTYPES)}")
            engine[name] = value
        else:
            engine[name] = _boolean(where, value)
    return engine


def validate_capabilities(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = _section(body, "capabilities", CAPABILITY_FIELDS)
    capabilities: dict[str, Any] = {}
    for name, value in raw.items():
        where = f"capabilities.{name}"
        if value is None:
            continue
        if name in {"context_length", "max_output_tokens"}:
            capabilities[name] = _positive_int(where, value)
        else:
            capabilities[name] = _boolean(where, value)
    return capabilities


def validate_defaults(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = _section(body, "defaults", DEFAULT_FIELDS)
    defaults: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        high = 2.0 if name == "temperature" else 1.0
        defaults[name] = _in_range(f"defaults.{name}", value, 0.0, high, open_low=False)
    return defaults


def validate_metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = body.get("metadata", {})
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _refuse("metadata", "must be an object of strings")
    return dict(raw)


def validate_model_id(value: Any) -> str:
    if not isinstance(value, str) or not MODEL_ID.fullmatch(value) or len(value) > 64:
        raise _refuse(
            "id",
            "must be 2 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


def image_repository(image: str) -> str:
    """An image reference without its tag or digest: ``vllm/vllm-openai``."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    if ":" in tail:
        tail = tail.split(":", 1)[0]
    return f"{head}/{tail}" if head else tail


def default_allowed_images(engine_image: str) -> tuple[str, ...]:
    repository = image_repository(engine_image)
    return (repository, f"{repository}:*", f"{repository}@sha256:*")


@dataclass(frozen=True)
class RegistryLimits:
    """What a model added through the API may mount and run: the user's settings."""

    # Folders a model given by path must lie in, symlinks resolved.
    checkpoint_roots: tuple[Path, ...] = ()
    # fnmatch patterns an image reference must match.
    allowed_images: tuple[str, ...] = ()


def validate_image(value: Any, limits: RegistryLimits) -> str:
    image = _string("image", value)
    if any(ch.isspace() for ch in image) or not image.isprintable() or "$" in image:
        raise _refuse("image", "must be an image reference without spaces or '$'")
    if not any(fnmatchcase(image, pattern) for pattern in limits.allowed_images):
        raise _refuse(
            "image",
            f"{image} is not allowed: models added through the API may run only images"
            f" matching allowed_images ({', '.join(limits.allowed_images) or 'none'});"
            " add a pattern to that setting to allow more",
        )
    return image


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def validate_path(value: Any, limits: RegistryLimits) -> str:
    """A model folder on this host: absolute, under a checkpoint root once resolved."""
    if not isinstance(value, str) or not value.startswith(("/", "~/")):
        raise _refuse("path", "must be an absolute path to a model folder on this host")
    if any(ch in value for ch in ":,$") or not value.isprintable() or len(value) > 4096:
        # Compose's short volume syntax splits on ":"; "$" would be read as a variable.
        raise _refuse("path", "must not contain ':', ',', '$' or control characters")
    if ".." in value.split("/"):
        raise _refuse("path", "must not contain '..': give the folder's own path")
    try:
        expanded = Path(value).expanduser()
    except RuntimeError as err:  # no home directory to expand "~" to
        raise _refuse("path", f"cannot be expanded: {err}") from err
    # Symlinks followed: a link inside a root that points elsewhere is elsewhere.
    resolved = Path(os.path.realpath(expanded))
    roots = tuple(Path(os.path.realpath(root)) for root in limits.checkpoint_roots)
    if not _inside(resolved, roots):
        shown = f" (resolves to {resolved})" if resolved != expanded else ""
        raise _refuse(
            "path",
            f"{value}{shown} is outside checkpoint_roots"
            f" ({', '.join(str(root) for root in roots) or 'none'}): move the checkpoint"
            " there, or add its folder to that setting",
        )
    if any(ch in str(resolved) for ch in ":,$"):
        raise _refuse("path", f"resolves to {resolved}, which compose cannot mount")
    return str(resolved)


def validate_source(
    body: Mapping[str, Any], limits: RegistryLimits
) -> tuple[str | None, str | None]:
    """The repo id or the local folder a new model loads; exactly one of them."""
    repo, path = body.get("repo"), body.get("path")
    if (repo is None) == (path is None):
        raise _refuse("repo", 'give exactly one of "repo" (a Hub repo id) or "path" (a folder)')
    if repo is not None:
        if not isinstance(repo, str) or looks_like_path(repo) or not is_repo_id(repo):
            raise _refuse("repo", "must be a Hub repo id such as Qwen/Qwen3-4B-Instruct-2507")
        return repo, None
    return None, validate_path(path, limits)


def check_fields(body: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _refuse(unknown[0], f"cannot be set {what} (allowed: {', '.join(sorted(allowed))})")


def apply_changes(entry: ModelEntry, body: Mapping[str, Any], limits: RegistryLimits) -> ModelEntry:
    """The entry with the body's fields validated and applied; sections merge field by field."""
    changes: dict[str, Any] = {}
    if "display_name" in body:
        changes["display_name"] = _string("display_name", body["display_name"])
    if "image" in body:
        changes["image"] = validate_image(body["image"], limits)
    if "enabled" in body:
        changes["enabled"] = _boolean("enabled", body["enabled"])
    sections = {
        "engine": validate_engine,
        "capabilities": validate_capabilities,
        "defaults": validate_defaults,
        "metadata": validate_metadata,
    }
    for name, validate in sections.items():
        if name in body:
            merged = {**getattr(entry, name), **validate(body)}
            # An explicit null removes a field.
            raw = body[name] or {}
            changes[name] = {k: v for k, v in merged.items() if raw.get(k, v) is not None}
    capabilities = changes.get("capabilities", entry.capabilities)
    engine = changes.get("engine", entry.engine)
    max_len, context = engine.get("max_model_len"), capabilities.get("context_length")
    if max_len is not None and context is not None and context > max_len:
        raise _refuse(
            "capabilities.context_length",
            f"is {context}, more than engine.max_model_len {max_len}",
        )
    return replace(entry, **changes, updated_at=time.time())


# --- the daemon-owned compose document ------------------------------------------


@dataclass(frozen=True)
class EngineDefaults:
    """What a model added at run time runs with unless it says otherwise."""

    image: str = "vllm/vllm-openai:v0.11.0"
    # "all", a count, or "none" for hosts without the NVIDIA runtime (and for tests).
    gpus: str = "all"
    bind_host: str = "127.0.0.1"


def service_name(model_id: str) -> str:
    return f"{SERVICE_PREFIX}{model_id}"


def engine_flags(engine: Mapping[str, Any]) -> list[str]:
    flags: list[str] = []
    for name in ENGINE_FIELDS:
        value = engine.get(name)
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, f"{value:g}" if _float(value) else str(value)]
    return flags


def _float(value: Any) -> bool:
    return isinstance(value, float)


def render_service(entry: ModelEntry, hub_dir: Path, defaults: EngineDefaults) -> dict[str, Any]:
    """One model as a user would write it in compose; the rewrite then treats it like theirs."""
    # Read-only: a model added through the API must not be able to change other models'
    # weights in the shared cache.
    volumes = [f"{hub_dir}:{HUB_MOUNT}:ro"]
    if entry.path is not None:
        inside = f"{CHECKPOINT_MOUNT}/{entry.id}"
        volumes.append(f"{entry.path}:{inside}:ro")
        model_arg = inside
    else:
        assert entry.repo is not None
        model_arg = entry.repo
    command = [
        "--model",
        model_arg,
        "--served-model-name",
        entry.id,
        "--port",
        str(ENGINE_PORT),
        *engine_flags(entry.engine),
    ]
    # Written with compose.dump_literal: a "$" in the name stays a "$".
    settings: dict[str, Any] = {"display_name": entry.display_name or entry.id}
    if entry.path is not None:
        settings["checkpoint"] = entry.path
    service: dict[str, Any] = {
        "image": entry.image or defaults.image,
        "profiles": [entry.id],
        "command": command,
        "environment": {"HF_HUB_OFFLINE": "1"},
        "volumes": volumes,
        "ports": [f"{defaults.bind_host}::{ENGINE_PORT}"],
        "labels": {ORIGIN_LABEL: "registry"},
        "x-orchestrator": settings,
    }
    if defaults.gpus != "none":
        count: str | int = "all" if defaults.gpus == "all" else int(defaults.gpus)
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [{"driver": "nvidia", "count": count, "capabilities": ["gpu"]}]
                }
            }
        }
    # vLLM shares tensors between its workers through /dev/shm.
    service["ipc"] = "host"
    return service


def render_document(
    entries: Mapping[str, ModelEntry], hub_dir: Path, defaults: EngineDefaults
) -> dict[str, Any]:
    """The compose services of every model added at run time, in order of addition."""
    return {
        "services": {
            service_name(entry.id): render_service(entry, hub_dir, defaults)
            for entry in entries.values()
            if entry.origin == "registry"
        }
    }
