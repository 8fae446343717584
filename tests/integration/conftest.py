"""Integration rig: real Docker engine, Compose v2, the stand-in image, the daemon as a process.

Each test module gets its own compose project (so leftovers never collide) with a
user-style compose file in a temporary folder, a fake hub cache, and a helper to
run the daemon as a real subprocess on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from tests.fakes import make_snapshot

STANDIN_IMAGE = os.environ.get("STANDIN_IMAGE", "model-orchestrator/standin:test")
REPO_ROOT = Path(__file__).resolve().parents[2]

# The user's file as seed 002 found it: cache paths in --model, the models dir mounted at
# the cache root, offline mode off. The daemon has to fix all of it for the engine to load.
COMPOSE_TEMPLATE = """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment:
    - HF_HUB_OFFLINE=0
    - STANDIN_LOAD_DELAY={delay}
  volumes:
    - ./models:/root/.cache/huggingface
  stop_grace_period: 5s

services:
  shared:
    image: {image}
    command: ["--model", "org/alpha"]
    environment: {{HF_HUB_OFFLINE: "1", STANDIN_LOAD_DELAY: "0"}}
    volumes: ["./models/hub:/root/.cache/huggingface/hub"]

  engine-alpha:
    <<: *engine
    profiles: ["alpha"]
    command: >
      --model /root/.cache/huggingface/org--alpha
      --max-model-len 4096

  engine-beta:
    <<: *engine
    profiles: ["beta"]
    depends_on: [shared]
    command: ["/root/.cache/huggingface/hub/models--org--beta/snapshots/{beta_hash}"]

  engine-crashy:
    <<: *engine
    profiles: ["crashy"]
    environment: {{STANDIN_CRASH: "1", STANDIN_LOAD_DELAY: "0.5"}}
    command: ["--model", "org/alpha"]

  engine-hangy:
    <<: *engine
    profiles: ["hangy"]
    environment: {{STANDIN_HANG: "1"}}
    command: ["--model", "org/alpha"]
    x-orchestrator: {{startup_timeout: 3}}

  engine-nocache:
    <<: *engine
    profiles: ["nocache"]
    command: ["--model", "org/not-downloaded"]
"""

LOAD_DELAY = 1.0
BETA_HASH = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rig:
    root: Path
    project: str
    docker: docker.DockerClient
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def compose_file(self) -> Path:
        return self.root / "docker-compose.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_daemon(self, *extra: str, wait: float = 30.0) -> subprocess.Popen[bytes]:
        if not self.port:
            self.port = free_port()
        log = open(self.root / f"daemon-{len(self.processes)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "serve",
                "--compose",
                str(self.compose_file),
                "--models-dir",
                str(self.root / "models"),
                "--state-dir",
                str(self.root / "state"),
                "--project-name",
                self.project,
                "--port",
                str(self.port),
                *extra,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.daemon_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return process
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen: {self.daemon_log()}")

    def daemon_log(self) -> str:
        logs = sorted(self.root.glob("daemon-*.log"))
        return logs[-1].read_text()[-4000:] if logs else ""

    def stop_daemons(self, sig: int = signal.SIGTERM) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(sig)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def containers(self, *, running_only: bool = True) -> list[docker.models.containers.Container]:
        return list(
            self.docker.containers.list(
                all=not running_only,
                filters={"label": [f"com.docker.compose.project={self.project}"]},
            )
        )

    def model_containers(self) -> list[str]:
        """Services of running model containers (the shared service is not a model)."""
        return sorted(
            c.labels["com.docker.compose.service"]
            for c in self.containers()
            if c.labels.get("com.docker.compose.service") != "shared"
        )

    def clean(self) -> None:
        for container in self.containers(running_only=False):
            container.remove(force=True)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(STANDIN_IMAGE)
    except Exception as err:
        pytest.fail(
            f"integration tests need Docker and {STANDIN_IMAGE} (scripts/build-images.sh): {err}"
        )
    yield client
    client.close()


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rig")
    hub = root / "models" / "hub"
    make_snapshot(hub, "org/alpha")
    make_snapshot(hub, "org/beta", revision=BETA_HASH)
    (root / "docker-compose.yml").write_text(
        COMPOSE_TEMPLATE.format(image=STANDIN_IMAGE, delay=LOAD_DELAY, beta_hash=BETA_HASH)
    )
    return root


@pytest.fixture
def rig(rig_root: Path, docker_client: docker.DockerClient) -> Iterator[Rig]:
    made = Rig(root=rig_root, project=f"mo-it-{uuid.uuid4().hex[:8]}", docker=docker_client)
    state = rig_root / "state"
    if state.exists():
        for item in state.iterdir():
            item.unlink()
    try:
        yield made
    finally:
        made.stop_daemons(signal.SIGKILL)
        made.clean()
        for network in docker_client.networks.list(
            filters={"label": [f"com.docker.compose.project={made.project}"]}
        ):
            network.remove()
