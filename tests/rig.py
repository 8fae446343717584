"""A compose project in a temporary folder, the daemon as a real process, and a look at Docker.

Shared by the integration tests and the benchmarks, which run the same real pieces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from orchestrator import gate
from tests.waiting import eventually_blocking

STANDIN_IMAGE = os.environ.get("STANDIN_IMAGE", "model-orchestrator/standin:test")
REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def engine_services(*models: str) -> str:
    """Compose services for these models, one profile each, each extending the file's
    ``x-engine`` anchor: the part of the test projects' compose files they all share."""
    return "".join(
        f'  engine-{m}:\n    <<: *engine\n    profiles: ["{m}"]\n'
        f'    command: ["--model", "org/{m}"]\n'
        for m in models
    )


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
    shared_services: tuple[str, ...] = ("shared",)

    @property
    def compose_file(self) -> Path:
        return self.root / "docker-compose.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_daemon(
        self, *extra: str, wait: float = 30.0, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
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
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            # A group of its own: clean() kills the compose processes it runs along with it.
            start_new_session=True,
        )
        self.processes.append(process)

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.daemon_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        eventually_blocking(
            listening,
            within=wait,
            interval=0.05,
            what="the daemon listening",
            context=self.daemon_log,
        )
        return process

    def daemon_log(self) -> str:
        logs = sorted(self.root.glob("daemon-*.log"))
        return logs[-1].read_text()[-4000:] if logs else ""

    def stop_daemons(self, sig: int = signal.SIGTERM) -> None:
        for process in self.processes:
            if process.poll() is None:
                if sig == signal.SIGKILL:
                    os.killpg(process.pid, sig)
                else:
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
                filters={"label": [f"{PROJECT_LABEL}={self.project}"]},
                # The daemon removes and creates containers behind its switches.
                ignore_removed=True,
            )
        )

    def ever_started(self) -> list[docker.models.containers.Container]:
        """Containers that have run: the daemon creates every model's ahead, unstarted."""
        return [c for c in self.containers(running_only=False) if c.status != "created"]

    def model_containers(self) -> list[str]:
        """Services of running model containers whose engine runs (the shared service is
        not a model): a container whose main process is still the start gate's shell is
        standing by, or staged for a switch, and runs no engine (see ``held``).

        Each container is looked at in turn, and a switch may let one through meanwhile:
        the engines seen are looked at once more afterwards, and only those still running
        count, so that an engine seen before its exit and another seen after it are not
        taken for two at once. (Docker may still list a container as running for a moment
        after its process has exited; its processes say otherwise.)
        """
        seen = [
            c
            for c in self.containers()
            if c.labels.get(SERVICE_LABEL) not in self.shared_services and _engine_runs(c)
        ]
        return sorted(c.labels[SERVICE_LABEL] for c in seen if _engine_runs(c))

    def held(self) -> list[str]:
        """Services of running containers whose engine waits at the start gate."""
        return sorted(c.labels[SERVICE_LABEL] for c in self.containers() if held(c))

    def clean(self) -> None:
        """Kill the daemons, remove every container and network of the project."""
        self.stop_daemons(signal.SIGKILL)
        for container in self.containers(running_only=False):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for network in self.docker.networks.list(
            filters={"label": [f"{PROJECT_LABEL}={self.project}"]}
        ):
            network.remove()


def _commands(container: docker.models.containers.Container) -> list[str] | None:
    """The command lines of the container's processes; None once it no longer runs."""
    try:
        processes = container.top()["Processes"] or []
    except docker.errors.APIError:
        return None
    return [" ".join(row[7:]) for row in processes]


def held(container: docker.models.containers.Container) -> bool:
    """Whether the container's engine waits at the start gate (see orchestrator/gate.py)."""
    return any(gate.SCRIPT_NAME in command for command in _commands(container) or [])


# What the gate's shell runs before it hands over: its backstop sleep and the removal of
# its folder. A held container being stopped may show the sleep alone for a moment after
# its shell has exited: no engine runs there either.
_GATE_HELPERS = ("sleep ", f"rm -rf {gate.GATE_DIR}")


def _engine_runs(container: docker.models.containers.Container) -> bool:
    commands = _commands(container) or []
    if any(gate.SCRIPT_NAME in c for c in commands):
        return False
    return any(not c.startswith(_GATE_HELPERS) for c in commands)
