"""An engine on the host's network (network_mode: host), as many home labs run vLLM: it
publishes no port, and the daemon reaches it on the host at the port it listens on."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig, free_port

pytestmark = pytest.mark.integration

COMPOSE = """
services:
  engine-alpha:
    image: {image}
    profiles: ["alpha"]
    network_mode: host
    environment: {{STANDIN_LOAD_DELAY: "0.5"}}
    volumes: ["./models:/root/.cache/huggingface"]
    command: ["--model", "org/alpha", "--port", "{port}"]
"""


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("host-network")
    make_snapshot(root / "models" / "hub", "org/alpha")
    (root / "docker-compose.yml").write_text(COMPOSE.format(image=STANDIN_IMAGE, port=free_port()))
    return root


def test_a_host_network_engine_is_reached_on_the_host(rig: Rig) -> None:
    rig.shared_services = ()
    rig.start_daemon()
    switched = requests.post(f"{rig.url}/switch", json={"model": "alpha"}, timeout=120)
    assert switched.status_code == 200, switched.text
    port = (rig.root / "docker-compose.yml").read_text().split('"--port", "')[1].split('"')[0]
    assert switched.json()["status"]["upstream"] == f"http://127.0.0.1:{port}"
    body: dict[str, str | int] = {"model": "alpha", "prompt": "hi", "max_tokens": 2}
    answer = requests.post(f"{rig.url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert rig.model_containers() == ["engine-alpha"]
