"""A fake Hugging Face Hub on 127.0.0.1 that serves what ``snapshot_download`` asks for.

huggingface_hub 2.4's ``snapshot_download`` makes these calls, and this server answers
exactly them:

- ``GET /api/models/<repo>/revision/<revision>``: the model info; only ``sha`` (the commit
  the revision resolves to) is used, ``siblings`` is there as the Hub sends it;
- ``GET /api/models/<repo>/tree/<commit>?recursive=...``: the file listing, from which the
  files to fetch are taken (``oid``, ``size`` and ``lfs`` as the Hub sends them);
- ``HEAD /<repo>/resolve/<commit>/<file>``: the file's metadata in ``X-Repo-Commit``,
  ``ETag``, ``X-Linked-Etag`` and ``X-Linked-Size`` (these two for LFS files);
- ``GET /<repo>/resolve/<commit>/<file>``: the bytes, honouring ``Range`` with a 206.

Unknown repos, revisions and files get a 404 with the ``X-Error-Code`` the Hub sends, so
huggingface_hub raises its own ``RepositoryNotFoundError`` and the like. No answer carries
an ``X-Xet-Hash`` header or a ``xetHash`` field, which is what makes huggingface_hub use
hf_xet: every file comes over plain HTTP from this server.

The server runs in a thread, so both async tests (whose loop is busy awaiting the download
thread) and a CLI run in a subprocess can reach it. It records every request, and it can
cut a file's download at some byte, closing the connection the way a network drop does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

# Files the Hub keeps in LFS, as the usual .gitattributes of a model repo says.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_INFO = re.compile(rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)")
_TREE = re.compile(rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/.*)?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")
_RANGE = re.compile(r"bytes=(?P<start>\d+)-(?P<end>\d*)")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    range: str | None
    authorization: str | None


@dataclass
class _Cut:
    at: int  # offset in the file where the connection drops, whatever range was asked for
    times: int | None  # downloads still to cut; None cuts every one


def git_blob_id(content: bytes) -> str:
    """The git object id of a file: what the Hub calls its ``oid`` and, outside LFS, its etag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def etag(filename: str, content: bytes) -> str:
    """The etag huggingface_hub names the file's blob after: sha256 in LFS, else the git id."""
    if filename.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return git_blob_id(content)


class FakeHub:
    """Serves ``{repo_id: {commit: {filename: content}}}``.

    A repo's ``main`` is its last commit listed unless ``refs`` says otherwise; a 40-hex
    revision that is one of its commits resolves to itself.
    """

    def __init__(
        self,
        repos: Mapping[str, Mapping[str, Mapping[str, bytes]]],
        refs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.repos = repos
        self.refs = {repo: {"main": list(commits)[-1]} for repo, commits in repos.items()}
        for repo, named in (refs or {}).items():
            self.refs[repo].update(named)
        self.requests: list[Request] = []
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        # A short poll keeps shutdown() from waiting half a second in every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        # Clients keep idle connections open; end them so no handler thread outlives the test.
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # the client may have hung up already
                    connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()

    def cut(self, repo: str, filename: str, *, at: int, times: int | None = 1) -> None:
        """Drop the next ``times`` downloads of a file (all with None) at byte ``at`` of it.

        A download resumed past ``at`` is dropped before its first byte, so with
        ``times=None`` the client makes no more progress and gives up.
        """
        with self._lock:
            self._cuts[(repo, filename)] = _Cut(at, times)

    def heal(self) -> None:
        """Serve every file in full again."""
        with self._lock:
            self._cuts.clear()

    def requests_for(self, filename: str, method: str = "GET") -> list[Request]:
        """The recorded requests for one file's bytes (or, with ``method="HEAD"``, metadata)."""
        with self._lock:
            return [
                request
                for request in self.requests
                if request.method == method
                and "/resolve/" in request.path
                and request.path.endswith("/" + filename)
            ]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, repo: str, filename: str) -> int | None:
        with self._lock:
            cut = self._cuts.get((repo, filename))
            if cut is None:
                return None
            if cut.times is not None:
                cut.times -= 1
                if cut.times <= 0:
                    del self._cuts[(repo, filename)]
            return cut.at

    def _commit(self, repo: str, revision: str) -> str | None:
        if revision in self.repos[repo]:
            return revision
        return self.refs[repo].get(revision)

    def _connection_opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive, as huggingface_hub's client expects of the Hub.
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            hub._connection_opened(self.connection)

        def finish(self) -> None:
            hub._connection_closed(self.connection)
            super().finish()

        def log_message(self, format: str, *args: object) -> None:
            """Stay quiet: the requests are recorded for the tests instead."""

        def do_HEAD(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            path = urlsplit(self.path).path
            hub._record(
                Request(
                    method=self.command,
                    path=unquote(path),
                    range=self.headers.get("Range"),
                    authorization=self.headers.get("Authorization"),
                )
            )
            get = self.command == "GET"
            if match := _RESOLVE.fullmatch(path):
                self._resolve(match)
            elif get and (match := _INFO.fullmatch(path)):
                self._info(match)
            elif get and (match := _TREE.fullmatch(path)):
                self._tree(match)
            else:
                self._reply(404, {"error": f"no such endpoint: {path}"})

        def _files(self, match: re.Match[str]) -> tuple[str, str, Mapping[str, bytes]] | None:
            """The repo, commit and files a URL names; None once a 404 has been sent."""
            repo, revision = unquote(match["repo"]), unquote(match["revision"])
            if repo not in hub.repos:
                self._reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
                return None
            commit = hub._commit(repo, revision)
            if commit is None:
                self._reply(
                    404,
                    {"error": f"Invalid rev id: {revision}"},
                    error_code="RevisionNotFound",
                )
                return None
            return repo, commit, hub.repos[repo][commit]

        def _info(self, match: re.Match[str]) -> None:
            found = self._files(match)
            if found is not None:
                repo, commit, files = found
                siblings = [{"rfilename": name} for name in files]
                self._reply(
                    200, {"id": repo, "sha": commit, "private": False, "siblings": siblings}
                )

        def _tree(self, match: re.Match[str]) -> None:
            found = self._files(match)
            if found is None:
                return
            entries = []
            for name, content in found[2].items():
                entry: dict[str, object] = {
                    "type": "file",
                    "path": name,
                    "size": len(content),
                    "oid": git_blob_id(content),
                }
                if name.endswith(_LFS_SUFFIXES):
                    lfs = {"oid": etag(name, content), "size": len(content), "pointerSize": 134}
                    entry["lfs"] = lfs
                entries.append(entry)
            self._reply(200, entries)

        def _resolve(self, match: re.Match[str]) -> None:
            found = self._files(match)
            if found is None:
                return
            repo, commit, files = found
            filename = unquote(match["filename"])
            content = files.get(filename)
            if content is None:
                self._reply(
                    404,
                    {"error": "Entry not found"},
                    error_code="EntryNotFound",
                    commit=commit,
                )
                return
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            tag = etag(filename, content)
            headers["ETag"] = f'"{tag}"'
            if filename.endswith(_LFS_SUFFIXES):
                headers["X-Linked-Etag"] = f'"{tag}"'
                headers["X-Linked-Size"] = str(len(content))
            status, start, end = 200, 0, len(content)
            requested = self.headers.get("Range")
            get = self.command == "GET"
            if get and requested is not None:
                ranged = _RANGE.fullmatch(requested.strip())
                if ranged is None or int(ranged["start"]) >= len(content):
                    headers["Content-Range"] = f"bytes */{len(content)}"
                    self._send(416, b"", headers)
                    return
                start = int(ranged["start"])
                end = min(int(ranged["end"]) + 1, end) if ranged["end"] else end
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
            payload = content[start:end]
            cut_at = hub._take_cut(repo, filename) if get else None
            if cut_at is None:
                self._send(status, payload, headers)
                return
            # Promise the whole body, send it up to the cut and hang up, as a dropped link does.
            self._send(status, payload[: max(0, cut_at - start)], headers, length=len(payload))
            self.close_connection = True

        def _reply(
            self,
            status: int,
            document: object,
            *,
            error_code: str | None = None,
            commit: str | None = None,
        ) -> None:
            headers = {"Content-Type": "application/json"}
            if error_code is not None:
                headers["X-Error-Code"] = error_code
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            payload = json.dumps(document).encode()
            self._send(status, payload, headers)

        def _send(
            self,
            status: int,
            payload: bytes,
            headers: Mapping[str, str],
            *,
            length: int | None = None,
        ) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

    return Handler
