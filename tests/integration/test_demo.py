"""`model-orchestrator demo` end to end: the commands it prints, run as printed, the dashboard
in headless Chromium, and Ctrl-C leaving no container."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from orchestrator.demo import PROJECT
from tests.rig import REPO_ROOT, free_port
from tests.waiting import eventually_blocking

pytestmark = pytest.mark.integration

# The base the CI machine has without a registry (scripts/build-images.sh makes it).
BASE_IMAGE = "mo-base:bookworm"
SCREENSHOT = REPO_ROOT / "tests" / "artifacts" / "demo-dashboard.png"


def demo_containers(client: docker.DockerClient) -> list[str]:
    found = client.containers.list(
        all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
    )
    return [c.name for c in found]


@pytest.fixture
def demo(
    tmp_path: Path, docker_client: docker.DockerClient
) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    port = free_port()
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "demo", "--dir", str(tmp_path / "demo"),
             "--base-image", BASE_IMAGE, "--port", str(port)],
            cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        eventually_blocking(
            lambda: "Press Ctrl-C" in output.read_text() or process.poll() is not None,
            within=240,
            what="the demo's instructions",
        )
        assert process.poll() is None, output.read_text()
        yield process, output, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        for container in docker_client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
        ):
            container.remove(force=True)


def printed_commands(text: str) -> list[str]:
    return [line.split("$ ", 1)[1] for line in text.splitlines() if line.startswith("     $ ")]


def run(command: str) -> str:
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_demo_as_a_new_user_runs_it(
    demo: tuple[subprocess.Popen[str], Path, str],
    browser: webdriver.Chrome,
    docker_client: docker.DockerClient,
) -> None:
    """Switch with curl, chat with the openai client, watch /health swap, see the dashboard
    say "demo engine", and Ctrl-C: the daemon ends and takes the demo's containers along."""
    process, output, url = demo
    text = output.read_text()
    assert f"Dashboard: {url}/" in text
    switch, chat, watch, crash = printed_commands(text)

    assert '"outcome": "ok"' in run(switch)
    answer = run(chat)
    assert answer.startswith("[demo engine: generated filler text, not a model]"), answer
    codes = run(watch).split()
    assert "503" in codes and codes[-1] == "200", codes  # swapping, then ready
    rolled_back = run(crash)
    assert "rolled back to tiny-chat" in rolled_back, rolled_back

    browser.get(url + "/")
    wait = WebDriverWait(
        browser, 30, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    wait.until(lambda b: "demo engine" in b.find_element(By.ID, "models").text)
    wait.until(lambda b: "ready: tiny-chat" in b.find_element(By.ID, "state-badge").text)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert demo_containers(docker_client)  # tiny-chat runs

    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0, output.read_text()
    assert re.search(r"demo stopped; its containers are removed", output.read_text())
    assert demo_containers(docker_client) == []
