"""Readable ids and names for models, following the user's rules for checkpoints (seed 000)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.naming import FALLBACK_NAME, identify, is_uuid_like, profile_safe

UUID = "3f2a9c1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b"


def folder(root: Path, *parts: str, **files: dict[str, object]) -> Path:
    made = root.joinpath(*parts)
    made.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (made / f"{name}.json").write_text(json.dumps(content))
    return made


class TestBaseModel:
    def test_metadata_base_model_wins(self, tmp_path: Path) -> None:
        """A base model given with the request beats every name on disk."""
        path = folder(tmp_path, "sft", "checkpoint-100", config={"_name_or_path": "org/Other"})
        identity = identify(str(path), metadata={"base_model": "meta-llama/Llama-3.2-3B"})
        assert identity.readable_name == "meta-llama/Llama-3.2-3B"
        assert identity.id == "Llama-3.2-3B"

    def test_adapter_config_base_model(self, tmp_path: Path) -> None:
        """A LoRA adapter's recorded base model names it."""
        path = folder(tmp_path, "lora", adapter_config={"base_model_name_or_path": "Qwen/Qwen3-4B"})
        assert identify(str(path)).readable_name == "Qwen/Qwen3-4B"

    def test_config_name_that_is_a_path_is_ignored(self, tmp_path: Path) -> None:
        """A `_name_or_path` that is a path says nothing readable; the folder name is used."""
        path = folder(tmp_path, "my-sft", config={"_name_or_path": "/data/models/base"})
        assert identify(str(path)).readable_name == "my-sft"

    def test_parent_of_a_checkpoint_is_searched(self, tmp_path: Path) -> None:
        """Training jobs record the base model next to their checkpoints, not in them."""
        job = folder(tmp_path, "job_7", config={"_name_or_path": "org/Base-1B"})
        checkpoint = folder(job, "checkpoint-50")
        assert identify(str(checkpoint)).id == "Base-1B"

    def test_unreadable_metadata_is_ignored(self, tmp_path: Path) -> None:
        """Broken JSON does not stop naming."""
        path = folder(tmp_path, "broken-run")
        (path / "config.json").write_text("{not json")
        assert identify(str(path)).readable_name == "broken-run"


class TestFolderNames:
    def test_checkpoint_gives_way_to_the_parent(self, tmp_path: Path) -> None:
        """`checkpoint-100` under a named folder takes the folder's name."""
        path = folder(tmp_path, "qwen-support-bot", "checkpoint-100")
        identity = identify(str(path))
        assert identity.id == "qwen-support-bot"
        assert identity.display_name == "qwen-support-bot (checkpoint-100)"

    def test_merged_under_a_job_without_metadata_keeps_the_job_name(self, tmp_path: Path) -> None:
        """With no base model known, a job folder's name is the best there is."""
        path = folder(tmp_path, "job_42", "merged")
        assert identify(str(path)).id == "job_42"

    def test_merged_under_a_job_with_metadata_gives_the_base(self, tmp_path: Path) -> None:
        """A job's merged model is named for the model it was trained from."""
        path = folder(tmp_path, "job_42", "merged_fp16")
        identity = identify(str(path), metadata={"base_model": "org/Tiny-1B"})
        assert (identity.id, identity.display_name) == ("Tiny-1B", "org/Tiny-1B (merged_fp16)")

    def test_uuid_folders_are_skipped(self, tmp_path: Path) -> None:
        """A UUID is never a name: go further up."""
        path = folder(tmp_path, "customer-faq", UUID, "checkpoint-3")
        assert identify(str(path)).id == "customer-faq"
        assert is_uuid_like(UUID) and is_uuid_like(UUID.replace("-", ""))
        assert not is_uuid_like("checkpoint-3")

    def test_last_resort(self) -> None:
        """Nothing readable at all gives the fallback name, never a UUID or a path."""
        identity = identify(f"/{UUID}/checkpoint-1")
        assert identity.id == FALLBACK_NAME
        assert UUID not in identity.display_name

    def test_missing_folder_is_named_from_its_path(self) -> None:
        """A folder that is not there yet is still named by the rules."""
        identity = identify("/srv/train/support-bot/checkpoint-9")
        assert identity.id == "support-bot"
        assert identity.model_path == "/srv/train/support-bot/checkpoint-9"


class TestIds:
    def test_repo_id_source(self) -> None:
        """A repo id is its own readable name; the id drops the namespace."""
        identity = identify("Qwen/Qwen3-4B-Instruct-2507")
        assert identity.readable_name == identity.display_name == "Qwen/Qwen3-4B-Instruct-2507"
        assert identity.id == "Qwen3-4B-Instruct-2507"
        assert identity.model_path is None

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("org/My Model v2", "My-Model-v2"),
            (".hidden", "hidden"),
            ("--x--y--", "x-y"),
            ("modèle", "mod-le"),
            ("!", FALLBACK_NAME),
            ("a", FALLBACK_NAME),
        ],
    )
    def test_ids_are_profile_safe(self, name: str, expected: str) -> None:
        """Whatever the name, the id is a valid compose profile name."""
        assert profile_safe(name) == expected

    def test_path_is_kept_absolute(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The model's folder is recorded as an absolute path, even when given relative."""
        monkeypatch.chdir(tmp_path)
        folder(tmp_path, "runs", "bot")
        assert identify("./runs/bot").model_path == str(tmp_path / "runs" / "bot")
