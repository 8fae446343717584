"""Two daemons, two simulated GPUs, behind a real HAProxy with the generated configuration.

Each daemon has its own compose project and its own GPU: the stand-ins of one daemon
share a lock file (``STANDIN_GPU_LOCK``), so two models awake on one GPU would fail
loudly. HAProxy runs on loopback from ``haproxy-config``'s output with 200 ms checks and
an admin socket; the tests read what it decided from its answers' headers
(``X-Orchestrator-Daemon``: the server, ``daemon1`` or ``daemon2``) and from ``show
servers state``. The tests run in order on one fleet; the last one kills a daemon.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import docker
import pytest

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, Rig, free_port
from tests.waiting import eventually, eventually_blocking

pytestmark = pytest.mark.integration

COMPOSE = """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment: &environment
    STANDIN_LOAD_DELAY: "1"
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
    # Slow to load: the switch to it is the window a test looks into.
    environment: {{<<: *environment, STANDIN_LOAD_DELAY: "3"}}
    command: ["--model", "org/beta"]
  engine-gamma:
    <<: *engine
    profiles: ["gamma"]
    command: ["--model", "org/gamma"]
"""
CHECK_MS = 200
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


def _project(root: Path) -> None:
    hub = root / "models" / "hub"
    for model in ("alpha", "beta", "gamma"):
        make_snapshot(hub, f"org/{model}")
    (root / "gpu").mkdir(parents=True)
    (root / "docker-compose.yml").write_text(COMPOSE.format(image=STANDIN_IMAGE))


def _haproxy_config(rigs: list[Rig], listen: str, stats: Path) -> str:
    daemons = [arg for rig in rigs for arg in ("--daemon", rig.url)]
    made = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "haproxy-config", *daemons,
         "--listen", listen, "--check-interval", str(CHECK_MS), "--stats-socket", str(stats)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stderr == "", made.stderr  # every daemon has an agent: no warning
    return made.stdout


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[Fleet]:
    tag = uuid.uuid4().hex[:6]
    rigs = []
    for gpu in range(2):
        root = tmp_path_factory.mktemp(f"gpu{gpu}")
        _project(root)
        rigs.append(Rig(root=root, project=f"mo-it-fleet-{tag}-{gpu}", docker=docker_client))
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for rig in rigs:
            rig.start_daemon(env={"ORCHESTRATOR_AGENT_PORT": str(free_port())})
        folder = tmp_path_factory.mktemp("haproxy")
        stats, port = folder / "stats.sock", free_port()
        config = _haproxy_config(rigs, f"127.0.0.1:{port}", stats)
        (folder / "haproxy.cfg").write_text(config)
        log = open(folder / "haproxy.log", "wb")  # noqa: SIM115
        haproxy = subprocess.Popen(
            ["haproxy", "-f", str(folder / "haproxy.cfg"), "-db"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        made = Fleet(rigs, haproxy, f"http://127.0.0.1:{port}", stats, config)

        def settled() -> bool:
            # Servers start up until their first check: wait for HAProxy's own view.
            if not stats.exists():
                return False
            return not any(made.up(f"model_{m}", s) for m in ("alpha", "beta", "gamma")
                           for s in ("daemon1", "daemon2"))  # fmt: skip

        eventually_blocking(
            settled, within=15, what="HAProxy's first checks",
            context=lambda: (folder / "haproxy.log").read_text()[-2000:],
        )  # fmt: skip
        yield made
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for rig in rigs:
            rig.clean()


async def chat(
    session: aiohttp.ClientSession, fleet: Fleet, model: str, tokens: int = 4
) -> tuple[int, str, str]:
    """(status, the daemon that answered, the text) for one chat through HAProxy."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        # Long answers stream, a token every 10 ms: they stay in flight for a while.
        "stream": tokens > 10,
    }
    async with session.post(f"{fleet.url}/v1/chat/completions", json=body) as response:
        text = await response.text()
        return response.status, response.headers.get("X-Orchestrator-Daemon", "-"), text


async def switches(rig: Rig) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{rig.url}/switches") as answer:
        return len((await answer.json())["switches"])


async def loaded(rig: Rig) -> str | None:
    async with aiohttp.ClientSession() as session, session.get(f"{rig.url}/status") as answer:
        status = await answer.json()
        return status["active"] if status["state"] == "ready" else None


async def test_models_asked_for_at_once_start_on_different_daemons(fleet: Fleet) -> None:
    """alpha and beta at the same moment: one on each GPU; then alternating traffic swaps
    nothing."""
    async with aiohttp.ClientSession() as session:
        first = await asyncio.gather(chat(session, fleet, "alpha"), chat(session, fleet, "beta"))
        assert [status for status, _, _ in first] == [200, 200], first
        (_, alpha_on, _), (_, beta_on, _) = first
        assert alpha_on != beta_on
        swaps = [await switches(rig) for rig in fleet.rigs]
        for _ in range(10):
            replies = await asyncio.gather(
                chat(session, fleet, "alpha"), chat(session, fleet, "beta")
            )
            assert [(s, d) for s, d, _ in replies] == [(200, alpha_on), (200, beta_on)]
        assert [await switches(rig) for rig in fleet.rigs] == swaps


async def test_a_model_held_by_none_goes_to_the_idle_daemon(fleet: Fleet) -> None:
    """gamma would start on daemon1 (its fallback lists daemon1 first), but daemon1 is
    streaming: daemon2, idle, takes it, and daemon1's stream is not cut."""
    async with aiohttp.ClientSession() as session:
        holder = {await loaded(rig): f"daemon{i + 1}" for i, rig in enumerate(fleet.rigs)}
        busy = holder["alpha"]
        idle = holder["beta"]
        stream = asyncio.ensure_future(chat(session, fleet, "alpha", tokens=400))
        # HAProxy sees the busy daemon refuse gamma (requests in flight) at its next check.
        await eventually(
            lambda: not fleet.up("fallback_gamma", busy) and fleet.up("fallback_gamma", idle),
            within=3, what="the streaming daemon out of gamma's fallback",
            context=fleet.servers,
        )  # fmt: skip
        status, answered_by, _ = await chat(session, fleet, "gamma")
        assert (status, answered_by) == (200, idle)
        streamed = await stream
        assert streamed[:2] == (200, busy)
        assert "tok399" in streamed[2] and streamed[2].rstrip().endswith("data: [DONE]")


async def test_a_daemon_mid_switch_gets_no_requests_for_the_model_it_leaves(
    fleet: Fleet,
) -> None:
    """The daemon holding gamma starts a slow switch to beta: gamma's requests meanwhile go
    to the other daemon, never to the one leaving gamma."""
    async with aiohttp.ClientSession() as session:
        holders = {await loaded(rig): i for i, rig in enumerate(fleet.rigs)}
        leaving = holders["gamma"]
        leaving_name, other_name = f"daemon{leaving + 1}", f"daemon{2 - leaving}"
        # beta is held by none now; its fallback keeps the daemon it chose before, the
        # one holding gamma, which is idle.
        to_beta = asyncio.ensure_future(chat(session, fleet, "beta"))
        await eventually(
            lambda: fleet.drained("model_gamma", leaving_name)
            and not fleet.up("model_gamma", leaving_name)
            and not fleet.up("fallback_gamma", leaving_name),
            within=3, what="HAProxy taking the switching daemon out of gamma's backends",
        )  # fmt: skip
        assert await loaded(fleet.rigs[leaving]) is None, "the switch ended before the test looked"
        status, answered_by, _ = await chat(session, fleet, "gamma")
        assert (status, answered_by) == (200, other_name)
        assert (await to_beta)[:2] == (200, leaving_name)


async def test_the_agent_weight_follows_the_load(fleet: Fleet) -> None:
    """Seen through HAProxy's socket: 100 % idle, 50 % with one request in flight."""
    async with aiohttp.ClientSession() as session:
        holders = {await loaded(rig): f"daemon{i + 1}" for i, rig in enumerate(fleet.rigs)}
        name = holders["beta"]
        await eventually(lambda: fleet.weight("model_beta", name) == 100, within=3)
        stream = asyncio.ensure_future(chat(session, fleet, "beta", tokens=300))
        await eventually(
            lambda: fleet.weight("model_beta", name) == 50, within=3, what="weight 50 while busy"
        )
        assert (await stream)[0] == 200
        await eventually(lambda: fleet.weight("model_beta", name) == 100, within=3)
        assert not fleet.drained("model_beta", name)


async def test_a_killed_daemon_loses_its_traffic_to_the_other(fleet: Fleet) -> None:
    """kill -9 of one daemon: within the check interval every request goes to the other,
    which swaps as needed; a 5xx only until HAProxy has marked the dead one down."""
    async with aiohttp.ClientSession() as session:
        holders = {await loaded(rig): i for i, rig in enumerate(fleet.rigs)}
        victim = holders["gamma"]
        victim_name, survivor_name = f"daemon{victim + 1}", f"daemon{2 - victim}"
        fleet.rigs[victim].stop_daemons(signal.SIGKILL)
        killed = time.monotonic()
        replies: list[tuple[float, int, str]] = []
        marked_down: float | None = None
        backends = ("model_gamma", "fallback_gamma", "model_beta", "fallback_beta")
        for model in ["gamma", "beta"] * 4:
            was_down = marked_down is not None
            status, answered_by, text = await chat(session, fleet, model)
            replies.append((time.monotonic() - killed, status, answered_by))
            if status >= 500:
                assert not was_down, f"a 5xx after the dead daemon was down: {replies}"
            else:
                assert (status, answered_by) == (200, survivor_name), (text, replies)
            if marked_down is None and not any(fleet.up(b, victim_name) for b in backends):
                marked_down = time.monotonic() - killed
        assert marked_down is not None and marked_down < 2.0, replies
        # At most the first request, to the dead daemon, before HAProxy knew.
        assert sum(1 for _, status, _ in replies if status >= 500) <= 1, replies
