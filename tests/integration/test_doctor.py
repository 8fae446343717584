"""`model-orchestrator doctor` on the real Docker engine and Compose v2: a healthy setup, an
engine that is not there, a socket this user may not open, a model whose weights are missing."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, free_port

pytestmark = pytest.mark.integration

PIN = "89abcdef0123456789abcdef0123456789abcdef"
# prctl(PR_CAPBSET_DROP) and the capabilities that let root ignore a file's mode.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def doctor(
    compose: Path,
    models: Path,
    state: Path,
    *,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "doctor", "--compose", str(compose),
         "--models-dir", str(models), "--state-dir", str(state), "--port", str(free_port())],
        cwd=REPO_ROOT, env={**os.environ, **(env or {})}, preexec_fn=preexec,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def findings(out: str) -> dict[str, tuple[str, str]]:
    """Each line by what it checked: (mark, the rest of the line); the summary left out."""
    found: dict[str, tuple[str, str]] = {}
    for line in out.splitlines()[:-1]:
        mark, rest = line[:7].strip(), line[8:]
        subject, _, said = rest.partition(": ")
        assert mark in {"ok", "warning", "problem"} and subject not in found, line
        found[subject] = (mark, said)
    return found


def test_a_healthy_setup_passes(rig_root: Path, docker_client: docker.DockerClient) -> None:
    """The rig's project with its snapshots on the real engine: nothing blocks, exit 0."""
    result = doctor(rig_root / "docker-compose.yml", rig_root / "models", rig_root / "doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    found = findings(result.stdout)
    engine = docker_client.version()
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    said = f"Docker {engine['Version']} (API {engine['ApiVersion']}) at {where}"
    assert found["docker engine"] == ("ok", said)
    assert found["docker compose"][0] == "ok" and found["docker compose"][1].startswith("v2.")
    mark, said = found["compose project"]
    assert mark == "ok"
    assert said.endswith(
        "6 models (alpha, beta, crashy, hangy, nocache, noimage), 1 shared service"
    )
    for subject in ("weights of alpha", "weights of beta", "models dir", "port", "state dir"):
        assert found[subject][0] == "ok", (subject, found[subject])
    # No model of the rig reserves a GPU: the machine's lack of one blocks nothing.
    assert found["NVIDIA runtime"][0] != "problem" and found["GPUs"][0] != "problem"
    assert not [subject for subject, (mark, _) in found.items() if mark == "problem"]
    assert result.stdout.splitlines()[-1].endswith("no problem: ready to serve")


def test_an_engine_that_is_not_there(rig_root: Path) -> None:
    """DOCKER_HOST naming no socket: a problem naming the fix, exit 1."""
    result = doctor(
        rig_root / "docker-compose.yml",
        rig_root / "models",
        rig_root / "doctor",
        env={"DOCKER_HOST": "unix:///nonexistent.sock"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "docker engine:" in line]
    assert line == (
        "problem docker engine: cannot reach the engine at unix:///nonexistent.sock"
        " (no such file or directory)  fix: start the engine DOCKER_HOST names, or unset"
        " DOCKER_HOST to use unix:///var/run/docker.sock"
    )
    found = findings(result.stdout)
    assert found["NVIDIA runtime"][0] == "warning"  # not checked, and not a second problem
    assert found["compose project"][0] == "ok"  # compose reads files without the engine


@pytest.fixture
def closed_socket(tmp_path: Path) -> Iterator[Path]:
    """A listening unix socket whose mode lets nobody in."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen()
        path.chmod(0)
        yield path


def _without_root_file_access() -> None:
    """In the child: root without the capabilities that let it open any file, whatever its
    mode, so a socket's mode stops it as it stops a user outside the docker group."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_socket_this_user_may_not_open(rig_root: Path, closed_socket: Path) -> None:
    """A socket with mode 000: permission denied, and the fix is the docker group."""
    preexec = _without_root_file_access if os.geteuid() == 0 else None
    if preexec is not None:
        probe = subprocess.run(
            [sys.executable, "-c", "pass"], preexec_fn=preexec, capture_output=True, check=False
        )
        if probe.returncode != 0:
            pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {probe.stderr.decode()[-200:]}")
    result = doctor(
        rig_root / "docker-compose.yml",
        rig_root / "models",
        rig_root / "doctor",
        env={"DOCKER_HOST": f"unix://{closed_socket}"},
        preexec=preexec,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    mark, said = findings(result.stdout)["docker engine"]
    assert mark == "problem"
    assert said.startswith(f"permission denied on unix://{closed_socket}")
    assert "fix: sudo usermod -aG docker " in said and "log out and in again" in said


def test_a_missing_model_names_the_download(tmp_path: Path) -> None:
    """A pinned model not in the cache: a warning with the hf download command; exit 0."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        f"""
services:
  here:
    image: {STANDIN_IMAGE}
    profiles: [here]
    command: ["--model", "org/here"]
  absent:
    image: {STANDIN_IMAGE}
    profiles: [absent]
    command: ["--model", "org/absent", "--revision", "{PIN}", "--tokenizer-revision", "{PIN}"]
"""
    )
    models = tmp_path / "models"
    make_snapshot(models / "hub", "org/here")
    result = doctor(compose, models, tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr
    found = findings(result.stdout)
    assert found["weights of here"][0] == "ok"
    mark, said = found["weights of absent"]
    assert mark == "warning"
    assert said.endswith(
        f"  fix: hf download org/absent --revision {PIN} --cache-dir {models / 'hub'}"
    )
    assert said.startswith("org/absent is not in the cache")


def test_serve_logs_what_blocks_it_before_it_fails(rig_root: Path) -> None:
    """serve runs the same checks at start: the engine's problem is logged as an error with
    its fix, and the start that then fails ends with one error line and a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--compose",
         str(rig_root / "docker-compose.yml"), "--models-dir", str(rig_root / "models"),
         "--state-dir", str(rig_root / "serve-state"), "--port", str(free_port())],
        cwd=REPO_ROOT, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    logged = [json.loads(line) for line in lines[:-1]]
    engine = next(entry for entry in logged if entry.get("check") == "docker engine")
    assert engine["level"] == "error"
    assert engine["fix"].startswith("start the engine DOCKER_HOST names")
    assert lines[-1].startswith("model-orchestrator: error: docker engine error")
