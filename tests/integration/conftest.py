"""Integration rig: real Docker engine, Compose v2, the stand-in image, the daemon as a process.

Each test module gets its own compose project (so leftovers never collide) with a
user-style compose file in a temporary folder, a fake hub cache, and a helper to
run the daemon as a real subprocess on a free port.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import docker
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig

# The user's file as seed 002 found it: cache paths in --model, the models dir mounted at
# the cache root, offline mode off. The daemon has to fix all of it for the engine to load.
COMPOSE_TEMPLATE = """
x-engine: &engine
  image: {image}
  ports: ["127.0.0.1::8000"]
  environment:
    - HF_HUB_OFFLINE=0
    - STANDIN_LOAD_DELAY={delay}
  volumes:
    - ./models:/root/.cache/huggingface
  stop_grace_period: 5s

services:
  shared:
    image: {image}
    command: ["--model", "org/alpha"]
    environment: {{HF_HUB_OFFLINE: "1", STANDIN_LOAD_DELAY: "0"}}
    volumes: ["./models/hub:/root/.cache/huggingface/hub"]

  engine-alpha:
    <<: *engine
    profiles: ["alpha"]
    command: >
      --model /root/.cache/huggingface/org--alpha
      --max-model-len 4096

  engine-beta:
    <<: *engine
    profiles: ["beta"]
    depends_on: [shared]
    command: ["/root/.cache/huggingface/hub/models--org--beta/snapshots/{beta_hash}"]

  engine-crashy:
    <<: *engine
    profiles: ["crashy"]
    environment: {{STANDIN_CRASH: "1", STANDIN_LOAD_DELAY: "0.5"}}
    command: ["--model", "org/alpha"]

  engine-hangy:
    <<: *engine
    profiles: ["hangy"]
    environment: {{STANDIN_HANG: "1"}}
    command: ["--model", "org/alpha"]
    x-orchestrator: {{startup_timeout: 3}}

  engine-noimage:
    <<: *engine
    profiles: ["noimage"]
    image: model-orchestrator/not-built:never
    command: ["--model", "org/alpha"]

  engine-nocache:
    <<: *engine
    profiles: ["nocache"]
    command: ["--model", "org/not-downloaded"]
"""

LOAD_DELAY = 1.0
BETA_HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(STANDIN_IMAGE)
    except Exception as err:
        pytest.fail(
            f"integration tests need Docker and {STANDIN_IMAGE} (scripts/build-images.sh): {err}"
        )
    yield client
    client.close()


@pytest.fixture(scope="module")
def rig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rig")
    hub = root / "models" / "hub"
    make_snapshot(hub, "org/alpha")
    make_snapshot(hub, "org/beta", revision=BETA_HASH)
    (root / "docker-compose.yml").write_text(
        COMPOSE_TEMPLATE.format(image=STANDIN_IMAGE, delay=LOAD_DELAY, beta_hash=BETA_HASH)
    )
    return root


@pytest.fixture
def rig(rig_root: Path, docker_client: docker.DockerClient) -> Iterator[Rig]:
    made = Rig(root=rig_root, project=f"mo-it-{uuid.uuid4().hex[:8]}", docker=docker_client)
    state = rig_root / "state"
    if state.exists():
        for item in state.iterdir():
            item.unlink()
    try:
        yield made
    finally:
        made.clean()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver_path = shutil.which("chromedriver")
    chromium = shutil.which("chromium")
    if driver_path is None or chromium is None:
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver (.ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client for the daemon; a switch can take a while (load delays, rollbacks)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session
