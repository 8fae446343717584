"""The Hugging Face hub cache as model containers see it, and whether a model is in it.

vLLM run with HF_HUB_OFFLINE=1 only accepts a repo id for ``--model`` and looks it up in
the hub cache, so the daemon needs to turn cache paths back into repo ids and to check,
before it takes the GPU from the running model, that the weights are really there.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
from huggingface_hub.constants import (
    CONFIG_NAME,
    REPO_ID_SEPARATOR,
    REPO_TYPE_MODEL,
    SAFETENSORS_INDEX_FILE,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

# The documented place; the package lists it in a computed __all__ that mypy cannot read.
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

HUB_MOUNT = "/root/.cache/huggingface/hub"

# The file vLLM reads first; a snapshot without it cannot be served.
_MARKER_FILE = CONFIG_NAME

# Any one of these is weights vLLM can load; without an index, one must be there.
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.gguf")

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


VerdictStatus = Literal["present", "incomplete", "missing"]


@dataclass(frozen=True)
class SnapshotVerdict:
    """Whether one revision of a repo can be served from the cache, and if not, why."""

    repo: str
    status: VerdictStatus
    path: Path | None  # the snapshot directory, whenever it exists
    reason: str  # one line for people: where the model is, or what is wrong and what to do
    revision: str = "main"
    commit: str | None = None
    size_bytes: int = 0  # what the snapshot's files take on disk, each blob counted once
    problems: tuple[str, ...] = ()  # every finding; the reason leads with the first


# git check-ref-format's rules for a ref name, which also keep a revision from naming a
# path outside the repo's refs/ folder.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
MAX_REVISION = 255


def revision_problem(revision: str) -> str | None:
    """What keeps ``revision`` from being a commit hash or a git ref name; None if nothing."""
    if REGEX_COMMIT_HASH.fullmatch(revision):
        return None
    if not revision:
        return "is empty"
    if len(revision) > MAX_REVISION:
        return f"is longer than {MAX_REVISION} characters"
    if _REF_FORBIDDEN.search(revision):
        return "holds '..', '//', '@{', a space, a control character or one of ~^:?*[\\"
    if revision.startswith("/") or revision.endswith(("/", ".")) or revision == "@":
        return "starts or ends with '/', ends with '.', or is '@'"
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "has a part that starts with '.' or ends with '.lock'"
    return None


def download_command(repo: str, hub_dir: Path, revision: str = "main") -> str:
    """The shell command that puts ``revision`` of ``repo`` into the hub cache at ``hub_dir``."""
    revision_flag = "" if revision == "main" else f" --revision {revision}"
    return f"hf download {repo}{revision_flag} --cache-dir {hub_dir}"


def _download_hint(repo: str, hub_dir: Path, revision: str) -> str:
    return f"run: {download_command(repo, hub_dir, revision)}"


def _resolve_commit(repo_dir: Path, revision: str) -> str | None:
    """The commit a revision names: itself when it is a hash, else what its ref file holds."""
    if REGEX_COMMIT_HASH.fullmatch(revision):
        return revision
    try:
        return (repo_dir / "refs" / revision).read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class _Contents:
    files: frozenset[str]  # paths, relative to the snapshot, that resolve to a real file
    broken: tuple[str, ...]  # what is wrong with each of the others
    size_bytes: int
    # Every folder looked into, with when it last changed as read before listing it.
    folders: tuple[Stamp, ...]
    truncated: str | None = None  # why the walk stopped early, if it did


# A path and when it last changed (None: it does not exist). A folder's time moves
# whenever an entry in it comes or goes, so equal stamps mean an unchanged listing.
Stamp = tuple[Path, int | None]


def _stamp(path: Path) -> Stamp:
    try:
        return path, path.stat().st_mtime_ns
    except OSError:
        return path, None


# A model folder holds tens of files a level or two deep; a walk that goes further is
# looking at something else (a home directory, /), and stops with a problem instead.
MAX_DEPTH = 4
MAX_ENTRIES = 10_000
MAX_SECONDS = 2.0


def _contents(snapshot: Path) -> _Contents:
    files: set[str] = set()
    broken: list[str] = []
    folders: list[Stamp] = []
    # Snapshots link several names to one blob when files have the same content.
    blob_sizes: dict[tuple[int, int], int] = {}
    deadline = time.monotonic() + MAX_SECONDS
    seen = 0
    to_visit: list[tuple[Path, int]] = [(snapshot, 0)]
    while to_visit:
        folder, depth = to_visit.pop()
        folders.append(_stamp(folder))
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            broken.append(f"{folder} cannot be read: {err.strerror}")
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES or time.monotonic() > deadline:
                why = (
                    f"{snapshot} holds more than {MAX_ENTRIES} entries (or took longer than"
                    f" {MAX_SECONDS:g} s to list): this is not a model folder"
                )
                return _Contents(frozenset(files), tuple(broken), 0, tuple(folders), why)
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH:
                        to_visit.append((path, depth + 1))
                    continue
                info = path.stat()
            except FileNotFoundError:
                broken.append(f"{path} is a dangling symlink: its blob is gone")
                continue
            except OSError as err:
                broken.append(f"{path} cannot be read: {err.strerror}")
                continue
            files.add(path.relative_to(snapshot).as_posix())
            blob_sizes[(info.st_dev, info.st_ino)] = info.st_size
    return _Contents(
        frozenset(files), tuple(sorted(broken)), sum(blob_sizes.values()), tuple(folders)
    )


def _shards(index: Path) -> set[str]:
    """The shard files a safetensors index names in its weight map."""
    weight_map = json.loads(index.read_text())["weight_map"]
    return {str(shard) for shard in weight_map.values()}


def _unfinished_downloads(blobs_dir: Path) -> list[str]:
    """Partial blobs in a repo's ``blobs/`` whose download never finished.

    huggingface_hub writes a blob as ``<etag>[.<id>].incomplete`` and renames it when done
    (2.x deletes it when the download fails), so one that is left means a download is under
    way or its process was killed. Once the blob itself exists, a partial copy is a stray
    from a killed process that a later download replaced: huggingface_hub never looks at it
    again, and it must not keep a complete model from being served.
    """
    try:
        names = {entry.name for entry in os.scandir(blobs_dir)}
    except OSError:
        return []
    return sorted(
        name
        for name in names
        if name.endswith(".incomplete") and name.split(".", 1)[0] not in names
    )


def _folder_problems(snapshot: Path, contents: _Contents) -> list[str]:
    """What keeps a model folder from loading: no config, missing shards, broken links."""
    problems: list[str] = [] if contents.truncated is None else [contents.truncated]
    if _MARKER_FILE not in contents.files:
        problems.append(f"no {_MARKER_FILE} in {snapshot}")
    if SAFETENSORS_INDEX_FILE in contents.files:
        try:
            shards = _shards(snapshot / SAFETENSORS_INDEX_FILE)
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as err:
            problems.append(f"{snapshot / SAFETENSORS_INDEX_FILE} cannot be read: {err!r}")
        else:
            missing = sorted(shards - contents.files)
            if missing:
                problems.append(
                    f"{len(missing)} of {len(shards)} shards named in {SAFETENSORS_INDEX_FILE}"
                    f" are missing from {snapshot}: {', '.join(missing)}"
                )
    elif not any(
        fnmatch(PurePosixPath(name).name, pattern)
        for name in contents.files
        for pattern in _WEIGHT_PATTERNS
    ):
        problems.append(f"no weights file ({', '.join(_WEIGHT_PATTERNS)}) in {snapshot}")
    problems.extend(contents.broken)
    return problems


def _snapshot_problems(repo_dir: Path, snapshot: Path, contents: _Contents) -> list[str]:
    """Everything that keeps an existing snapshot from being loaded; stats only, no hashing."""
    problems = _folder_problems(snapshot, contents)
    problems.extend(
        f"{repo_dir / 'blobs' / name} is left from an unfinished download"
        for name in _unfinished_downloads(repo_dir / "blobs")
    )
    return problems


def find_snapshot(hub_dir: Path, repo: str, revision: str = "main") -> SnapshotVerdict:
    """Whether ``revision`` of ``repo`` resolves to a snapshot that vLLM can load; see below."""
    return _judge_snapshot(hub_dir, repo, revision)[0]


def _judge_snapshot(
    hub_dir: Path, repo: str, revision: str
) -> tuple[SnapshotVerdict, tuple[Stamp, ...]]:
    """Whether ``revision`` of ``repo`` resolves to a snapshot in ``hub_dir`` that vLLM can load.

    ``missing``: no repo folder, no ref for the revision, or no snapshot folder for its
    commit. ``incomplete``: the snapshot exists but lacks config.json or weights, a shard
    its index names, or a blob one of its symlinks points to, or a blob of the repo is
    still being (or was never finished being) downloaded. Only stat calls and the index
    are read, so the check stays fast on a cache of large models. Also returns what the
    verdict was read from (see Verdicts).
    """
    hub_dir = hub_dir.resolve()
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        reason = f"{repo} is not a valid repo id: {err}"
        return SnapshotVerdict(repo, "missing", None, reason, revision), ()
    problem = revision_problem(revision)
    if problem is not None:
        reason = f"revision {revision!r} of {repo} {problem}"
        return SnapshotVerdict(repo, "missing", None, reason, revision), ()
    repo_dir = hub_dir / repo_folder_name(repo_id=repo, repo_type=REPO_TYPE_MODEL)
    places = (hub_dir, repo_dir, repo_dir / "refs", repo_dir / "refs" / revision)
    watched = tuple(_stamp(path) for path in (*places, repo_dir / "snapshots", repo_dir / "blobs"))
    commit = _resolve_commit(repo_dir, revision) if repo_dir.is_dir() else None
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if commit is None or snapshot is None or not snapshot.is_dir():
        return _missing(hub_dir, repo_dir, repo, revision, commit, snapshot), watched
    contents = _contents(snapshot)
    return _judge_contents(hub_dir, repo_dir, repo, revision, commit, contents), (
        *watched,
        *contents.folders,
    )


def _missing(
    hub_dir: Path,
    repo_dir: Path,
    repo: str,
    revision: str,
    commit: str | None,
    snapshot: Path | None,
) -> SnapshotVerdict:
    hint = _download_hint(repo, hub_dir, revision)
    if commit is None or snapshot is None:
        at_revision = "" if revision == "main" else f" for revision {revision}"
        reason = (
            f"{repo} is not in the cache: no snapshot{at_revision} with {_MARKER_FILE}"
            f" under {repo_dir} ({hint})"
        )
        return SnapshotVerdict(repo, "missing", None, reason, revision)
    ref = "" if commit == revision else f"refs/{revision} points to {commit}, but "
    reason = f"{repo} is not in the cache: {ref}{snapshot} does not exist ({hint})"
    return SnapshotVerdict(repo, "missing", None, reason, revision, commit)


def _judge_contents(
    hub_dir: Path, repo_dir: Path, repo: str, revision: str, commit: str, contents: _Contents
) -> SnapshotVerdict:
    """The verdict on a snapshot that exists, from what it holds."""
    snapshot = repo_dir / "snapshots" / commit
    no_config = _MARKER_FILE not in contents.files
    if no_config and _hub_has_no(repo, _MARKER_FILE, hub_dir, commit):
        # Downloading again cannot help: the Hub said it has no such file.
        at_revision = "" if revision == "main" else f" for revision {revision}"
        reason = (
            f"{repo} has no {_MARKER_FILE}{at_revision}: the cache under {repo_dir} records"
            " that the Hub has none, so it is not a model vLLM can serve (check the repo id)"
        )
        return SnapshotVerdict(repo, "missing", None, reason, revision, commit)
    problems = tuple(_snapshot_problems(repo_dir, snapshot, contents))
    if not problems:
        reason = f"{repo} is in {snapshot}"
    else:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        hint = _download_hint(repo, hub_dir, revision)
        reason = (
            f"{repo} is incomplete in the cache: {problems[0]}{more};"
            f" download it again to complete it ({hint})"
        )
    status: VerdictStatus = "incomplete" if problems else "present"
    size = contents.size_bytes
    return SnapshotVerdict(repo, status, snapshot, reason, revision, commit, size, problems)


def _hub_has_no(repo: str, filename: str, hub_dir: Path, commit: str) -> bool:
    """Whether the cache records that the Hub has no such file at that commit."""
    cached = try_to_load_from_cache(repo, filename, cache_dir=hub_dir, revision=commit)
    return cached is _CACHED_NO_EXIST


def verify_local_model(folder: Path) -> SnapshotVerdict:
    """The same verdict for a model folder outside the cache, such as a training checkpoint."""
    return _judge_folder(folder)[0]


def _judge_folder(folder: Path) -> tuple[SnapshotVerdict, tuple[Stamp, ...]]:
    around = (_stamp(folder.parent), _stamp(folder))
    if not folder.is_dir():
        return SnapshotVerdict(
            str(folder),
            "missing",
            None,
            f"{folder} is not a folder on this host: check the path given for the model",
            revision="local",
        ), around
    contents = _contents(folder)
    problems = tuple(_folder_problems(folder, contents))
    if not problems:
        reason = f"{folder} holds a complete model"
    else:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        reason = f"{folder} is not a complete model: {problems[0]}{more}"
    return SnapshotVerdict(
        str(folder),
        "incomplete" if problems else "present",
        folder,
        reason,
        "local",
        None,
        contents.size_bytes,
        problems,
    ), (*around, *contents.folders)


class WeightsSource(Protocol):
    """Where a model's weights come from: a folder on the host, else a Hub repo."""

    @property
    def repo(self) -> str | None: ...
    @property
    def checkpoint(self) -> Path | None: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def tokenizer_revision(self) -> str | None: ...


@dataclass(frozen=True)
class _Judged:
    verdict: SnapshotVerdict
    watched: tuple[Stamp, ...]

    def still_true(self) -> bool:
        return all(_stamp(path) == (path, when) for path, when in self.watched)


class Verdicts:
    """Each model's weights verdict, for the pre-flight, the catalog and the API alike.

    A verdict is kept until one of the folders (or the ref file) it was read from
    changes, so /status and /models cost a few stat calls, not a walk of each model.
    One verdict is worked out at a time per folder: callers asking for the same one
    meanwhile wait for it. Call from a worker thread: it touches the disk.
    """

    def __init__(self, hub_dir: Path) -> None:
        self.hub_dir = hub_dir
        self._judged: dict[tuple[str, ...], _Judged] = {}
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._guard = threading.Lock()

    def of(self, model: WeightsSource) -> SnapshotVerdict | None:
        """The verdict on what a model loads: the first that is not present, else present;
        None when it names neither repo nor folder."""
        verdicts = self.of_model(model)
        return next(
            (v for v in verdicts if v.status != "present"), verdicts[0] if verdicts else None
        )

    def of_model(self, model: WeightsSource) -> list[SnapshotVerdict]:
        """A verdict for each thing the engine loads: the folder, or the repo's weights
        revision and, when it is another one, its tokenizer revision."""
        if model.checkpoint is not None:
            return [self.of_folder(model.checkpoint)]
        if model.repo is None:
            return []
        revisions = dict.fromkeys([model.revision or "main", model.tokenizer_revision or "main"])
        return [self.of_repo(model.repo, revision) for revision in revisions]

    def of_repo(self, repo: str, revision: str = "main") -> SnapshotVerdict:
        return self._judge(
            ("hub", repo, revision), lambda: _judge_snapshot(self.hub_dir, repo, revision)
        )

    def of_folder(self, folder: Path) -> SnapshotVerdict:
        return self._judge(("folder", str(folder)), lambda: _judge_folder(folder))

    def _judge(
        self,
        key: tuple[str, ...],
        judge: Callable[[], tuple[SnapshotVerdict, tuple[Stamp, ...]]],
    ) -> SnapshotVerdict:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            known = self._judged.get(key)
            if known is not None and known.still_true():
                return known.verdict
            verdict, watched = judge()
            self._judged[key] = _Judged(verdict, watched)
            return verdict
