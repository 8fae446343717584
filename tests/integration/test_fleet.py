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
import time
from collections.abc import Iterator

import aiohttp
import docker
import pytest

from tests.fleet import Fleet, running_fleet
from tests.rig import Rig
from tests.waiting import eventually

pytestmark = pytest.mark.integration

CHECK_MS = 200


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), docker_client, check_ms=CHECK_MS) as made:
        # Every daemon has an agent check: haproxy-config warned of nothing.
        assert "agent-check" in made.config
        yield made


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
        backends = ("model_gamma", "fallback_gamma", "model_beta", "fallback_beta")

        async def marked_down() -> float:
            """Seconds from the kill until HAProxy has the dead daemon down everywhere."""
            await eventually(
                lambda: not any(fleet.up(b, victim_name) for b in backends),
                within=5, interval=0.02, what="the dead daemon down in every backend",
            )  # fmt: skip
            return time.monotonic() - killed

        down = asyncio.ensure_future(marked_down())
        replies: list[tuple[float, int, str]] = []
        for model in ["gamma", "beta"] * 4:
            sent = time.monotonic() - killed
            status, answered_by, text = await chat(session, fleet, model)
            replies.append((sent, status, answered_by))
            if status < 500:
                assert (status, answered_by) == (200, survivor_name), (text, replies)
        down_after = await down
        # Within a few check intervals (200 ms), not at a timeout's end.
        assert down_after < 1.0, (down_after, replies)
        late = [reply for reply in replies if reply[1] >= 500 and reply[0] >= down_after]
        assert late == [], f"a 5xx for a request sent after the dead daemon was down: {replies}"
        # At most the first request, to the dead daemon, before HAProxy knew.
        assert sum(1 for _, status, _ in replies if status >= 500) <= 1, replies
