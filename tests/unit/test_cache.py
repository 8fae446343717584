from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from orchestrator.cache import (
    find_snapshot,
    is_repo_id,
    looks_like_path,
    repo_id_from_cache_path,
)

MAIN_HASH = "0123456789abcdef0123456789abcdef01234567"
OTHER_HASH = "fedcba9876543210fedcba9876543210fedcba98"


def make_repo(
    hub: Path,
    folder: str = "models--Org--tiny",
    refs: dict[str, str] | None = None,
    snapshots: dict[str, list[str]] | None = None,
) -> Path:
    """Lay out one repo of a hub cache the way huggingface_hub writes it."""
    repo_dir = hub / folder
    repo_dir.mkdir(parents=True)
    for ref, commit in (refs or {}).items():
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    for commit, files in (snapshots or {}).items():
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in files:
            (snapshot / name).write_text("{}")
    return repo_dir


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def sharded_model() -> dict[str, bytes]:
    """A config, a safetensors index and the two shards it names, with distinct sizes."""
    index = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}}
    return {
        "config.json": b'{"model_type": "tiny"}',
        INDEX: json.dumps(index).encode(),
        SHARDS[0]: b"a" * 3000,
        SHARDS[1]: b"b" * 5000,
    }


def lay_out(
    hub: Path,
    files: dict[str, bytes],
    *,
    commit: str = MAIN_HASH,
    ref: str | None = "main",
    folder: str = "models--Org--tiny",
) -> Path:
    """Write a snapshot as huggingface_hub does: blobs named by hash, relative symlinks to them."""
    repo_dir = hub / folder
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    for name, content in files.items():
        blob = blobs / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def blob_of(snapshot: Path, name: str) -> Path:
    """The blob a snapshot file links to."""
    return (snapshot / name).parent / os.readlink(snapshot / name)


class TestRepoIdFromCachePath:
    @pytest.mark.parametrize(
        ("path", "repo"),
        [
            (
                "/root/.cache/huggingface/Qwen--Qwen3-4B-Instruct-2507",
                "Qwen/Qwen3-4B-Instruct-2507",
            ),
            (
                "/root/.cache/huggingface/hub/models--Qwen--Qwen3-4B-Instruct-2507",
                "Qwen/Qwen3-4B-Instruct-2507",
            ),
            (
                f"/root/.cache/huggingface/hub/models--Qwen--Qwen3-4B-Instruct-2507/snapshots/{MAIN_HASH}",
                "Qwen/Qwen3-4B-Instruct-2507",
            ),
            (
                f"/root/.cache/huggingface/hub/models--Qwen--Qwen3-4B-Instruct-2507/snapshots/{MAIN_HASH}/",
                "Qwen/Qwen3-4B-Instruct-2507",
            ),
            ("/root/.cache/huggingface/hub/models--Qwen--Qwen3-4B/", "Qwen/Qwen3-4B"),
            ("/root/.cache/huggingface/hub/models--gpt2", "gpt2"),
            ("models--gpt2", "gpt2"),
            ("./models/hub/models--X--Y/snapshots/abc", "X/Y"),
            ("/srv/anything/models--meta-llama--Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
            ("/root/.cache/huggingface/hub/Org--name", "Org/name"),
        ],
    )
    def test_cache_paths_become_repo_ids(self, path: str, repo: str) -> None:
        """Every layout a cache path can take maps back to the repo id it stores."""
        assert repo_id_from_cache_path(path) == repo

    @pytest.mark.parametrize(
        "path",
        [
            "/data/checkpoints/run1",
            "/data/checkpoints/my--finetune",
            "Qwen/Qwen3-4B",
            "/root/.cache/huggingface/hub",
            "/root/.cache/huggingface/hub/models--Org--tiny/snapshots",
            f"/root/.cache/huggingface/hub/models--Org--tiny/snapshots/{MAIN_HASH}/config.json",
            "/root/.cache/huggingface/hub/models--Org--tiny/blobs/abc",
            "/root/.cache/huggingface/hub/datasets--Org--data",
            "/root/.cache/huggingface/hub/models--Org--bad--name",
            "/root/.cache/huggingface/hub/models--",
            "/root/.cache/huggingface/hub/models--Org--.hidden",
        ],
    )
    def test_other_paths_are_not_repo_ids(self, path: str) -> None:
        """Checkpoints, non-model caches, paths inside a repo and malformed names give None."""
        assert repo_id_from_cache_path(path) is None


class TestLooksLikePath:
    @pytest.mark.parametrize("value", ["/data/run1", "./run1", "../run1", "~/run1", "."])
    def test_paths(self, value: str) -> None:
        """Absolute, relative and home-relative spellings count as paths."""
        assert looks_like_path(value)

    @pytest.mark.parametrize("value", ["Qwen/Qwen3-4B", "gpt2", "models--gpt2", "-x"])
    def test_repo_ids_and_others(self, value: str) -> None:
        """Repo ids and bare names are not paths."""
        assert not looks_like_path(value)


class TestIsRepoId:
    @pytest.mark.parametrize("value", ["gpt2", "Qwen/Qwen3-4B", "meta-llama/Llama-3.1-8B"])
    def test_valid(self, value: str) -> None:
        """Names with and without a namespace are repo ids."""
        assert is_repo_id(value)

    @pytest.mark.parametrize("value", ["a/b/c", "/abs/path", "org--x/y", "x.git", ""])
    def test_invalid(self, value: str) -> None:
        """What huggingface_hub rejects is not a repo id."""
        assert not is_repo_id(value)


class TestFindSnapshot:
    def test_present(self, tmp_path: Path) -> None:
        """A ref that resolves to a snapshot with config.json and weights is present, there."""
        repo_dir = make_repo(
            tmp_path,
            refs={"main": MAIN_HASH},
            snapshots={MAIN_HASH: ["config.json", "model.safetensors"]},
        )
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "present"
        assert verdict.repo == "Org/tiny"
        assert verdict.path == (repo_dir / "snapshots" / MAIN_HASH).resolve()

    def test_complete_sharded_snapshot(self, tmp_path: Path) -> None:
        """Index and both shards linked into blobs/: present, with commit, size and no problems."""
        snapshot = lay_out(tmp_path, sharded_model())
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "present"
        assert verdict.reason == f"Org/tiny is in {snapshot.resolve()}"
        assert verdict.path == snapshot.resolve()
        assert (verdict.revision, verdict.commit) == ("main", MAIN_HASH)
        assert verdict.problems == ()
        assert verdict.size_bytes == sum(len(content) for content in sharded_model().values())

    def test_size_counts_each_blob_once(self, tmp_path: Path) -> None:
        """Two names linked to one blob take its size once: that is what the disk holds."""
        files = sharded_model()
        files["copy-of-config.json"] = files["config.json"]
        lay_out(tmp_path, files)
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.size_bytes == sum(len(content) for content in sharded_model().values())

    def test_missing_repo_dir(self, tmp_path: Path) -> None:
        """A repo with no folder is missing, and the reason says where and how to get it."""
        hub = tmp_path.resolve()
        verdict = find_snapshot(hub, "Qwen/Qwen3-4B")
        assert verdict.status == "missing"
        assert verdict.path is None
        assert verdict.commit is None
        assert verdict.reason == (
            f"Qwen/Qwen3-4B is not in the cache: no snapshot with config.json under"
            f" {hub}/models--Qwen--Qwen3-4B"
            f" (run: hf download Qwen/Qwen3-4B --cache-dir {hub})"
        )

    def test_missing_ref(self, tmp_path: Path) -> None:
        """A snapshot that no ref points at does not make the main revision present."""
        lay_out(tmp_path, sharded_model(), ref=None)
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "missing"
        assert f"{tmp_path.resolve()}/models--Org--tiny" in verdict.reason

    def test_ref_to_missing_snapshot(self, tmp_path: Path) -> None:
        """A ref whose snapshot folder is gone is missing even if another snapshot exists."""
        repo_dir = make_repo(
            tmp_path,
            refs={"main": MAIN_HASH},
            snapshots={OTHER_HASH: ["config.json", "model.safetensors"]},
        )
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "missing"
        assert verdict.commit == MAIN_HASH
        assert (
            f"refs/main points to {MAIN_HASH}, but {repo_dir.resolve()}/snapshots/{MAIN_HASH}"
            " does not exist" in verdict.reason
        )

    def test_missing_shard(self, tmp_path: Path) -> None:
        """A shard the index names but the snapshot lacks makes it incomplete, named by path."""
        snapshot = lay_out(tmp_path, sharded_model())
        (snapshot / SHARDS[1]).unlink()
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert verdict.path == snapshot.resolve()
        assert verdict.reason.startswith("Org/tiny is incomplete in the cache: 1 of 2 shards")
        assert f"missing from {snapshot.resolve()}: {SHARDS[1]}" in verdict.reason
        assert "hf download Org/tiny" in verdict.reason

    def test_dangling_symlink(self, tmp_path: Path) -> None:
        """A snapshot file whose blob is gone is reported by path, as a dangling symlink."""
        snapshot = lay_out(tmp_path, {**sharded_model(), "tokenizer.json": b"{}"})
        blob_of(snapshot, "tokenizer.json").unlink()
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert verdict.problems == (
            f"{snapshot.resolve()}/tokenizer.json is a dangling symlink: its blob is gone",
        )

    def test_dangling_shard_reports_every_problem(self, tmp_path: Path) -> None:
        """A shard whose blob is gone is both a missing shard and a dangling link."""
        snapshot = lay_out(tmp_path, sharded_model())
        blob_of(snapshot, SHARDS[0]).unlink()
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert len(verdict.problems) == 2
        assert SHARDS[0] in verdict.problems[0]
        assert "dangling symlink" in verdict.problems[1]
        assert "(and 1 more)" in verdict.reason

    def test_unfinished_download(self, tmp_path: Path) -> None:
        """A partial blob left in blobs/ means a download did not finish."""
        snapshot = lay_out(tmp_path, sharded_model())
        partial = snapshot.parents[1] / "blobs" / f"{'c' * 64}.1a2b3c4d.incomplete"
        partial.write_bytes(b"c" * 100)
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert verdict.problems == (f"{partial.resolve()} is left from an unfinished download",)

    def test_stray_partial_of_a_finished_blob(self, tmp_path: Path) -> None:
        """A partial copy of a blob that is complete is a killed download's stray, not a gap."""
        snapshot = lay_out(tmp_path, sharded_model())
        blob = blob_of(snapshot, SHARDS[1])
        blob.with_name(f"{blob.name}.1a2b3c4d.incomplete").write_bytes(b"b" * 100)
        assert find_snapshot(tmp_path, "Org/tiny").status == "present"

    def test_snapshot_without_config(self, tmp_path: Path) -> None:
        """A snapshot that lacks config.json cannot be served: incomplete, naming the file."""
        files = sharded_model()
        del files["config.json"]
        lay_out(tmp_path, files)
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert "no config.json in" in verdict.reason

    def test_snapshot_without_weights(self, tmp_path: Path) -> None:
        """config.json alone, with neither index nor weights file, is incomplete."""
        snapshot = lay_out(tmp_path, {"config.json": b"{}", "tokenizer.json": b"{}"})
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert verdict.problems == (
            "no weights file (*.safetensors, pytorch_model*.bin, *.pt, *.gguf)"
            f" in {snapshot.resolve()}",
        )

    @pytest.mark.parametrize(
        "weights",
        [
            "model.safetensors",
            "pytorch_model.bin",
            "pytorch_model-00001-of-00002.bin",
            "consolidated.pt",
            "gguf/model-Q4_K_M.gguf",
        ],
    )
    def test_any_weights_file_counts(self, tmp_path: Path, weights: str) -> None:
        """Without an index, one file in any of the weight formats is enough."""
        lay_out(tmp_path, {"config.json": b"{}", weights: b"w" * 10})
        assert find_snapshot(tmp_path, "Org/tiny").status == "present"

    def test_unreadable_index(self, tmp_path: Path) -> None:
        """An index that is not JSON with a weight map cannot vouch for the shards."""
        files = sharded_model()
        files[INDEX] = b"{not json"
        lay_out(tmp_path, files)
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "incomplete"
        assert f"{INDEX} cannot be read" in verdict.reason

    def test_other_revision(self, tmp_path: Path) -> None:
        """The revision argument picks its own ref; the hint then names that revision."""
        make_repo(
            tmp_path,
            refs={"main": MAIN_HASH, "v2": OTHER_HASH},
            snapshots={MAIN_HASH: ["config.json", "model.safetensors"]},
        )
        assert find_snapshot(tmp_path, "Org/tiny", revision="main").status == "present"
        verdict = find_snapshot(tmp_path, "Org/tiny", revision="v2")
        assert verdict.status == "missing"
        assert verdict.revision == "v2"
        assert "--revision v2" in verdict.reason

    def test_revision_given_as_commit(self, tmp_path: Path) -> None:
        """A commit hash needs no ref to resolve: snapshots/<hash> is looked up directly."""
        lay_out(tmp_path, sharded_model(), commit=OTHER_HASH, ref=None)
        verdict = find_snapshot(tmp_path, "Org/tiny", revision=OTHER_HASH)
        assert verdict.status == "present"
        assert verdict.commit == OTHER_HASH
        assert find_snapshot(tmp_path, "Org/tiny", revision=MAIN_HASH).status == "missing"

    def test_recorded_as_absent_on_the_hub(self, tmp_path: Path) -> None:
        """A config.json the cache records as absent upstream gets its own reason."""
        repo_dir = make_repo(tmp_path, refs={"main": MAIN_HASH}, snapshots={MAIN_HASH: []})
        (repo_dir / ".no_exist" / MAIN_HASH).mkdir(parents=True)
        (repo_dir / ".no_exist" / MAIN_HASH / "config.json").write_text("")
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "missing"
        assert "check the repo id" in verdict.reason

    def test_invalid_repo_id(self, tmp_path: Path) -> None:
        """A malformed repo id is reported as missing instead of raising."""
        verdict = find_snapshot(tmp_path, "not/a/repo")
        assert verdict.status == "missing"
        assert "not a valid repo id" in verdict.reason

    def test_relative_hub_dir_is_reported_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The reason names an absolute path, usable from any directory."""
        monkeypatch.chdir(tmp_path)
        verdict = find_snapshot(Path("models/hub"), "Org/tiny")
        assert f"{tmp_path.resolve()}/models/hub/models--Org--tiny" in verdict.reason
