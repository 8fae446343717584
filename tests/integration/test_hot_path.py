"""The switch's hot path on the real engine: compose makes the containers ahead, the switch
starts and stops them through the docker API, and what is left behind is cleaned up.

The daemon runs with debug logs, which name every compose process it runs: that is how
these tests see which path a switch took.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import aiohttp
import docker
import pytest
import yaml

from tests.rig import SERVICE_LABEL, Rig
from tests.waiting import eventually

pytestmark = pytest.mark.integration


async def switch(http: aiohttp.ClientSession, rig: Rig, model: str) -> dict[str, Any]:
    async with http.post(f"{rig.url}/switch", json={"model": model}) as response:
        body = await response.json()
        assert response.status == 200, body
        return dict(body)


def compose_calls(rig: Rig) -> list[list[str]]:
    """The compose processes the daemon ran, in order: each one's arguments after the file."""
    calls = []
    for log in sorted(rig.root.glob("daemon-*.log")):
        for line in log.read_text().splitlines():
            if '"event": "compose"' in line:
                argv = json.loads(line)["argv"]
                if "--file" in argv:
                    calls.append(argv[argv.index("--file") + 2 :])
    return calls


def ups(rig: Rig) -> list[list[str]]:
    return [call for call in compose_calls(rig) if call[2:4] == ["up", "--detach"]]


def compose(rig: Rig, *args: str) -> str:
    """docker compose on the rig's project, as a user would run it."""
    argv = [
        "docker",
        "compose",
        "--project-name",
        rig.project,
        "--project-directory",
        str(rig.root),
    ]
    return subprocess.run([*argv, *args], capture_output=True, text=True, check=True).stdout


def containers_of(rig: Rig, service: str) -> list[docker.models.containers.Container]:
    return [c for c in rig.containers(running_only=False) if c.labels[SERVICE_LABEL] == service]


def ready_to_start(rig: Rig, service: str) -> bool:
    """The service has one container, created and never started: the next start's."""
    found = containers_of(rig, service)
    return len(found) == 1 and found[0].status == "created"


async def test_switches_start_and_stop_without_compose(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Once compose has made the containers (ahead, at start), switching back and forth runs
    no `compose up`: the containers are started and stopped through the docker API, the
    old ones removed and fresh ones made behind, and compose still knows them as its own."""
    rig.start_daemon("--log-level", "debug")
    await eventually(lambda: ready_to_start(rig, "engine-alpha"), within=60, interval=0.1)
    await switch(http, rig, "alpha")
    assert ups(rig) == []
    first_alpha = containers_of(rig, "engine-alpha")[0].id
    await eventually(lambda: ready_to_start(rig, "engine-crashy"), within=60, interval=0.1)
    for model in ("crashy", "alpha"):
        # crashy fails and rolls back to alpha: both ways through the API
        async with http.post(f"{rig.url}/switch", json={"model": model}) as response:
            assert response.status in {200, 502}, await response.text()
    assert ups(rig) == []
    # alpha ran twice, each time in a container of its own; the first is gone.
    (running,) = containers_of(rig, "engine-alpha")
    assert running.id != first_alpha and running.status == "running"
    await eventually(lambda: ready_to_start(rig, "engine-crashy"), within=30, interval=0.1)
    listed = await asyncio.to_thread(compose, rig, "ps", "--format", "{{.Service}}")
    assert listed.split() == ["engine-alpha"]


async def test_a_container_out_of_date_is_made_again(rig: Rig, http: aiohttp.ClientSession) -> None:
    """A container made from another version of the file (its config hash differs) is not
    started as it is: compose makes it again before the start."""
    rig.start_daemon()
    await eventually(lambda: ready_to_start(rig, "engine-alpha"), within=60, interval=0.1)
    rig.stop_daemons()
    # What an older daemon's copy made: the same service with one more variable.
    copy = yaml.safe_load((rig.root / "state" / "compose.yml").read_text())
    copy["services"]["engine-alpha"]["environment"]["STALE_MARK"] = "1"
    older = rig.root / "older.yml"
    older.write_text(yaml.safe_dump(copy))
    await asyncio.to_thread(
        compose, rig, "--file", str(older), "--profile", "alpha",
        "up", "--no-start", "--force-recreate", "--no-deps", "engine-alpha",
    )  # fmt: skip
    (stale,) = containers_of(rig, "engine-alpha")
    assert "STALE_MARK=1" in stale.attrs["Config"]["Env"]
    rig.start_daemon("--log-level", "debug")
    await switch(http, rig, "alpha")
    (running,) = containers_of(rig, "engine-alpha")
    assert running.id != stale.id
    assert "STALE_MARK=1" not in running.attrs["Config"]["Env"]


async def test_an_engine_that_dies_is_recorded_and_removed(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """An engine killed behind the daemon's back: /status says failed, the history keeps its
    last log lines, and no exited container is left; a fresh one waits for the next start."""
    rig.start_daemon()
    await switch(http, rig, "alpha")
    (engine,) = containers_of(rig, "engine-alpha")
    engine.kill(signal="SIGKILL")

    async def recorded() -> bool:
        async with http.get(f"{rig.url}/switches") as response:
            switches = (await response.json())["switches"]
        return bool(switches and switches[0]["kind"] == "died")

    await eventually(recorded, within=30, interval=0.1, what="the death in the history")
    async with http.get(f"{rig.url}/switches") as response:
        death = (await response.json())["switches"][0]
    assert (death["from"], death["outcome"]) == ("alpha", "failed")
    assert death["error"]["exit_code"] == 137
    assert "Application startup complete" in death["error"]["log_tail"]
    async with http.get(f"{rig.url}/status") as response:
        assert (await response.json())["state"] == "failed"
    await eventually(lambda: ready_to_start(rig, "engine-alpha"), within=30, interval=0.1)
    assert all(c.id != engine.id for c in rig.containers(running_only=False))
    await switch(http, rig, "alpha")
