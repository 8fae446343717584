"""The stand-in image's sleep mode, in real containers.

Two engines share one simulated GPU the way two vLLM containers share a real one: a
named volume holds the lock file that the awake engine holds. The tests drive the
engines over their published ports as the daemon would and read what Docker says of
them (exit codes, logs).
"""

from __future__ import annotations

import json
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
from tests.rig import STANDIN_IMAGE
from tests.waiting import eventually_blocking

pytestmark = pytest.mark.integration

HEALTHY_WITHIN = 30.0
EXIT_WITHIN = 30


@dataclass
class Engine:
    container: Any

    @property
    def url(self) -> str:
        self.container.reload()
        port = self.container.ports["8000/tcp"][0]["HostPort"]
        return f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        return str(self.container.logs().decode(errors="replace"))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Status and body (JSON when there is one, else the text)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def healthy(self) -> bool:
        self.container.reload()
        assert self.container.status != "exited", self.logs()
        try:
            return self.call("GET", "/health")[0] == 200
        except OSError:
            # Before the engine opens its port, docker-proxy accepts and then drops.
            return False

    def is_sleeping(self) -> bool:
        status, body = self.call("GET", "/is_sleeping")
        assert status == 200, body
        return bool(body["is_sleeping"])

    def generate(self) -> tuple[int, Any]:
        return self.call("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})

    def exit_code(self) -> int:
        return int(self.container.wait(timeout=EXIT_WITHIN)["StatusCode"])


class Engines:
    """Stand-in containers on one models folder and one GPU volume, removed afterwards."""

    def __init__(self, client: docker.DockerClient, hub: Path) -> None:
        self.client = client
        self.hub = hub
        self.name = f"mo-sleep-{uuid.uuid4().hex[:8]}"
        self.gpu = client.volumes.create(name=f"{self.name}-gpu")
        self.containers: list[Any] = []

    def spawn(self, *, dev_mode: bool = True) -> Engine:
        container = self.client.containers.run(
            STANDIN_IMAGE,
            ["--model", "org/sleepy", "--enable-sleep-mode", "--gpu-memory-utilization", "0.9"],
            name=f"{self.name}-{len(self.containers)}",
            detach=True,
            ports={"8000/tcp": ("127.0.0.1", None)},
            environment={
                "HF_HUB_OFFLINE": "1",
                "STANDIN_LOAD_DELAY": "0.3",
                "STANDIN_GPU_LOCK": "/gpu/lock",
                "VLLM_SERVER_DEV_MODE": "1" if dev_mode else "0",
            },
            volumes={
                str(self.hub): {"bind": "/root/.cache/huggingface/hub", "mode": "ro"},
                self.gpu.name: {"bind": "/gpu", "mode": "rw"},
            },
        )
        self.containers.append(container)
        return Engine(container)

    def start(self, *, dev_mode: bool = True) -> Engine:
        engine = self.spawn(dev_mode=dev_mode)
        eventually_blocking(
            engine.healthy, within=HEALTHY_WITHIN, interval=0.1, context=engine.logs
        )
        return engine

    def remove(self) -> None:
        for container in self.containers:
            container.remove(force=True)
        self.gpu.remove(force=True)


@pytest.fixture
def engines(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[Engines]:
    hub = tmp_path / "hub"
    make_snapshot(hub, "org/sleepy")
    made = Engines(docker_client, hub)
    try:
        yield made
    finally:
        made.remove()


def test_sleep_and_wake_up_in_a_container(engines: Engines) -> None:
    engine = engines.start()
    assert not engine.is_sleeping()

    assert engine.call("POST", "/sleep?level=1") == (200, "")
    assert engine.is_sleeping()
    assert engine.call("GET", "/health") == (200, "")
    assert engine.call("GET", "/v1/models")[0] == 200

    assert engine.call("POST", "/wake_up") == (200, "")
    assert not engine.is_sleeping()
    assert engine.generate()[0] == 200


def test_without_dev_mode_there_is_no_sleep(engines: Engines) -> None:
    engine = engines.start(dev_mode=False)
    assert engine.call("POST", "/sleep") == (404, {"detail": "Not Found"})
    assert engine.call("GET", "/is_sleeping") == (404, {"detail": "Not Found"})


def test_two_containers_take_turns_on_the_gpu(engines: Engines) -> None:
    first = engines.start()

    refused = engines.spawn()
    assert refused.exit_code() != 0
    assert "CUDA out of memory" in refused.logs()

    assert first.call("POST", "/sleep?level=1") == (200, "")
    second = engines.start()

    status, body = first.call("POST", "/wake_up")
    assert status == 500 and "CUDA out of memory" in body["message"]
    assert first.is_sleeping()

    assert second.call("POST", "/sleep?level=1") == (200, "")
    assert first.call("POST", "/wake_up") == (200, "")
    assert not first.is_sleeping()
    assert first.generate()[0] == 200


def test_a_generation_while_asleep_kills_the_container(engines: Engines) -> None:
    engine = engines.start()
    assert engine.call("POST", "/sleep") == (200, "")

    status, _ = engine.generate()

    assert status == 500
    assert engine.exit_code() != 0
    assert "illegal memory access" in engine.logs()
