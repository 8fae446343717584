"""The start gate: its script run by a real /bin/sh, its rewrite of a service, its files."""

from __future__ import annotations

import asyncio
import io
import signal
import tarfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator import gate
from orchestrator.gate import ImageDefaults, gate_service, is_gated

WAIT = 10.0  # seconds any step below may take before the test fails


async def run_gate(folder: Path, *command: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        gate.SHELL,
        "-c",
        gate.script(str(folder)),
        gate.SCRIPT_NAME,
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode().rstrip("\n")


def hold(folder: Path) -> Path:
    folder.mkdir()
    (folder / gate.HOLD_FILE).touch()
    return folder


class TestScript:
    async def test_held_until_the_signal_then_the_engine_runs_in_its_place(
        self, tmp_path: Path
    ) -> None:
        """With a hold file the script says it waits and runs nothing until SIGWINCH; then
        the engine replaces it (same process), with its arguments intact."""
        folder = hold(tmp_path / "gate")
        process = await run_gate(folder, "sh", "-c", 'echo "ran $$ $0"; exit 7', "a b $x")
        assert await line(process) == gate.HELD_LINE
        # Held: the gate's sleep has a long way to go, and nothing ran.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(line(process), 0.3)
        process.send_signal(signal.SIGWINCH)
        assert await line(process) == f"ran {process.pid} a b $x"
        assert await asyncio.wait_for(process.wait(), WAIT) == 7
        assert not folder.exists()  # a later start of the same container is not held

    async def test_without_a_hold_file_the_engine_runs_at_once(self, tmp_path: Path) -> None:
        process = await run_gate(tmp_path / "absent", "echo", "engine")
        assert await line(process) == "engine"
        assert await asyncio.wait_for(process.wait(), WAIT) == 0

    async def test_a_stop_while_held_ends_it_without_running_the_engine(
        self, tmp_path: Path
    ) -> None:
        """As PID 1 in a container the shell would ignore SIGTERM without its trap."""
        process = await run_gate(hold(tmp_path / "gate"), "echo", "engine")
        assert await line(process) == gate.HELD_LINE
        process.terminate()
        assert await asyncio.wait_for(process.wait(), WAIT) == 143
        assert process.stdout is not None
        assert await process.stdout.read() == b""

    async def test_the_second_signal_does_the_engine_no_harm(self, tmp_path: Path) -> None:
        """The daemon signals twice; the second finds the engine past the gate, and
        SIGWINCH's default action is to be ignored."""
        engine = ("sh", "-c", "echo started; read line; echo alive")
        process = await run_gate(hold(tmp_path / "gate"), *engine)
        assert await line(process) == gate.HELD_LINE
        process.send_signal(signal.SIGWINCH)
        assert await line(process) == "started"
        process.send_signal(signal.SIGWINCH)
        await asyncio.sleep(gate.SECOND_SIGNAL_AFTER)
        assert process.returncode is None
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        assert await line(process) == "alive"
        assert await asyncio.wait_for(process.wait(), WAIT) == 0


def service(**fields: Any) -> dict[str, Any]:
    return {"image": "vllm/vllm-openai:v0.11.0", **fields}


VLLM = {"vllm/vllm-openai:v0.11.0": ImageDefaults(("vllm", "serve"), None)}


class TestGateService:
    def test_the_images_entrypoint_goes_behind_the_gate(self) -> None:
        rewritten = service(command=["--model", "org/m"])
        assert gate_service(rewritten, VLLM) is not None
        assert rewritten["entrypoint"] == [
            gate.SHELL, "-c", gate.SCRIPT, gate.SCRIPT_NAME, "vllm", "serve",
        ]  # fmt: skip
        assert rewritten["command"] == ["--model", "org/m"]
        assert is_gated(rewritten)

    def test_the_services_own_entrypoint_goes_behind_the_gate(self) -> None:
        rewritten = service(entrypoint=["python3", "-m", "vllm.entrypoints.openai.api_server"])
        assert gate_service(rewritten, {}) is not None
        assert rewritten["entrypoint"][4:] == [
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
        ]
        # Docker runs no CMD beside an entrypoint the service sets: none is added.
        assert "command" not in rewritten

    def test_the_images_command_is_kept_when_the_service_has_none(self) -> None:
        """Docker drops the image's CMD with its ENTRYPOINT: the gate hands over both."""
        rewritten = service()
        images = {rewritten["image"]: ImageDefaults(("/entry.sh",), ("serve", "--port", "8000"))}
        assert gate_service(rewritten, images) is not None
        assert rewritten["entrypoint"][4:] == ["/entry.sh"]
        assert rewritten["command"] == ["serve", "--port", "8000"]

    def test_an_image_not_on_this_machine_leaves_the_service_ungated(self) -> None:
        rewritten = service(command=["--model", "org/m"])
        assert gate_service(rewritten, {rewritten["image"]: None}) is None
        assert "entrypoint" not in rewritten

    def test_gating_twice_changes_nothing(self) -> None:
        rewritten = service(command=["--model", "org/m"])
        gate_service(rewritten, VLLM)
        once = dict(rewritten)
        assert gate_service(rewritten, VLLM) is None
        assert rewritten == once


def test_the_hold_file_lands_in_the_gates_folder_at_the_root() -> None:
    with tarfile.open(fileobj=io.BytesIO(gate.archive())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    folder = gate.GATE_DIR.lstrip("/")
    assert members[folder].isdir()
    assert members[f"{folder}/{gate.HOLD_FILE}"].isfile()
    assert members[f"{folder}/{gate.HOLD_FILE}"].size == 0
