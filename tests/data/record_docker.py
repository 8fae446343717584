"""Record what Docker says about stand-in containers, for the unit tests of docker.py.

Run from the repository root with the Docker engine and the stand-in image at hand:

    python3 -m tests.data.record_docker

It runs containers of ``model-orchestrator/standin:test`` labelled as a compose project
would label them, in the states the daemon has to tell apart (running, exited with an
error, killed for lack of memory, restarting, unhealthy), and writes under
tests/data/docker/:

- ``inspect-<state>.json``: ``docker inspect`` of one container, as the SDK returns it;
- ``events.jsonl``: ``docker events --format '{{json .}}'`` while one container is
  created, started, stopped and removed, and another crashes and is removed, one event
  per line;
- ``logs-running.json``: the running container's log lines with ``--timestamps``;
- ``list.json``: docker's container list (the SDK's ``api.containers(all=True)``) with
  those containers and two that compose created but did not start, an engine that
  depends on a database; ``config-hash.txt``: ``docker compose config --hash '*'`` of
  that project, which compose's labels on them should match.

Every container and the cache folder are removed afterwards, whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fakes import make_snapshot
from tests.rig import PROJECT_LABEL, SERVICE_LABEL, STANDIN_IMAGE
from tests.waiting import eventually_blocking

OUT = Path(__file__).resolve().parent / "docker"
PROJECT = "mo-record"
HEALTH_CHECK = "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=1)"


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def inspect(name: str) -> dict[str, Any]:
    (document,) = json.loads(docker("inspect", name))
    return dict(document)


def run(name: str, service: str, *options: str, command: tuple[str, ...] = ()) -> None:
    """``docker run -d`` a stand-in with a compose project's labels."""
    docker(
        "run", "--detach", "--name", name,
        "--label", f"{PROJECT_LABEL}={PROJECT}", "--label", f"{SERVICE_LABEL}={service}",
        *options, STANDIN_IMAGE, *command,
    )  # fmt: skip


def until(what: str, condition: Callable[[], bool]) -> None:
    eventually_blocking(condition, within=60, interval=0.02, what=what)


def until_started(name: str) -> None:
    until(f"{name} started", lambda: "startup complete" in docker("logs", name, check=False))


def save(name: str, content: object) -> None:
    path = OUT / name
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(Path.cwd())}")


def record(hub: Path, suffix: str) -> None:
    cache = ["--volume", f"{hub}:/root/.cache/huggingface/hub:ro", "--env", "HF_HUB_OFFLINE=1"]
    model = ("--model", "org/tiny")
    instant = ["--env", "STANDIN_LOAD_DELAY=0"]

    # Published on every address: docker lists an IPv4 and an IPv6 binding.
    running = f"{PROJECT}-running-{suffix}"
    run(running, "engine", "--publish", "8000", *cache, *instant, command=model)
    until_started(running)
    save("inspect-running.json", inspect(running))
    save("logs-running.json", docker("logs", "--timestamps", running).splitlines())

    exited = f"{PROJECT}-exited-{suffix}"
    run(exited, "engine", *cache, *instant, "--env", "STANDIN_CRASH=1", command=model)
    docker("wait", exited)
    save("inspect-exited.json", inspect(exited))

    # The stand-in image's python, told to hold more than the container may have.
    oom = f"{PROJECT}-oom-{suffix}"
    run(
        oom, "engine", "--memory", "32m", "--memory-swap", "32m", "--entrypoint", "python3",
        command=("-c", "held = b'x' * (1 << 30)"),
    )  # fmt: skip
    docker("wait", oom)
    save("inspect-oom-killed.json", inspect(oom))

    # Crashes at once and is started again by docker: caught between two runs.
    restarting = f"{PROJECT}-restarting-{suffix}"
    run(restarting, "engine", "--restart", "always", *cache, *instant,
        "--env", "STANDIN_CRASH=1", command=model)  # fmt: skip
    until("restarting", lambda: inspect(restarting)["State"]["Status"] == "restarting")
    save("inspect-restarting.json", inspect(restarting))

    # Up and listening, but its /health answers 503: docker's healthcheck turns unhealthy.
    unhealthy = f"{PROJECT}-unhealthy-{suffix}"
    run(
        unhealthy, "sidecar", "--publish", "127.0.0.1::8000", *cache, *instant,
        "--env", "STANDIN_HEALTH_503_FOR=3600",
        "--health-cmd", f'python3 -c "{HEALTH_CHECK}"',
        "--health-interval", "1s", "--health-retries", "1",
        command=model,
    )  # fmt: skip
    until(
        "unhealthy",
        lambda: (inspect(unhealthy)["State"].get("Health") or {}).get("Status") == "unhealthy",
    )
    save("inspect-unhealthy.json", inspect(unhealthy))


COMPOSE_PROJECT = """
services:
  database:
    image: {image}
    command: ["--model", "org/tiny"]
  engine:
    image: {image}
    profiles: ["tiny"]
    depends_on: [database]
    command: ["--model", "org/tiny"]
    stop_grace_period: 7s
"""


def record_list(folder: Path) -> None:
    """Two services created by compose, then docker's list of every container recorded."""
    import docker as sdk

    (folder / "compose.yml").write_text(COMPOSE_PROJECT.format(image=STANDIN_IMAGE))
    compose = ["compose", "--project-name", PROJECT, "--file", str(folder / "compose.yml")]
    docker(*compose, "--profile", "*", "up", "--no-start", "engine")
    hashes = docker(*compose, "--profile", "*", "config", "--hash", "*")
    (OUT / "config-hash.txt").write_text(hashes)
    print(f"wrote {(OUT / 'config-hash.txt').relative_to(Path.cwd())}")
    listed = sdk.from_env().api.containers(
        all=True, filters={"label": [f"{PROJECT_LABEL}={PROJECT}"]}
    )
    save("list.json", sorted(listed, key=lambda c: c["Names"][0]))


def record_events(hub: Path, suffix: str) -> None:
    """create, start, die (after SIGTERM) and destroy of one container, then create, start,
    die (a crash, exit 1) and destroy of another, as docker events."""
    since = docker("system", "info", "--format", "{{json .SystemTime}}").strip().strip('"')
    names = [f"{PROJECT}-events-{suffix}", f"{PROJECT}-crash-{suffix}"]
    for name, crash in zip(names, ("0", "1"), strict=True):
        docker(
            "create", "--name", name,
            "--label", f"{PROJECT_LABEL}={PROJECT}", "--label", f"{SERVICE_LABEL}=engine",
            "--volume", f"{hub}:/root/.cache/huggingface/hub:ro",
            "--env", "HF_HUB_OFFLINE=1", "--env", "STANDIN_LOAD_DELAY=0",
            "--env", f"STANDIN_CRASH={crash}",
            STANDIN_IMAGE, "--model", "org/tiny",
        )  # fmt: skip
        docker("start", name)
        if crash == "1":
            docker("wait", name)
        else:
            until_started(name)
            docker("stop", name)
        docker("rm", name)
    until_now = docker("system", "info", "--format", "{{json .SystemTime}}").strip().strip('"')
    lines = docker(
        "events", "--since", since, "--until", until_now, "--format", "{{json .}}",
        "--filter", "type=container", *(f"--filter=container={name}" for name in names),
    ).splitlines()  # fmt: skip
    (OUT / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    print(f"wrote {(OUT / 'events.jsonl').relative_to(Path.cwd())}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as folder:
        hub = Path(folder) / "hub"
        make_snapshot(hub, "org/tiny")
        try:
            record(hub, suffix)
            record_list(Path(folder))
            record_events(hub, suffix)
        finally:
            names = docker("ps", "--all", "--quiet", "--filter", f"label={PROJECT_LABEL}={PROJECT}")
            for container in names.split():
                docker("rm", "--force", container, check=False)
            docker("network", "rm", f"{PROJECT}_default", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
