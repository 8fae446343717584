"""Readable names for models, above all for fine-tuned checkpoints on disk.

A training job leaves folders such as ``/srv/train/job_42/checkpoint-100``; served
under that path, or a job's UUID, the model is unrecognisable in every client and
dashboard. The rules, from the user's notes: a base model recorded in the checkpoint's
metadata wins, then a repo id, then the folder's name, where ``checkpoint-*`` and
``merged*`` folders give way to their parent and a ``job_*`` parent to the base model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .cache import is_repo_id, looks_like_path

FALLBACK_NAME = "local-model"
_UUID = re.compile(
    r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.IGNORECASE
)
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_.-]+")
# The Compose specification's rule for profile names, and so for model ids. Compose lets
# others through; holding ids to it keeps them usable as served names and in URLs.
MODEL_ID_PATTERN = r"[a-zA-Z0-9][a-zA-Z0-9_.-]+"
MODEL_ID = re.compile(MODEL_ID_PATTERN)

# Where training tools record the model a checkpoint was trained from.
_METADATA_FILES = (
    ("adapter_config.json", "base_model_name_or_path"),
    ("config.json", "_name_or_path"),
)


@dataclass(frozen=True)
class Identity:
    id: str  # usable as a compose profile and a served model name
    display_name: str
    readable_name: str  # what the rules chose; may hold a namespace ("org/name")
    model_path: str | None  # the folder, for a local model


def is_uuid_like(name: str) -> bool:
    return _UUID.fullmatch(name) is not None


def _is_intermediate(name: str) -> bool:
    """Folders named for a training step rather than for the model."""
    return name.startswith("checkpoint-") or name.startswith("merged")


def _recorded_base_model(folder: Path) -> str | None:
    for filename, key in _METADATA_FILES:
        try:
            value = json.loads((folder / filename).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and not looks_like_path(value) and is_repo_id(value):
            return value
    return None


def _base_model(folder: Path, metadata: Mapping[str, Any] | None) -> str | None:
    given = (metadata or {}).get("base_model")
    if isinstance(given, str) and given.strip():
        return given.strip()
    found = _recorded_base_model(folder)
    if found is None and _is_intermediate(folder.name):
        found = _recorded_base_model(folder.parent)
    return found


def _name_from_folders(folder: PurePosixPath) -> str:
    """The folder's own name, walking up past step folders and UUIDs.

    Called only when no base model is known, so a ``job_*`` folder keeps its own name.
    """
    parts = [part for part in folder.parts if part not in {"/", ""}]
    while parts:
        name = parts.pop()
        if not (_is_intermediate(name) or is_uuid_like(name)):
            return name
    return FALLBACK_NAME


def profile_safe(name: str) -> str:
    """A name as a model id: no namespace, only the characters a compose profile takes."""
    last = name.rsplit("/", 1)[-1]
    cleaned = _NOT_IN_ID.sub("-", last)
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned).rstrip("-")[:64]
    return cleaned if MODEL_ID.fullmatch(cleaned) else FALLBACK_NAME


def identify(source: str, *, metadata: Mapping[str, Any] | None = None) -> Identity:
    """The id and names a model is shown and served under, from a repo id or a folder."""
    if not looks_like_path(source):
        return Identity(profile_safe(source), source, source, None)
    folder = Path(source).expanduser().absolute()
    base_model = _base_model(folder, metadata)
    readable = base_model or _name_from_folders(PurePosixPath(folder.as_posix()))
    display = f"{readable} ({folder.name})" if _is_intermediate(folder.name) else readable
    return Identity(profile_safe(readable), display, readable, str(folder))
