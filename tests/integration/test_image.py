"""The daemon's own image, run as a container against the host's Docker engine.

`model-orchestrator/daemon:test` is built from the repo's Dockerfile by
scripts/build-images.sh. The container gets what the README and compose/orchestrator.yml
give it: the host network, the Docker socket and the compose and models folders at the
same paths as on the host. Its model containers are stand-ins of a compose project of
their own, removed with the daemon's container whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, Rig, free_port
from tests.waiting import eventually_blocking

pytestmark = pytest.mark.integration

DAEMON_IMAGE = os.environ.get("DAEMON_IMAGE", "model-orchestrator/daemon:test")
DOCKER_SOCKET = "/var/run/docker.sock"
ORCHESTRATOR_COMPOSE = REPO_ROOT / "compose" / "orchestrator.yml"
# The Dockerfile checks every 10 s after a 10 s start period: the first check, at
# about 10 s, should already pass.
HEALTHY_WITHIN = 40.0

# One model, written the way users do: the models folder mounted at the cache root by a
# relative path, which compose resolves inside the daemon's container.
COMPOSE_FILE = """
services:
  engine-gamma:
    image: {image}
    profiles: ["gamma"]
    command: ["--model", "org/gamma"]
    ports: ["127.0.0.1::8000"]
    environment: {{STANDIN_LOAD_DELAY: "0.5"}}
    volumes: ["./models:/root/.cache/huggingface"]
    stop_grace_period: 5s
"""


@dataclass
class Daemon:
    container: Any
    rig: Rig

    def logs(self) -> str:
        return str(self.container.logs(tail=60).decode(errors="replace"))


def call(
    url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """One HTTP request; the status and the JSON answer, errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def listening(url: str, container: Any) -> bool:
    """Whether the daemon in ``container`` answers; fails the test if the container exited."""
    container.reload()
    assert container.status != "exited", container.logs().decode(errors="replace")
    try:
        call(f"{url}/health/live", timeout=1)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def daemon(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    try:
        docker_client.images.get(DAEMON_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{DAEMON_IMAGE} is missing: run scripts/build-images.sh")
    root = tmp_path_factory.mktemp("image")
    make_snapshot(root / "models" / "hub", "org/gamma")
    (root / "docker-compose.yml").write_text(COMPOSE_FILE.format(image=STANDIN_IMAGE))
    rig = Rig(
        root=root,
        project=f"mo-img-{uuid.uuid4().hex[:8]}",
        docker=docker_client,
        port=free_port(),
        shared_services=(),
    )
    container = None
    try:
        container = docker_client.containers.run(
            DAEMON_IMAGE,
            ["serve", "--host", "127.0.0.1", "--compose", str(rig.compose_file),
             "--models-dir", str(root / "models"), "--state-dir", str(root / "state"),
             "--project-name", rig.project],
            name=f"{rig.project}-daemon",
            detach=True,
            network_mode="host",
            environment={"ORCHESTRATOR_PORT": str(rig.port)},
            volumes={
                DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
                str(root): {"bind": str(root), "mode": "rw"},
            },
        )  # fmt: skip
        made = Daemon(container=container, rig=rig)
        eventually_blocking(
            lambda: listening(rig.url, container),
            within=60,
            interval=0.2,
            what="the daemon in the container listening",
            context=made.logs,
        )
        yield made
    finally:
        if container is not None:
            container.remove(force=True)
        rig.clean()


def test_liveness_passes(daemon: Daemon) -> None:
    """GET /health/live on the port from ORCHESTRATOR_PORT answers 200 pass."""
    status, body = call(f"{daemon.rig.url}/health/live")
    assert (status, body["status"], body["service"]) == (200, "pass", "model-orchestrator")


def test_docker_healthcheck_turns_healthy(daemon: Daemon) -> None:
    """The image's HEALTHCHECK follows ORCHESTRATOR_PORT: Docker reports the container healthy."""

    def health() -> dict[str, Any]:
        daemon.container.reload()
        return dict(daemon.container.attrs["State"].get("Health") or {})

    eventually_blocking(
        lambda: health().get("Status") == "healthy",
        within=HEALTHY_WITHIN,
        interval=0.5,
        what="docker's verdict: healthy",
        context=lambda: (health(), daemon.logs()),
    )
    assert health()["Log"][-1]["ExitCode"] == 0


def test_help_runs_in_image(docker_client: docker.DockerClient) -> None:
    """`model-orchestrator --help` works as the image's entrypoint."""
    container = docker_client.containers.run(DAEMON_IMAGE, ["--help"], detach=True)
    try:
        result = container.wait(timeout=60)
        output = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 0, output
    assert output.startswith("usage: model-orchestrator")
    for command in ("serve", "check", "pull", "models"):
        assert command in output


def test_switch_starts_the_model_through_compose_in_image(daemon: Daemon) -> None:
    """POST /switch starts the stand-in: Compose v2 inside the image drives the host's engine."""
    status, body = call(f"{daemon.rig.url}/switch", "POST", {"model": "gamma"}, timeout=120)
    assert status == 200, (body, daemon.logs())
    assert body["switch"]["to"] == "gamma"
    assert body["status"]["state"] == "ready"
    assert body["status"]["active"] == "gamma"
    assert daemon.rig.model_containers() == ["engine-gamma"]
    # The hub mount reached the engine under the host's path, as compose saw it inside.
    (engine,) = daemon.rig.containers()
    sources = {m["Destination"]: m["Source"] for m in engine.attrs["Mounts"]}
    assert sources["/root/.cache/huggingface/hub"] == str(daemon.rig.root / "models" / "hub")


def test_orchestrator_compose_file_is_valid(tmp_path: Path) -> None:
    """compose/orchestrator.yml passes `docker compose config` and mounts folders at their paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(
        MO_COMPOSE_DIR=str(tmp_path / "compose"),
        MO_MODELS_DIR=str(tmp_path / "models"),
        ORCHESTRATOR_PORT="9123",
    )
    base = ["docker", "compose", "-f", str(ORCHESTRATOR_COMPOSE), "config"]
    quiet = subprocess.run(
        [*base, "--quiet"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert quiet.returncode == 0, quiet.stderr
    rendered = subprocess.run(
        [*base, "--format", "json"], env=env, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    project = json.loads(rendered.stdout)
    assert project["name"] == "model-orchestrator"
    (service,) = project["services"].values()
    assert service["network_mode"] == "host"
    assert service["restart"] == "unless-stopped"
    assert "healthcheck" not in service
    assert service["environment"]["ORCHESTRATOR_PORT"] == "9123"
    assert service["environment"]["ORCHESTRATOR_COMPOSE"] == str(
        tmp_path / "compose" / "docker-compose.yml"
    )
    binds = {v["source"]: v["target"] for v in service["volumes"] if v["type"] == "bind"}
    assert binds[DOCKER_SOCKET] == DOCKER_SOCKET
    for folder in ("compose", "models"):
        assert binds[str(tmp_path / folder)] == str(tmp_path / folder)


def test_default_command_requires_the_key_it_generates(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """The image's own command listens on every address, so it makes a key and requires it;
    the README's `cat` of the key file in the container reads it."""
    make_snapshot(tmp_path / "models" / "hub", "org/gamma")
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE.format(image=STANDIN_IMAGE))
    port = free_port()
    project = f"mo-key-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.run(
        DAEMON_IMAGE,
        detach=True,
        network_mode="host",
        environment={
            "ORCHESTRATOR_PORT": str(port),
            "ORCHESTRATOR_COMPOSE": str(tmp_path / "docker-compose.yml"),
            "ORCHESTRATOR_MODELS_DIR": str(tmp_path / "models"),
            "ORCHESTRATOR_PROJECT_NAME": project,
        },
        volumes={
            DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
            str(tmp_path): {"bind": str(tmp_path), "mode": "rw"},
        },
    )
    try:
        url = f"http://127.0.0.1:{port}"
        eventually_blocking(
            lambda: listening(url, container),
            within=60,
            interval=0.2,
            what="the daemon listening",
            context=lambda: container.logs().decode(errors="replace"),
        )
        assert call(f"{url}/stop", "POST", {})[0] == 401
        read = container.exec_run(["cat", "/var/lib/model-orchestrator/api-key"])
        assert read.exit_code == 0
        key = read.output.decode().strip()
        assert key and key not in container.logs().decode()
        request = urllib.request.Request(
            f"{url}/stop",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        container.remove(force=True)
        # The daemon made its model's container ahead, which outlives it.
        label = f"com.docker.compose.project={project}"
        for made in docker_client.containers.list(all=True, filters={"label": label}):
            made.remove(force=True)
