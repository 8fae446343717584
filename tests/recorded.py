"""What Docker said about stand-in containers, recorded by tests/data/record_docker.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from orchestrator.docker import ContainerInfo, container_info

DATA = Path(__file__).resolve().parent / "data" / "docker"

State = Literal["running", "exited", "oom-killed", "restarting", "unhealthy"]


def inspect_document(state: State) -> dict[str, Any]:
    """``docker inspect`` of a stand-in container in ``state``, fresh for each call."""
    document = json.loads((DATA / f"inspect-{state}.json").read_text())
    assert isinstance(document, dict)
    return document


def info(state: State) -> ContainerInfo:
    """The daemon's view of the recorded container in ``state``."""
    return container_info(inspect_document(state))


def events() -> list[dict[str, Any]]:
    """``docker events --format '{{json .}}'``: a container created, started, stopped
    (SIGTERM, exit 0) and removed, then another created, started, crashed (exit 1), removed."""
    lines = (DATA / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def log_lines() -> list[str]:
    """The running stand-in's log, as ``docker logs --timestamps`` gives it."""
    lines = json.loads((DATA / "logs-running.json").read_text())
    assert isinstance(lines, list)
    return [str(line) for line in lines]


def listed() -> list[dict[str, Any]]:
    """docker's container list (``api.containers(all=True)``) of the recorded containers and
    two compose created and did not start: ``database``, and ``engine`` depending on it."""
    documents = json.loads((DATA / "list.json").read_text())
    assert isinstance(documents, list)
    return documents


def config_hashes() -> dict[str, str]:
    """``docker compose config --hash '*'`` of the project that created those two."""
    lines = (DATA / "config-hash.txt").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line.strip())
