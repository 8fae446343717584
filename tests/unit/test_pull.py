"""Pulling models from a fake Hub on 127.0.0.1 (tests/hubserver.py) with huggingface_hub itself.

huggingface_hub reads HF_ENDPOINT once, when it is imported, so setting the variable here
would come too late: the tests pass ``endpoint=`` to ``pull``, which hands it to
``snapshot_download``. The CLI test runs a fresh process and sets HF_ENDPOINT there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants, file_download

from orchestrator.cache import find_snapshot
from orchestrator.errors import BadRequest
from orchestrator.pull import (
    HubUnreachable,
    PullInterrupted,
    PullProgress,
    RepoNotOnHub,
    pull,
)
from orchestrator.registry import ModelEntry
from orchestrator.store import Store
from tests.hubserver import FakeHub, etag

REPO = "org/tiny"
COMMIT = "4f3c2b1a09876543210fedcba9876543210fedcb"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
TOKEN = "hf_TestTokenThatMustNeverShowUp0123456789"
CHUNK = 4096


def _bytes(seed: str, size: int) -> bytes:
    """Deterministic content that differs from byte to byte, so a misplaced range shows."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{counter}".encode()).digest()
        counter += 1
    return out[:size]


def model_files() -> dict[str, bytes]:
    """A config, an index and the two shards it names."""
    index = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}}
    return {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        SHARDS[0]: _bytes("first", 12_000),
        SHARDS[1]: _bytes("second", 20_000),
    }


TOTAL = sum(len(content) for content in model_files().values())


@pytest.fixture(autouse=True)
def hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub set up for quick, isolated tests."""
    # Reads of 4 KiB give several progress updates per shard, and make a cut land
    # between two reads, so where the resumed range starts is known.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    # http_get sleeps 1 s before each resume attempt (five before it gives up); `time`
    # serves nothing else in that module.
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda _seconds: None))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub({REPO: {COMMIT: model_files()}}) as server:
        yield server


def resolve_gets(hub: FakeHub) -> list[str]:
    """The files whose bytes were asked for, in order."""
    return [
        r.path.rsplit("/", 1)[-1]
        for r in hub.requests
        if r.method == "GET" and "/resolve/" in r.path
    ]


async def test_pull_lays_out_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    """Every file lands in blobs/, linked from snapshots/<commit>/, with refs/main: present."""
    verdict = await pull(tmp_path, REPO, endpoint=hub.url)
    assert verdict.status == "present", verdict.reason
    assert (verdict.revision, verdict.commit) == ("main", COMMIT)
    assert verdict.size_bytes == TOTAL
    repo_dir = tmp_path / "models--org--tiny"
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    snapshot = repo_dir / "snapshots" / COMMIT
    assert verdict.path == snapshot.resolve()
    for name, content in model_files().items():
        assert (snapshot / name).is_symlink()
        assert (snapshot / name).resolve() == (repo_dir / "blobs" / etag(name, content)).resolve()
        assert (snapshot / name).read_bytes() == content


async def test_pull_uses_only_the_plain_hub_endpoints(hub: FakeHub, tmp_path: Path) -> None:
    """Model info, tree, then HEAD and GET per file: nothing asks for xet."""
    await pull(tmp_path, REPO, endpoint=hub.url)
    resolve = f"/{REPO}/resolve/{COMMIT}/"
    assert {(r.method, r.path) for r in hub.requests} == {
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/{COMMIT}"),
        *((method, resolve + name) for name in model_files() for method in ("HEAD", "GET")),
    }


async def test_progress_reaches_the_totals_on_the_loop_thread(hub: FakeHub, tmp_path: Path) -> None:
    """Updates arrive in order on the caller's thread and end "done" with bytes_done == total."""
    events: list[PullProgress] = []
    threads: set[int] = set()

    def record(progress: PullProgress) -> None:
        events.append(progress)
        threads.add(threading.get_ident())

    await pull(tmp_path, REPO, endpoint=hub.url, progress=record)
    assert threads == {threading.get_ident()}
    assert [e.state for e in events] == ["downloading"] * (len(events) - 1) + ["done"]
    done = [e.bytes_done for e in events]
    assert done == sorted(done)
    # One update per read of each file, not only one per file.
    reads = sum(-(-len(content) // CHUNK) for content in model_files().values())
    assert len(set(done) - {0}) == reads
    last = events[-1]
    assert (last.repo, last.revision, last.error) == (REPO, "main", None)
    assert last.files_done == last.files_total == len(model_files())
    assert last.bytes_done == last.bytes_total == TOTAL


async def test_dropped_connection_resumes_with_a_range(hub: FakeHub, tmp_path: Path) -> None:
    """A download cut once is resumed from the bytes already written, not from 0."""
    hub.cut(REPO, SHARDS[1], at=CHUNK + 1000)
    events: list[PullProgress] = []
    verdict = await pull(tmp_path, REPO, endpoint=hub.url, progress=events.append)
    assert verdict.status == "present"
    assert [r.range for r in hub.requests_for(SHARDS[1])] == [None, f"bytes={CHUNK}-"]
    assert verdict.path is not None
    assert (verdict.path / SHARDS[1]).read_bytes() == model_files()[SHARDS[1]]
    assert events[-1].bytes_done == events[-1].bytes_total == TOTAL


async def test_interrupted_pull_fails_and_the_next_one_finishes(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A link that stays down fails the pull; pulling again fetches only what is missing."""
    hub.cut(REPO, SHARDS[1], at=CHUNK + 1000, times=None)
    events: list[PullProgress] = []
    with pytest.raises(PullInterrupted) as caught:
        await pull(tmp_path, REPO, endpoint=hub.url, progress=events.append)
    message = caught.value.message
    assert f"the download of {REPO} from {hub.url} was interrupted" in message
    assert "pull again to resume" in message
    assert (events[-1].state, events[-1].error) == ("failed", message)

    verdict = find_snapshot(tmp_path, REPO)
    assert verdict.status == "incomplete"
    assert f"missing from {verdict.path}: {SHARDS[1]}" in verdict.reason
    # huggingface_hub 2.x deletes a partial file when it gives up, so that one file will
    # start over; the files that finished are kept.
    assert not list((tmp_path / "models--org--tiny" / "blobs").glob("*.incomplete"))

    hub.heal()
    hub.requests.clear()
    verdict = await pull(tmp_path, REPO, endpoint=hub.url)
    assert verdict.status == "present"
    assert resolve_gets(hub) == [SHARDS[1]]


async def test_partial_blob_of_a_killed_pull_does_not_block(hub: FakeHub, tmp_path: Path) -> None:
    """A partial blob left by a killed process stays behind, but the completed model is present."""
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    stray = blobs / f"{etag(SHARDS[1], model_files()[SHARDS[1]])}.0badcafe.incomplete"
    stray.write_bytes(b"x" * 100)
    assert find_snapshot(tmp_path, REPO).status == "missing"
    verdict = await pull(tmp_path, REPO, endpoint=hub.url)
    assert stray.exists()
    assert verdict.status == "present", verdict.reason


async def test_unknown_repo(hub: FakeHub, tmp_path: Path) -> None:
    """A repo the Hub does not have is a clean 404-style error naming repo and endpoint."""
    events: list[PullProgress] = []
    with pytest.raises(RepoNotOnHub) as caught:
        await pull(tmp_path, "org/nope", endpoint=hub.url, progress=events.append)
    assert caught.value.status == 404
    assert caught.value.message.startswith(
        f"org/nope was not found on {hub.url}: check the repo id"
    )
    assert events[-1].state == "failed"


async def test_unknown_revision(hub: FakeHub, tmp_path: Path) -> None:
    """A revision the repo does not have is named in the error."""
    with pytest.raises(RepoNotOnHub, match=f"{REPO} has no revision v9 on "):
        await pull(tmp_path, REPO, revision="v9", endpoint=hub.url)


async def test_hub_unreachable(tmp_path: Path) -> None:
    """Connection refused names the endpoint that could not be reached."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
    with pytest.raises(HubUnreachable, match=f"cannot reach the Hub at {endpoint} to pull {REPO}"):
        await pull(tmp_path, REPO, endpoint=endpoint)


async def test_invalid_repo_id(tmp_path: Path) -> None:
    """A malformed repo id is refused before any request."""
    with pytest.raises(BadRequest, match="not a valid repo id"):
        await pull(tmp_path, "not/a/repo", endpoint="http://127.0.0.1:9")


async def test_token_is_sent_but_never_shown(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN reaches the Hub as Authorization, and no progress report or error holds it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    events: list[PullProgress] = []
    await pull(tmp_path, REPO, endpoint=hub.url, progress=events.append)
    with pytest.raises(RepoNotOnHub) as caught:
        await pull(tmp_path, "org/nope", endpoint=hub.url, progress=events.append)
    assert hub.requests
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    shown = [
        repr(events),
        str(caught.value),
        repr(caught.value),
        json.dumps(caught.value.to_body()),
    ]
    assert not [text for text in shown if TOKEN in text]


def test_cli_pulls_a_model_of_the_compose_file(hub: FakeHub, tmp_path: Path) -> None:
    """`pull <model id>` looks the repo up in compose, reads HF_ENDPOINT, prints, exits 0."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  engine:\n"
        "    image: vllm/vllm-openai\n"
        "    profiles: [tiny-model]\n"
        f"    command: [--model, {REPO}]\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "-m", "orchestrator.cli", "pull", "tiny-model"]
    flags = ["--compose", str(compose), "--models-dir", str(tmp_path / "models")]
    done = subprocess.run(command + flags, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"pulling {REPO} into {tmp_path / 'models' / 'hub'}"
    # Not a terminal: a line as the pull starts and one per finished file, no bar.
    assert [line.split(" files,")[0] for line in lines[1:-1]] == [f"{n}/4" for n in range(5)]
    assert lines[-2] == "4/4 files, 32.1 kB of 32.1 kB"
    assert lines[-1].startswith(f"present: {tmp_path / 'models' / 'hub'}/models--org--tiny/")

    missing = subprocess.run(
        [*command[:-1], "org/nope", *flags], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert "not found" not in missing.stdout
    assert missing.stderr.startswith(
        f"model-orchestrator: error: org/nope was not found on {hub.url}"
    )


async def test_cli_pulls_a_model_added_to_the_registry(hub: FakeHub, tmp_path: Path) -> None:
    """`pull <id>` of a model added at run time finds its repo in the daemon's database."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  other:\n    image: x\n")
    store = await Store.open(tmp_path / "state" / "orchestrator.db")
    for entry in (
        ModelEntry(id="added", origin="registry", repo=REPO),
        ModelEntry(id="local", origin="registry", path="/srv/train/run"),
    ):
        await store.save_model_entry(
            entry.id, entry.origin, entry.to_json(), entry.created_at, entry.updated_at
        )
    await store.close()
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    env.pop("HF_TOKEN", None)
    flags = ["--compose", str(compose), "--models-dir", str(tmp_path / "models")]
    flags += ["--state-dir", str(tmp_path / "state")]

    def run(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "pull", target, *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = await asyncio.to_thread(run, "added")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith(f"pulling {REPO} into")
    refused = await asyncio.to_thread(run, "local")
    assert refused.returncode == 1
    assert "loads /srv/train/run, not a Hub repo" in refused.stderr
