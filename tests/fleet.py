"""A fleet on this machine: daemons on simulated GPUs behind a real HAProxy.

Shared by the fleet's integration tests and its benchmark. Each daemon gets a rig of its
own (a compose project, a folder whose ``gpu/lock`` the stand-ins share as their GPU) and
an agent port; HAProxy runs from ``haproxy-config``'s output with an admin socket.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, Rig, free_port
from tests.waiting import eventually_blocking

COMPOSE = """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment: &environment
    STANDIN_LOAD_DELAY: "{delay}"
    STANDIN_GPU_LOCK: /gpu/lock
    STANDIN_TOKEN_DELAY: "0.01"
  volumes: ["./models/hub:/root/.cache/huggingface/hub", "./gpu:/gpu"]
  stop_grace_period: 5s

services:
  engine-alpha:
    <<: *engine
    profiles: ["alpha"]
    command: ["--model", "org/alpha"]
  engine-beta:
    <<: *engine
    profiles: ["beta"]
    # Slower to load: the switch to it is the window a test looks into.
    environment: {{<<: *environment, STANDIN_LOAD_DELAY: "{slow_delay}"}}
    command: ["--model", "org/beta"]
  engine-gamma:
    <<: *engine
    profiles: ["gamma"]
    command: ["--model", "org/gamma"]
"""
MODELS = ("alpha", "beta", "gamma")
# HAProxy's server states in `show servers state`.
UP = 2
DRAIN = 0x08  # srv_admin_state: drained (by the agent)


@dataclass
class Fleet:
    rigs: list[Rig]
    haproxy: subprocess.Popen[bytes]
    url: str
    stats: Path
    config: str
    log: Path

    def servers(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show servers state`: (backend, server) -> its fields."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(b"show servers state\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        lines = [line for line in raw.decode().splitlines() if line.strip()]
        header = next(line for line in lines if line.startswith("# be_id"))[2:].split()
        rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:]]
        return {(row["be_name"], row["srv_name"]): row for row in rows}

    def up(self, backend: str, server: str) -> bool:
        return int(self.servers()[(backend, server)]["srv_op_state"]) == UP

    def drained(self, backend: str, server: str) -> bool:
        return bool(int(self.servers()[(backend, server)]["srv_admin_state"]) & DRAIN)

    def weight(self, backend: str, server: str) -> int:
        return int(self.servers()[(backend, server)]["srv_uweight"])


def write_project(root: Path, *, delay: float = 1.0, slow_delay: float = 3.0) -> None:
    hub = root / "models" / "hub"
    for model in MODELS:
        make_snapshot(hub, f"org/{model}")
    (root / "gpu").mkdir(parents=True, exist_ok=True)
    (root / "docker-compose.yml").write_text(
        COMPOSE.format(image=STANDIN_IMAGE, delay=delay, slow_delay=slow_delay)
    )


def haproxy_config(rigs: list[Rig], listen: str, stats: Path, check_ms: int) -> str:
    """What `model-orchestrator haproxy-config` prints for the rigs' daemons."""
    daemons = [arg for rig in rigs for arg in ("--daemon", rig.url)]
    made = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "haproxy-config", *daemons,
         "--listen", listen, "--check-interval", str(check_ms), "--stats-socket", str(stats)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if made.returncode != 0 or made.stderr:
        raise RuntimeError(f"haproxy-config: {made.stderr}")
    return made.stdout


@contextlib.contextmanager
def running_fleet(
    folder: Path,
    client: docker.DockerClient,
    *,
    daemons: int = 2,
    check_ms: int = 200,
    delay: float = 1.0,
    slow_delay: float = 3.0,
    daemon_args: tuple[str, ...] = (),
) -> Iterator[Fleet]:
    """Daemons on their own GPUs and HAProxy in front, settled: every server checked."""
    tag = uuid.uuid4().hex[:6]
    rigs = []
    for gpu in range(daemons):
        root = folder / f"gpu{gpu}"
        write_project(root, delay=delay, slow_delay=slow_delay)
        rigs.append(Rig(root=root, project=f"mo-fleet-{tag}-{gpu}", docker=client))
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for rig in rigs:
            rig.start_daemon(*daemon_args, env={"ORCHESTRATOR_AGENT_PORT": str(free_port())})
        stats, port, log = folder / "stats.sock", free_port(), folder / "haproxy.log"
        config = haproxy_config(rigs, f"127.0.0.1:{port}", stats, check_ms)
        (folder / "haproxy.cfg").write_text(config)
        with open(log, "wb") as out:
            haproxy = subprocess.Popen(
                ["haproxy", "-f", str(folder / "haproxy.cfg"), "-db"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        made = Fleet(rigs, haproxy, f"http://127.0.0.1:{port}", stats, config, log)
        names = [f"daemon{i + 1}" for i in range(daemons)]

        def settled() -> bool:
            # Servers start up until their first check: wait for HAProxy's own view.
            if haproxy is not None and haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited: {log.read_text()[-2000:]}")
            if not stats.exists():
                return False
            return not any(made.up(f"model_{m}", s) for m in MODELS for s in names)

        eventually_blocking(
            settled, within=15, what="HAProxy's first checks",
            context=lambda: log.read_text()[-2000:],
        )  # fmt: skip
        yield made
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for rig in rigs:
            rig.clean()
