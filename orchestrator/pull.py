"""Pulling a model into the hub cache: huggingface_hub downloads, the cache check judges.

``snapshot_download`` does all of the work: it asks the Hub which commit the revision is
and which files it holds, downloads each file into ``blobs/``, links it into
``snapshots/<commit>/``, writes ``refs/<revision>``, and reads ``HF_TOKEN`` and
``HF_ENDPOINT`` itself, so the token never passes through this module. A download that
drops is resumed from where it stopped with a Range request, a few times, before
huggingface_hub gives up. The files that finished stay in the cache, so pulling again
fetches only the rest; the file that was cut starts over, because huggingface_hub 2.x
deletes its partial copy when it gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx2
import structlog
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from .cache import SnapshotVerdict, find_snapshot, is_repo_id
from .errors import BadRequest, OrchestratorError
from .schemas import PullRequest, parse

log = structlog.get_logger(__name__)

PullState = Literal["downloading", "done", "failed"]

# snapshot_download draws three bars with the tqdm_class it is given: this one sums the
# bytes of every file it downloads; one without a name counts files; a third estimates
# network transfer for xet and is of no use here.
_BYTES_BAR = "huggingface_hub.snapshot_download"


@dataclass(frozen=True)
class PullProgress:
    repo: str
    revision: str
    files_total: int  # every file of the snapshot, downloaded or already cached
    files_done: int
    bytes_total: int  # the files this pull downloads; grows as each download starts
    bytes_done: int
    state: PullState
    error: str | None = None  # the failure's message when state is "failed"

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["fraction"] = (
            round(self.bytes_done / self.bytes_total, 4) if self.bytes_total else None
        )
        return body


class PullError(OrchestratorError):
    """The Hub did not give us the snapshot; the message says why and what to do."""

    status = 502
    code = "pull_failed"


class RepoNotOnHub(PullError):
    """The repo or the revision does not exist, or the token may not read it."""

    status = 404
    code = "repo_not_found"


class HubUnreachable(PullError):
    code = "hub_unreachable"


class PullInterrupted(PullError):
    """The connection dropped during a download for longer than huggingface_hub retries."""

    code = "pull_interrupted"


class _Tracker:
    """Sums what the bars report from the download threads and hands it to the caller's loop."""

    def __init__(
        self,
        repo: str,
        revision: str,
        callback: Callable[[PullProgress], None] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._repo = repo
        self._revision = revision
        self._callback = callback
        self._loop = loop
        # snapshot_download runs up to eight downloads at once, each updating from its thread.
        self._lock = threading.Lock()
        self._files_total = self._files_done = self._bytes_total = self._bytes_done = 0

    def update(
        self,
        *,
        files_total: int | None = None,
        files_done: int = 0,
        bytes_total: int | None = None,
        bytes_done: int = 0,
    ) -> None:
        """Record a change; called from the download threads."""
        with self._lock:
            if files_total is not None:
                self._files_total = files_total
            if bytes_total is not None:
                self._bytes_total = bytes_total
            self._files_done += files_done
            self._bytes_done += bytes_done
            progress = self._progress("downloading")
        # RuntimeError: the caller's loop is closed, so nobody is left to tell.
        if self._callback is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._callback, progress)

    def finish(self, state: PullState, error: str | None = None) -> PullProgress:
        """The last report; called on the caller's loop once the download thread has ended."""
        with self._lock:
            progress = self._progress(state, error)
        if self._callback is not None:
            self._callback(progress)
        return progress

    def _progress(self, state: PullState, error: str | None = None) -> PullProgress:
        return PullProgress(
            repo=self._repo,
            revision=self._revision,
            files_total=self._files_total,
            files_done=self._files_done,
            bytes_total=self._bytes_total,
            bytes_done=self._bytes_done,
            state=state,
            error=error,
        )


def _bar_class(tracker: _Tracker) -> type[hf_tqdm]:
    """A tqdm class for snapshot_download that feeds ``tracker`` and draws nothing."""

    class Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = kwargs.get("name")
            self._counts: Literal["bytes", "files"] | None = None
            if name == _BYTES_BAR:
                self._counts = "bytes"
            elif name is None and kwargs.get("unit", "it") == "it":
                self._counts = "files"
            # Progress goes to the callback; a daemon has no terminal to draw on. A disabled
            # bar keeps no counts either, which is why the tracker keeps its own.
            kwargs["disable"] = True
            # huggingface_hub's tqdm takes *args/**kwargs without annotations.
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            if self._counts == "files":
                tracker.update(files_total=int(kwargs.get("total") or 0))

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts == "files":
                tracker.update(files_done=int(n or 0))
            elif self._counts == "bytes":
                tracker.update(bytes_done=int(n or 0))
            result: bool | None = super().update(n)
            return result

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            # snapshot_download grows the byte bar's total as each download starts, then
            # refreshes it: the one sign that the total changed.
            if self._counts == "bytes":
                tracker.update(bytes_total=int(self.total or 0))
            super().refresh(*args, **kwargs)

    return Bar


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _http_failure(err: HfHubHTTPError, repo: str, revision: str, endpoint: str) -> PullError:
    details = {"repo": repo, "revision": revision, "endpoint": endpoint}
    if isinstance(err, GatedRepoError):
        return RepoNotOnHub(
            f"{repo} on {endpoint} is gated: accept its conditions on the Hub, then set"
            " HF_TOKEN to a token of that account and pull again",
            **details,
        )
    if isinstance(err, RepositoryNotFoundError):
        return RepoNotOnHub(
            f"{repo} was not found on {endpoint}: check the repo id; a private repo also"
            " needs HF_TOKEN set to a token that may read it",
            **details,
        )
    if isinstance(err, RevisionNotFoundError):
        return RepoNotOnHub(
            f"{repo} has no revision {revision} on {endpoint}: check the branch, tag or commit",
            **details,
        )
    status = err.response.status_code
    server_said = err.server_message or str(err).splitlines()[0]
    return PullError(
        f"the Hub at {endpoint} answered {status} while pulling {repo}: {server_said}", **details
    )


def _failure(err: Exception, repo: str, revision: str, endpoint: str) -> PullError:
    """Our error for what snapshot_download raised, with what to do about it."""
    details = {"repo": repo, "revision": revision, "endpoint": endpoint}
    if isinstance(err, HfHubHTTPError):
        return _http_failure(err, repo, revision, endpoint)
    if isinstance(err, LocalEntryNotFoundError):
        # snapshot_download raises this when it could not ask the Hub and the cache cannot
        # answer for it; what kept it from asking is the cause.
        cause = err.__cause__
        if isinstance(cause, HfHubHTTPError):
            return _http_failure(cause, repo, revision, endpoint)
        if isinstance(cause, OfflineModeIsEnabled):
            return HubUnreachable(
                f"cannot pull {repo}: HF_HUB_OFFLINE is set for this process; unset it to download",
                **details,
            )
        return HubUnreachable(
            f"cannot reach the Hub at {endpoint} to pull {repo} ({_describe(cause or err)}):"
            " check the network and HF_ENDPOINT; files already downloaded are kept,"
            " pull again to resume",
            **details,
        )
    if isinstance(err, httpx2.ProxyError | httpx2.UnsupportedProtocol):
        # snapshot_download lets these through as they are, before any download starts.
        return HubUnreachable(
            f"cannot reach the Hub at {endpoint} to pull {repo} ({_describe(err)}):"
            " check HF_ENDPOINT and the proxy settings",
            **details,
        )
    if isinstance(err, httpx2.TransportError):
        return PullInterrupted(
            f"the download of {repo} from {endpoint} was interrupted ({_describe(err)}):"
            " the files that finished are kept, pull again to resume",
            **details,
        )
    return PullError(f"pulling {repo} from {endpoint} failed: {_describe(err)}", **details)


async def pull(
    hub_dir: Path,
    repo: str,
    *,
    revision: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    endpoint: str | None = None,
) -> SnapshotVerdict:
    """Download ``repo`` at ``revision`` (the default branch if None) into ``hub_dir``.

    Returns the cache's verdict on the snapshot once the download is over; a repo that
    downloads but lacks what vLLM needs (config.json, weights) comes back not present.
    ``progress`` is called on the caller's event loop, in order: the download threads hand
    their updates over with ``call_soon_threadsafe``, and the last call has state "done"
    or "failed". ``endpoint`` overrides HF_ENDPOINT. Raises a ``PullError`` whose message
    says what went wrong and what to do; ``BadRequest`` for a malformed repo id.

    The download runs in a worker thread that cannot be stopped: cancelling the caller
    leaves it to finish (or fail) on its own.
    """
    if not is_repo_id(repo):
        raise BadRequest(f"{repo!r} is not a valid repo id (namespace/name)", repo=repo)
    if revision is not None:
        # The rule the API holds a pull's body to: a ref name that stays inside refs/.
        parse(PullRequest, {"revision": revision})
    wanted = revision or constants.DEFAULT_REVISION
    hub_endpoint = endpoint or constants.ENDPOINT
    tracker = _Tracker(repo, wanted, progress, asyncio.get_running_loop())
    tqdm_class = _bar_class(tracker)

    def download() -> str:
        return snapshot_download(
            repo_id=repo,
            revision=revision,
            cache_dir=hub_dir,
            endpoint=endpoint,
            tqdm_class=tqdm_class,
        )

    log.info("pull started", repo=repo, revision=wanted, endpoint=hub_endpoint)
    try:
        await asyncio.to_thread(download)
    except (OSError, httpx2.TransportError) as err:
        # huggingface_hub's errors are OSErrors (HTTP, not found, consistency checks), as
        # are the disk's; the transport's come through as they are.
        failure = _failure(err, repo, wanted, hub_endpoint)
        tracker.finish("failed", failure.message)
        # Not logged here: the caller reports it once, as a log line (the daemon's
        # background pulls) or as the command's one error line (the pull command).
        raise failure from err
    verdict = await asyncio.to_thread(find_snapshot, hub_dir, repo, wanted)
    tracker.finish("done")
    log.info("pulled", repo=repo, revision=wanted, commit=verdict.commit, status=verdict.status)
    return verdict
