"""`model-orchestrator check` against the real compose CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "compose" / "docker-compose.yml"
EXAMPLE_REPOS = (
    "Qwen/Qwen3-4B-Instruct-2507",
    "Qwen/Qwen3-VL-4B-Instruct",
    "QuantTrio/Qwen3-VL-30B-A3B-Instruct-AWQ",
)


def check(compose: Path, models: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check", "--compose", str(compose),
         "--models-dir", str(models)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_check_reports_rewrites_and_cache_misses(rig_root: Path) -> None:
    """On a seed-002-style file, check shows each rewrite, flags the uncached repo, exits 1."""
    result = check(rig_root / "docker-compose.yml", rig_root / "models")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "/root/.cache/huggingface/org--alpha → org/alpha" in out
    assert "HF_HUB_OFFLINE" in out
    assert "models--org--not-downloaded" in out
    assert "compose: the rewritten copy is valid" in out
    assert "shared services (left alone): shared" in out


def test_shipped_example_is_valid_and_clean(tmp_path: Path) -> None:
    """The example compose file passes docker compose config and, with the cache filled, check."""
    for repo in EXAMPLE_REPOS:
        make_snapshot(tmp_path / "hub", repo)
    result = check(EXAMPLE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for model in ("text-4b", "qwen3vl-4b", "qwen3vl-30b"):
        assert f"model {model}" in result.stdout


def test_invalid_compose_is_reported(tmp_path: Path) -> None:
    """A file compose itself rejects makes check fail with compose's words."""
    (tmp_path / "hub").mkdir()
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(
        "services:\n  m:\n    image: x\n    profiles: [mm]\n    ports: ['not-a-port:xx']\n"
        "    command: ['--model', 'org/x']\n"
    )
    result = check(bad, tmp_path)
    assert result.returncode != 0
    assert "compose" in (result.stdout + result.stderr).lower()


def test_check_shows_its_work_and_names_what_cannot_run(tmp_path: Path) -> None:
    """Files read, the engine's command before and after, an overridden restart policy, a
    command the daemon cannot rewrite (named with its service and why), and --show."""
    make_snapshot(tmp_path / "hub", "org/ok")
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        """
services:
  good:
    image: vllm/vllm-openai:v0.11.0
    profiles: [good]
    restart: unless-stopped
    command: --model org/ok --max-model-len 4096
  split:
    image: vllm/vllm-openai:v0.11.0
    profiles: [split]
    entrypoint: ["/bin/bash", "-c"]
    command: vllm serve org/ok --port 8000
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check", "--compose", str(compose),
         "--models-dir", str(tmp_path), "--show"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert f"files read: {compose}" in out
    assert "restart: unless-stopped → no (overridden" in out
    assert "command: --model org/ok --max-model-len 4096 → --model org/ok" in out
    assert "ERROR: split: the shell runs only the first word" in out
    assert "--- the rewritten project, as the daemon runs it ---" in out
    assert "--served-model-name" in out.split("--- the rewritten project")[1]
