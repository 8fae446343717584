"""The model registry: what each model is called, what it can do, and models added at run time.

Models come from two places. The user's compose file declares some; their lifecycle
settings stay in that file, and the registry only keeps what the user changed about
them through the API (enabled, display name, capabilities, sampling defaults). The
others are added through the API: each becomes a profile in a compose document that
the daemon renders from the registry, merged into its normalized copy and run
exactly like a hand-written profile.

Bodies are validated by ``schemas``; what depends on the user's settings (the images
a model may run, the folders it may mount) is checked here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from .cache import HUB_MOUNT
from .schemas import EngineSettings, ModelSettings, check_merged, refusal

Origin = Literal["compose", "registry"]

# The container folder a local checkpoint is mounted at, read-only, below which each
# model gets its own folder.
CHECKPOINT_MOUNT = "/models"
ENGINE_PORT = 8000
SERVICE_PREFIX = "model-"
ORIGIN_LABEL = "io.model-orchestrator.origin"

# The sections of settings that changes merge into field by field.
SECTIONS = ("engine", "capabilities", "defaults", "metadata")
# What the API lets a user change on a model declared in compose: the rest is the file's.
COMPOSE_EDITABLE = frozenset({"display_name", "capabilities", "defaults", "enabled"})


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


# --- what the settings allow, and changes -------------------------------------------


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


def check_image(image: str, limits: RegistryLimits) -> None:
    """Refuse an image (well-formed, as ``schemas.Image`` reads it) outside allowed_images."""
    if not any(fnmatchcase(image, pattern) for pattern in limits.allowed_images):
        raise refusal(
            "image",
            f"{image!r} is not allowed: models added through the API may run only images"
            f" matching allowed_images ({', '.join(limits.allowed_images) or 'none'});"
            " add a pattern to that setting to allow more",
        )


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve_path(path: str, limits: RegistryLimits) -> str:
    """A model folder (well-formed, as ``schemas.FolderPath`` reads it), symlinks resolved;
    refused unless it lies inside a checkpoint root."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError as err:  # no home directory to expand "~" to
        raise refusal("path", f"cannot be expanded: {err}") from err
    # Symlinks followed: a link inside a root that points elsewhere is elsewhere.
    resolved = Path(os.path.realpath(expanded))
    roots = tuple(Path(os.path.realpath(root)) for root in limits.checkpoint_roots)
    if not _inside(resolved, roots):
        shown = f" (resolves to {resolved})" if resolved != expanded else ""
        raise refusal(
            "path",
            f"{path!r}{shown} is outside checkpoint_roots"
            f" ({', '.join(str(root) for root in roots) or 'none'}): move the checkpoint"
            " there, or add its folder to that setting",
        )
    if any(ch in str(resolved) for ch in ":,$"):
        raise refusal("path", f"resolves to {resolved}, which compose cannot mount")
    return str(resolved)


def apply_changes(entry: ModelEntry, changes: ModelSettings, limits: RegistryLimits) -> ModelEntry:
    """The entry with the changes applied; sections merge field by field."""
    given = changes.model_dump(include=set(ModelSettings.model_fields), exclude_unset=True)
    if "image" in given:
        check_image(given["image"], limits)
    for name in SECTIONS:
        if name in given:
            # A null section changes nothing; a null value in one removes that setting.
            merged = {**getattr(entry, name), **(given[name] or {})}
            given[name] = {key: value for key, value in merged.items() if value is not None}
    changed = replace(entry, **given, updated_at=time.time())
    check_merged(changed.engine, changed.capabilities)
    return changed


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
    # The flag is the field's name in vLLM's spelling.
    for name in EngineSettings.model_fields:
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
