"""The Hugging Face hub cache as model containers see it, and whether a model is in it.

vLLM run with HF_HUB_OFFLINE=1 only accepts a repo id for ``--model`` and looks it up in
the hub cache, so the daemon needs to turn cache paths back into repo ids and to check,
before it takes the GPU from the running model, that the weights are really there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
from huggingface_hub.constants import REPO_ID_SEPARATOR, REPO_TYPE_MODEL
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name

# The documented place; the package lists it in a computed __all__ that mypy cannot read.
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

HUB_MOUNT = "/root/.cache/huggingface/hub"

# The file vLLM reads first; a snapshot without it cannot be served.
_MARKER_FILE = "config.json"

# huggingface_hub names a model's cache folder "models--<namespace>--<name>".
_MODEL_FOLDER_PREFIX = f"{REPO_TYPE_MODEL}s{REPO_ID_SEPARATOR}"

# Folders in which a bare "<namespace>--<name>" folder is a model rather than any
# checkpoint that happens to have "--" in its name: the HF home and the hub cache.
_FLAT_CACHE_PARENTS = frozenset({"huggingface", "hub"})

_PATH_PREFIXES = ("/", "./", "../", "~")


def looks_like_path(value: str) -> bool:
    """Whether a model argument is written as a filesystem path rather than a repo id."""
    return value.startswith(_PATH_PREFIXES) or value in {".", ".."}


def is_repo_id(value: str) -> bool:
    """Whether ``value`` is well-formed as a Hub repo id (``name`` or ``namespace/name``)."""
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _repo_id_from_folder_name(folder: str) -> str | None:
    # Neither part of a repo id may contain "--", so the first one is the separator.
    repo_id = "/".join(folder.split(REPO_ID_SEPARATOR, 1))
    return repo_id if is_repo_id(repo_id) else None


def repo_id_from_cache_path(path: str) -> str | None:
    """The repo id a hub-cache path stands for, or None when the path is not in a cache.

    Understands the hub layout (``.../models--Org--Name`` and
    ``.../models--Org--Name/snapshots/<hash>``, host or container side) and the flat
    ``.../huggingface/Org--Name`` folder that a mount of the whole HF home produces.
    """
    parts = PurePosixPath(path).parts
    for index, part in enumerate(parts):
        if part.startswith(_MODEL_FOLDER_PREFIX):
            below = parts[index + 1 :]
            if below and not (len(below) == 2 and below[0] == "snapshots"):
                return None
            return _repo_id_from_folder_name(part.removeprefix(_MODEL_FOLDER_PREFIX))
    if len(parts) >= 2 and parts[-2] in _FLAT_CACHE_PARENTS and REPO_ID_SEPARATOR in parts[-1]:
        return _repo_id_from_folder_name(parts[-1])
    return None


@dataclass(frozen=True)
class SnapshotVerdict:
    repo: str
    status: Literal["present", "missing"]
    path: Path | None  # the snapshot directory when present
    reason: str


def _download_hint(repo: str, hub_dir: Path, revision: str) -> str:
    revision_flag = "" if revision == "main" else f" --revision {revision}"
    return f"run: hf download {repo}{revision_flag} --cache-dir {hub_dir}"


def find_snapshot(hub_dir: Path, repo: str, revision: str = "main") -> SnapshotVerdict:
    """Whether ``revision`` of ``repo`` resolves to a snapshot in ``hub_dir`` that vLLM can load."""
    hub_dir = hub_dir.resolve()
    try:
        repo_dir = hub_dir / repo_folder_name(repo_id=repo, repo_type=REPO_TYPE_MODEL)
        cached = try_to_load_from_cache(repo, _MARKER_FILE, cache_dir=hub_dir, revision=revision)
    except HFValidationError as err:
        return SnapshotVerdict(repo, "missing", None, f"{repo} is not a valid repo id: {err}")
    at_revision = "" if revision == "main" else f" for revision {revision}"
    if cached is _CACHED_NO_EXIST:
        return SnapshotVerdict(
            repo,
            "missing",
            None,
            f"{repo} has no {_MARKER_FILE}{at_revision}: the cache under {repo_dir} records"
            " that the Hub has none, so it is not a model vLLM can serve (check the repo id)",
        )
    if not isinstance(cached, str):
        return SnapshotVerdict(
            repo,
            "missing",
            None,
            f"{repo} is not in the cache: no snapshot{at_revision} with {_MARKER_FILE}"
            f" under {repo_dir} ({_download_hint(repo, hub_dir, revision)})",
        )
    return SnapshotVerdict(repo, "present", Path(cached).parent, f"{repo} is in {repo_dir}")
