"""The attacks of issue 9 against the real daemon on the real engine: each is refused and
nothing changes (no container, no registry row, no file); the limits hold under load."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
import yaml

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, Rig

pytestmark = pytest.mark.integration

REGISTRY_ENV = {"ORCHESTRATOR_ENGINE_IMAGE": STANDIN_IMAGE, "ORCHESTRATOR_ENGINE_GPUS": "none"}
ATTACK = '{"repo": "Org/Name", "id": "x", "image": "attacker/image"}'


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with http.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


def registry_services(rig: Rig) -> dict[str, Any]:
    rendered = yaml.safe_load((rig.root / "state" / "registry-compose.yml").read_text())
    return dict(rendered.get("services") or {})


async def test_requests_from_pages_and_strangers_change_nothing(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Every attack is refused, and afterwards no container, row or file exists for it."""
    rig.start_daemon(env=REGISTRY_ENV)
    url = rig.url
    form = aiohttp.FormData({"repo": "Org/Name", "image": "attacker/image"})
    multipart = aiohttp.FormData({"repo": "Org/Name"})
    multipart.add_field("image", b"attacker/image", filename="x")
    refused = {
        "text/plain /models": await status_of(
            http, "POST", f"{url}/models", data=ATTACK, headers={"Content-Type": "text/plain"}
        ),
        "text/plain /switch": await status_of(
            http,
            "POST",
            f"{url}/switch",
            data='{"model": "alpha"}',
            headers={"Content-Type": "text/plain"},
        ),
        "form /models": await status_of(http, "POST", f"{url}/models", data=form),
        "multipart /models": await status_of(http, "POST", f"{url}/models", data=multipart),
        "foreign origin": await status_of(
            http,
            "POST",
            f"{url}/switch",
            json={"model": "alpha"},
            headers={"Origin": "http://evil.example"},
        ),
        "cross-site": await status_of(
            http,
            "POST",
            f"{url}/models",
            json={"repo": "Org/Name", "id": "x"},
            headers={"Sec-Fetch-Site": "cross-site"},
        ),
        "rebound host": await status_of(
            http,
            "POST",
            f"{url}/switch",
            json={"model": "alpha"},
            headers={"Host": f"evil.example:{rig.port}"},
        ),
        "rebound read": await status_of(
            http, "GET", f"{url}/status", headers={"Host": "evil.example"}
        ),
        "host path": await status_of(http, "POST", f"{url}/models", json={"path": "/"}),
        "foreign image": await status_of(
            http, "POST", f"{url}/models", json={"repo": "Org/Name", "image": "attacker/image"}
        ),
        "bad revision": await status_of(
            http, "POST", f"{url}/models/alpha/pull", json={"revision": "../../../../etc"}
        ),
    }
    assert refused == {
        "text/plain /models": 415,
        "text/plain /switch": 415,
        "form /models": 415,
        "multipart /models": 415,
        "foreign origin": 403,
        "cross-site": 403,
        "rebound host": 403,
        "rebound read": 403,
        "host path": 400,
        "foreign image": 400,
        "bad revision": 400,
    }
    assert rig.ever_started() == []
    async with http.get(f"{url}/models") as response:
        ids = {model["id"] for model in (await response.json())["models"]}
    assert "x" not in ids and "Name" not in ids
    assert registry_services(rig) == {}
    assert "attacker" not in (rig.root / "state" / "compose.yml").read_text()
    assert "pull started" not in rig.daemon_log()


async def test_a_dollar_in_a_registry_field_reaches_the_container_literally(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Names are written with "$" doubled; fields where "$" has no business refuse it."""
    make_snapshot(rig.root / "models" / "hub", "org/gamma")
    env = {**REGISTRY_ENV, "HF_TOKEN": "hf-secret-token"}
    rig.start_daemon(env=env)
    name = "${HF_TOKEN} and ${HF_TOKEN:?boom} and $$"
    body = {
        "repo": "org/gamma",
        "id": "gamma",
        "display_name": name,
        "metadata": {"note": "${HF_TOKEN}"},
    }
    async with http.post(f"{rig.url}/models", json=body) as response:
        created = await response.json()
    assert response.status == 201, created
    assert created["model"]["display_name"] == name
    for field, value in (
        ("image", "model-orchestrator/standin:${HF_TOKEN}"),
        ("path", "/srv/$HOME/x"),
        ("id", "a$b"),
        ("repo", "org/${HF_TOKEN}"),
    ):
        extra = {} if field in {"repo", "path"} else {"repo": "org/gamma"}
        async with http.post(f"{rig.url}/models", json={**extra, field: value}) as response:
            answer = await response.json()
        assert response.status == 400, (field, answer)

    # Compose reads the daemon's copy as it will run it, with the secret in its environment.
    config = await asyncio.to_thread(
        subprocess.run,
        [
            "docker",
            "compose",
            "--project-directory",
            str(rig.root),
            "--file",
            str(rig.root / "state" / "compose.yml"),
            "--profile",
            "gamma",
            "config",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_TOKEN": "hf-secret-token"},
    )
    assert config.returncode == 0, config.stderr
    assert "hf-secret-token" not in config.stdout
    service = yaml.safe_load(config.stdout)["services"]["model-gamma"]
    assert service["x-orchestrator"]["display_name"] == name.replace("$", "$$")

    # The daemon starts again on that registry (it used to hang on ${HF_TOKEN:?...}).
    rig.stop_daemons()
    rig.start_daemon(env=env)
    async with http.get(f"{rig.url}/models/gamma") as response:
        assert (await response.json())["model"]["display_name"] == name
    async with http.post(f"{rig.url}/switch", json={"model": "gamma"}) as response:
        assert response.status == 200, await response.text()


def test_a_lan_bind_without_keys_requires_the_generated_key(rig: Rig) -> None:
    """--host 0.0.0.0 with no keys: a key is made (0600), logged by path only, and required."""
    rig.start_daemon("--host", "0.0.0.0")
    key_file = rig.root / "state" / "api-key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    log = rig.daemon_log()
    assert str(key_file) in log and key not in log
    assert call(f"{rig.url}/stop", {}) == 401
    assert call(f"{rig.url}/stop", {}, key="wrong") == 403
    assert call(f"{rig.url}/stop", {}, key=key) == 200
    assert call(f"{rig.url}/health/live") == 200

    rig.stop_daemons()
    key_file.unlink()
    rig.start_daemon("--host", "0.0.0.0", "--insecure-no-auth")
    assert call(f"{rig.url}/stop", {}) == 200
    assert "without API keys on a non-loopback address" in rig.daemon_log()
    assert not key_file.exists()


def call(url: str, body: dict[str, Any] | None = None, key: str | None = None) -> int:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


# --- projects of their own ----------------------------------------------------------------


@pytest.fixture
def own_rig(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Rig]:
    root = tmp_path / "project"
    make_snapshot(root / "models" / "hub", "org/alpha")
    made = Rig(root=root, project=f"mo-sec-{uuid.uuid4().hex[:8]}", docker=docker_client)
    made.shared_services = ()
    try:
        yield made
    finally:
        made.clean()


def test_a_compose_error_at_start_exits_within_seconds(own_rig: Rig) -> None:
    """A file compose refuses stops the daemon with a message and a non-zero code, no hang."""
    own_rig.compose_file.write_text(
        f"""
services:
  engine:
    image: {STANDIN_IMAGE}
    profiles: [alpha]
    command: ["--model", "org/alpha"]
    environment: {{NEEDED: "${{NOPE:?set NOPE first}}"}}
"""
    )
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "serve",
            "--compose",
            str(own_rig.compose_file),
            "--models-dir",
            str(own_rig.root / "models"),
            "--state-dir",
            str(own_rig.root / "state"),
            "--project-name",
            own_rig.project,
            "--port",
            "0",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert time.monotonic() - began < 20
    assert "set NOPE first" in done.stderr + done.stdout


def test_compose_runs_without_the_daemons_secrets(own_rig: Rig) -> None:
    """The daemon's keys never reach compose; the Hub token only because the file names it."""
    own_rig.compose_file.write_text(
        f"""
services:
  engine:
    image: {STANDIN_IMAGE}
    profiles: [alpha]
    command: ["--model", "org/alpha"]
    ports: ["127.0.0.1::8000"]
    environment:
      STANDIN_LOAD_DELAY: "0"
      SEEN_KEYS: "${{ORCHESTRATOR_API_KEYS:-absent}}"
      SEEN_TOKEN: "${{HF_TOKEN:-absent}}"
"""
    )
    own_rig.start_daemon(env={"ORCHESTRATOR_API_KEYS": "key-1", "HF_TOKEN": "hf-token"})
    assert call(f"{own_rig.url}/switch", {"model": "alpha"}, key="key-1") == 200
    (engine,) = own_rig.containers()
    environment = dict(item.split("=", 1) for item in engine.attrs["Config"]["Env"])
    assert environment["SEEN_KEYS"] == "absent"
    assert environment["SEEN_TOKEN"] == "hf-token"


# --- load -----------------------------------------------------------------------------------


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def health_latencies(url: str, count: int) -> list[float]:
    latencies = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            began = time.perf_counter()
            async with session.get(f"{url}/health") as response:
                await response.read()
            latencies.append(time.perf_counter() - began)
    return sorted(latencies)


async def test_half_open_connections_and_streams_leave_health_answering(
    rig: Rig, http: aiohttp.ClientSession, many_descriptors: None
) -> None:
    """1,000 silent or slow connections and 64 event streams: /health p99 under 50 ms, the
    daemon's descriptors bounded, slow clients dropped, and no flood in the log."""
    process = rig.start_daemon(
        env={
            "ORCHESTRATOR_MAX_CONNECTIONS": "300",
            "ORCHESTRATOR_HEADER_TIMEOUT": "3",
            "ORCHESTRATOR_MAX_STREAMS": "64",
        }
    )
    async with http.post(f"{rig.url}/switch", json={"model": "alpha"}) as response:
        assert response.status == 200
    streams = [await http.get(f"{rig.url}/events") for _ in range(64)]
    try:
        assert all(stream.status == 200 for stream in streams)
        async with http.get(f"{rig.url}/events") as extra:
            assert extra.status == 503
        silent: list[socket.socket] = []
        for number in range(1000):
            sock = socket.create_connection(("127.0.0.1", rig.port))
            if number % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            silent.append(sock)
        try:
            latencies = await health_latencies(rig.url, 300)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            open_now = descriptors(process.pid)
            print(f"/health p99 {p99 * 1000:.1f} ms with 1,064 clients; daemon fds {open_now}")
            assert p99 < 0.050, f"/health p99 {p99 * 1000:.1f} ms"
            assert open_now < 300 + 150
        finally:
            for sock in silent:
                sock.close()
    finally:
        for stream in streams:
            stream.close()
    log = (rig.root / "daemon-0.log").read_text()  # the whole log of this test's daemon
    assert log.count("Too many open files") <= 2
    assert len(log) < 200_000, "the daemon's log was flooded"


async def test_slow_headers_are_dropped(rig: Rig) -> None:
    """A connection that has not finished its headers within header_timeout is closed."""
    rig.start_daemon(env={"ORCHESTRATOR_HEADER_TIMEOUT": "1"})
    sock = socket.create_connection(("127.0.0.1", rig.port))
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    sock.settimeout(10)
    began = time.monotonic()
    assert sock.recv(1024) == b""  # closed by the daemon, not answered
    assert time.monotonic() - began < 5
    sock.close()


async def test_log_followers_share_one_docker_stream(rig: Rig, http: aiohttp.ClientSession) -> None:
    """30 followers of one model's log cost one docker stream; the 31st is turned away."""
    process = rig.start_daemon(env={"ORCHESTRATOR_MAX_STREAMS": "30"})
    async with http.post(f"{rig.url}/switch", json={"model": "alpha"}) as response:
        assert response.status == 200
    before = threads(process.pid)
    followers = [
        await http.get(f"{rig.url}/models/alpha/logs?follow=true&tail=3") for _ in range(30)
    ]
    try:
        assert all(f.status == 200 for f in followers)
        async with http.get(f"{rig.url}/models/alpha/logs?follow=true") as extra:
            assert extra.status == 503
        assert threads(process.pid) <= before + 3
        async with http.post(
            f"{rig.url}/v1/completions",
            json={"model": "alpha", "prompt": "marker", "max_tokens": 2},
        ) as response:
            assert response.status == 200

        async def sees_the_request(follower: aiohttp.ClientResponse) -> None:
            while b"POST /v1/completions" not in await follower.content.readline():
                pass

        await asyncio.wait_for(asyncio.gather(*(sees_the_request(f) for f in followers)), 30)
    finally:
        for follower in followers:
            follower.close()
