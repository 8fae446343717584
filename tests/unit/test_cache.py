from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cache import (
    HUB_MOUNT,
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
        """A ref that resolves to a snapshot holding config.json is present, at that snapshot."""
        repo_dir = make_repo(
            tmp_path, refs={"main": MAIN_HASH}, snapshots={MAIN_HASH: ["config.json"]}
        )
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "present"
        assert verdict.repo == "Org/tiny"
        assert verdict.path == (repo_dir / "snapshots" / MAIN_HASH).resolve()

    def test_missing_repo_dir(self, tmp_path: Path) -> None:
        """A repo with no folder is missing, and the reason says where and how to get it."""
        hub = tmp_path.resolve()
        verdict = find_snapshot(hub, "Qwen/Qwen3-4B")
        assert verdict.status == "missing"
        assert verdict.path is None
        assert verdict.reason == (
            f"Qwen/Qwen3-4B is not in the cache: no snapshot with config.json under"
            f" {hub}/models--Qwen--Qwen3-4B"
            f" (run: hf download Qwen/Qwen3-4B --cache-dir {hub})"
        )

    def test_missing_ref(self, tmp_path: Path) -> None:
        """A snapshot that no ref points at does not make the main revision present."""
        make_repo(tmp_path, snapshots={MAIN_HASH: ["config.json"]})
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "missing"
        assert f"{tmp_path.resolve()}/models--Org--tiny" in verdict.reason

    def test_ref_to_missing_snapshot(self, tmp_path: Path) -> None:
        """A ref whose snapshot folder is gone is missing even if another snapshot exists."""
        make_repo(tmp_path, refs={"main": MAIN_HASH}, snapshots={OTHER_HASH: ["config.json"]})
        assert find_snapshot(tmp_path, "Org/tiny").status == "missing"

    def test_snapshot_without_config(self, tmp_path: Path) -> None:
        """A snapshot that lacks config.json cannot be served, so it is missing."""
        make_repo(tmp_path, refs={"main": MAIN_HASH}, snapshots={MAIN_HASH: ["model.safetensors"]})
        verdict = find_snapshot(tmp_path, "Org/tiny")
        assert verdict.status == "missing"
        assert "config.json" in verdict.reason

    def test_other_revision(self, tmp_path: Path) -> None:
        """The revision argument picks its own ref; the hint then names that revision."""
        make_repo(
            tmp_path,
            refs={"main": MAIN_HASH, "v2": OTHER_HASH},
            snapshots={MAIN_HASH: ["config.json"]},
        )
        assert find_snapshot(tmp_path, "Org/tiny", revision="main").status == "present"
        verdict = find_snapshot(tmp_path, "Org/tiny", revision="v2")
        assert verdict.status == "missing"
        assert "--revision v2" in verdict.reason

    def test_revision_given_as_commit(self, tmp_path: Path) -> None:
        """A commit hash needs no ref to resolve."""
        make_repo(tmp_path, snapshots={OTHER_HASH: ["config.json"]})
        assert find_snapshot(tmp_path, "Org/tiny", revision=OTHER_HASH).status == "present"

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


def test_hub_mount_is_where_vllm_looks() -> None:
    """Containers find the hub cache under root's default HF home."""
    assert HUB_MOUNT == "/root/.cache/huggingface/hub"
