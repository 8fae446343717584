"""`serve` on a terminal: a banner, then log lines for people rather than JSON."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
from typing import Any

import pytest

from orchestrator import __version__
from tests.rig import REPO_ROOT, Rig, free_port
from tests.waiting import eventually_blocking

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# structlog's console renderer: an ISO time, the level in brackets, the event.
CONSOLE_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(\w+)\s*\] (.*)$")


class Terminal:
    """The other end of a pseudo-terminal: what the program wrote, colours taken out."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.raw = b""

    def text(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program has closed its end
                break
            if not chunk:
                break
            self.raw += chunk
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r\n", "\n")

    def lines(self) -> list[str]:
        return self.text().splitlines()


def test_serve_on_a_terminal_speaks_to_people(rig: Rig) -> None:
    """Banner with address, dashboard, compose file, keys and each model's weights, console
    log lines and no JSON; SIGINT ends it cleanly."""
    rig.port = free_port()
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--compose", str(rig.compose_file),
         "--models-dir", str(rig.root / "models"), "--state-dir", str(rig.root / "state"),
         "--project-name", rig.project, "--port", str(rig.port)],
        cwd=REPO_ROOT, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    rig.processes.append(process)  # killed by the rig's clean-up if the test fails
    terminal = Terminal(master)
    try:
        eventually_blocking(
            lambda: any(line.startswith("  models") for line in terminal.lines()),
            within=60,
            what="the banner",
            context=terminal.text,
        )
        process.send_signal(signal.SIGINT)
        eventually_blocking(
            lambda: process.poll() is not None and "shutting down" in terminal.text(),
            within=20,
            what="serve to stop on SIGINT",
            context=terminal.text,
        )
        lines = terminal.lines()
    finally:
        os.close(master)
    assert process.returncode == 0, "\n".join(lines)
    assert not [line for line in lines if line.lstrip().startswith("{")], "\n".join(lines)
    start = lines.index(f"model-orchestrator {__version__}, project {rig.project}")
    hub = rig.root / "models" / "hub"
    assert lines[start + 1 : start + 6] == [
        f"  listening  127.0.0.1:{rig.port}",
        f"  dashboard  http://127.0.0.1:{rig.port}/",
        f"  compose    {rig.compose_file}",
        "  API keys   off: only this machine can reach the daemon",
        "  models     alpha    present",
    ]
    fix = f"hf download org/not-downloaded --cache-dir {hub}"
    assert f"             nocache  missing ({fix})" in lines
    logged = [match for line in lines if (match := CONSOLE_LINE.match(line))]
    assert ("info", "reconcile") in [(m[1], m[2].split()[0]) for m in logged]
    assert logged[-1][1] == "info" and logged[-1][2].startswith("shutting down")


def test_off_a_terminal_the_banner_is_one_serving_line(rig: Rig) -> None:
    """JSON logs carry the banner's facts in the serving line; a generated key by its file."""
    rig.start_daemon("--host", "0.0.0.0")

    def serving() -> dict[str, Any] | None:
        # The whole log (daemon_log() keeps its tail), complete lines only.
        text = sorted(rig.root.glob("daemon-*.log"))[-1].read_text()
        lines = [json.loads(line) for line in text.splitlines(keepends=True) if line[-1] == "\n"]
        return next((line for line in lines if line["event"] == "serving"), None)

    eventually_blocking(
        lambda: serving() is not None, what="the serving line", context=rig.daemon_log
    )
    line = serving()
    assert line is not None
    key_file = rig.root / "state" / "api-key"
    assert {k: line[k] for k in ("host", "port", "url", "dashboard", "keys", "key_file")} == {
        "host": "0.0.0.0",
        "port": rig.port,
        "url": f"http://127.0.0.1:{rig.port}",
        "dashboard": f"http://127.0.0.1:{rig.port}/",
        "keys": "on",
        "key_file": str(key_file),
    }
    assert line["compose"] == [str(rig.compose_file)]
    assert line["models"]["alpha"] == "present" and line["models"]["nocache"] == "missing"
    assert key_file.read_text().strip() not in rig.daemon_log()
