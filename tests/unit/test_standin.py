"""The stand-in engine's sleep mode, as vLLM 0.11 has it behind VLLM_SERVER_DEV_MODE.

Each engine is the real script in a subprocess on a free port: the crash paths end the
process, and the simulated GPU is an flock that only separate processes contend for the
way separate containers do. Command-line parsing is tested in-process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine import standin
from tests.rig import free_port
from tests.waiting import eventually_blocking

STANDIN = Path(standin.__file__)
START_WITHIN = 10.0
EXIT_WITHIN = 10.0


@dataclass
class Engine:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Status and body (JSON when there is one, else the text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode()

    def is_sleeping(self) -> bool:
        status, body = self.call("GET", "/is_sleeping")
        assert status == 200, body
        return bool(body["is_sleeping"])

    def generate(self, path: str = "/v1/completions") -> tuple[int, Any]:
        if path == "/v1/chat/completions":
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
        else:
            body = {"prompt": "hi"}
        return self.call("POST", path, {**body, "max_tokens": 3})

    def output(self) -> str:
        return self.log.read_text()

    def exit_code(self) -> int:
        return self.process.wait(EXIT_WITHIN)


class Engines:
    """Starts stand-ins for one test and kills whatever is left of them after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Engine] = []
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text("{}")

    def spawn(self, *flags: str, env: dict[str, str] | None = None) -> Engine:
        port = free_port()
        log = self.root / f"engine-{len(self.started)}.log"
        environment = {
            **os.environ,
            "STANDIN_LOAD_DELAY": "0",
            "STANDIN_SLEEP_TIME": "0.05",
            "STANDIN_WAKE_TIME": "0.05",
            "STANDIN_RELOAD_TIME": "0.05",
            "VLLM_SERVER_DEV_MODE": "1",
            **(env or {}),
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(STANDIN), str(self.model), "--port", str(port), *flags],
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        engine = Engine(process, port, log)
        self.started.append(engine)
        return engine

    def start(self, *flags: str, env: dict[str, str] | None = None) -> Engine:
        engine = self.spawn(*flags, env=env)

        def listening() -> bool:
            if engine.process.poll() is not None:
                raise AssertionError(f"the engine exited: {engine.output()}")
            try:
                with socket.create_connection(("127.0.0.1", engine.port), timeout=0.2):
                    return True
            except OSError:
                return False

        eventually_blocking(
            listening, within=START_WITHIN, what="the engine listening", context=engine.output
        )
        return engine

    def stop_all(self) -> None:
        for engine in self.started:
            if engine.process.poll() is None:
                engine.process.send_signal(signal.SIGKILL)
                engine.process.wait()


SLEEPY = ("--enable-sleep-mode",)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("flags", "enabled"),
    [
        ([], False),
        (["--enable-sleep-mode"], True),
        (["--enable_sleep_mode"], True),
        (["--enable-sleep-mode", "--no-enable-sleep-mode"], False),
        (["--no_enable_sleep_mode", "--enable_sleep_mode"], True),
    ],
)
def test_the_sleep_flag_takes_both_spellings_and_the_last_one_wins(
    flags: list[str], enabled: bool
) -> None:
    args = standin.parse_args(["serve", "org/m", *flags])
    assert (args.model, args.enable_sleep_mode) == ("org/m", enabled)


@pytest.mark.parametrize(
    ("flags", "utilization"),
    [([], 0.9), (["--gpu-memory-utilization", "0.5"], 0.5), (["--gpu-memory-utilization=x"], 0.9)],
)
def test_gpu_memory_utilization_is_read_and_never_taken_for_the_model(
    flags: list[str], utilization: float
) -> None:
    args = standin.parse_args(["org/m", *flags, "--trust-remote-code"])
    assert (args.model, args.gpu_memory_utilization) == ("org/m", utilization)


# --------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/collective_rpc"),
    ],
)
def test_without_dev_mode_the_sleep_routes_do_not_exist(
    engines: Engines, method: str, path: str
) -> None:
    engine = engines.start(*SLEEPY, env={"VLLM_SERVER_DEV_MODE": "0"})
    assert engine.call(method, path, {"method": "reload_weights"}) == (
        404,
        {"detail": "Not Found"},
    )


def test_dev_mode_is_read_as_vllm_reads_it(engines: Engines) -> None:
    engine = engines.spawn(env={"VLLM_SERVER_DEV_MODE": "true"})
    assert engine.exit_code() != 0
    assert "invalid literal for int()" in engine.output()


def test_a_sleep_route_with_the_wrong_method_is_405(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("GET", "/sleep") == (405, {"detail": "Method Not Allowed"})
    assert engine.call("POST", "/is_sleeping") == (405, {"detail": "Method Not Allowed"})


def test_sleep_without_sleep_mode_fails_and_the_engine_keeps_serving(engines: Engines) -> None:
    engine = engines.start()
    status, body = engine.call("POST", "/sleep?level=1")
    assert status == 500
    assert body["object"] == "error" and "Sleep mode is not enabled" in body["message"]
    assert not engine.is_sleeping()
    assert engine.generate()[0] == 200


def test_sleep_level_1_and_wake_up(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert not engine.is_sleeping()

    assert engine.call("POST", "/sleep") == (200, "")
    assert engine.is_sleeping()
    # Asleep is not down: health and the model list still answer.
    assert engine.call("GET", "/health") == (200, "")
    status, models = engine.call("GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == str(engines.model)
    # A second sleep is a no-op, as in vLLM's executor.
    assert engine.call("POST", "/sleep?level=1") == (200, "")

    assert engine.call("POST", "/wake_up") == (200, "")
    assert not engine.is_sleeping()
    # Level 1 kept the weights in CPU memory: no reload needed.
    assert engine.generate()[0] == 200
    # Waking an awake engine is a no-op too.
    assert engine.call("POST", "/wake_up") == (200, "")
    assert "It took" in engine.output() and "to fall asleep" in engine.output()


def test_sleep_aborts_the_streams_in_flight(engines: Engines) -> None:
    engine = engines.start(*SLEEPY, env={"STANDIN_TOKEN_DELAY": "0.05"})
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=10)
    try:
        body = {"prompt": "hi", "max_tokens": 1000, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body))
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")

        assert engine.call("POST", "/sleep") == (200, "")

        events = [line[6:] for line in response.read().splitlines() if line.startswith(b"data:")]
    finally:
        conn.close()
    assert events[-1] == b"[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    # Cut short: nowhere near the 1000 tokens asked for.
    assert len(events) < 500


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_generation_while_asleep_kills_the_engine(engines: Engines, path: str) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/sleep") == (200, "")

    status, body = engine.generate(path)

    assert status == 500 and body["type"] == "EngineDeadError"
    assert engine.exit_code() != 0
    assert "illegal memory access" in engine.output()


def test_partly_awake_is_still_asleep(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/sleep") == (200, "")
    assert engine.call("POST", "/wake_up?tags=weights") == (200, "")
    assert engine.is_sleeping()
    # A tag that is not asleep makes vLLM ignore the whole call.
    assert engine.call("POST", "/wake_up?tags=weights&tags=kv_cache") == (200, "")
    assert engine.is_sleeping()

    assert engine.generate()[0] == 500
    assert engine.exit_code() != 0


def test_level_2_needs_reload_weights_before_generating(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/sleep?level=2") == (200, "")

    # The documented sequence: weights, reload, then the KV cache.
    assert engine.call("POST", "/wake_up?tags=weights") == (200, "")
    assert engine.is_sleeping()
    rpc = {"method": "reload_weights"}
    assert engine.call("POST", "/collective_rpc", rpc) == (200, {"results": [None]})
    assert engine.call("POST", "/wake_up?tags=kv_cache") == (200, "")
    assert not engine.is_sleeping()
    assert engine.generate()[0] == 200


def test_level_2_woken_without_reload_dies_on_the_first_generation(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/sleep?level=2") == (200, "")
    assert engine.call("POST", "/wake_up") == (200, "")
    assert not engine.is_sleeping()
    # Not a forward pass: the model list still answers.
    assert engine.call("GET", "/v1/models")[0] == 200

    assert engine.generate("/v1/chat/completions")[0] == 500
    assert engine.exit_code() != 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"method": "no_such_method"}, 500),
    ],
)
def test_collective_rpc_refuses_what_it_cannot_do(
    engines: Engines, body: dict[str, Any], status: int
) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/collective_rpc", body)[0] == status


def test_reload_weights_while_the_weights_sleep_is_refused(engines: Engines) -> None:
    engine = engines.start(*SLEEPY)
    assert engine.call("POST", "/sleep?level=2") == (200, "")
    assert engine.call("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 500
    assert engine.is_sleeping()


# --------------------------------------------------------------------------- the GPU


def test_the_gpu_lock_admits_one_awake_engine(engines: Engines, tmp_path: Path) -> None:
    gpu = {"STANDIN_GPU_LOCK": str(tmp_path / "gpu.lock")}
    first = engines.start(*SLEEPY, env=gpu)

    # The GPU is taken: the second engine fails as vLLM does when memory is short.
    refused = engines.spawn(*SLEEPY, "--gpu-memory-utilization", "0.5", env=gpu)
    assert refused.exit_code() != 0
    assert "CUDA out of memory. Tried to allocate 11.78 GiB" in refused.output()

    # Asleep, the first engine has let go of the GPU.
    assert first.call("POST", "/sleep?level=1") == (200, "")
    second = engines.start(*SLEEPY, env=gpu)

    status, body = first.call("POST", "/wake_up")
    assert status == 500 and "CUDA out of memory" in body["message"]
    assert first.is_sleeping()

    assert second.call("POST", "/sleep?level=2") == (200, "")
    assert first.call("POST", "/wake_up") == (200, "")
    assert not first.is_sleeping()
    assert first.generate()[0] == 200


def test_the_gpu_is_free_again_when_its_engine_dies(engines: Engines, tmp_path: Path) -> None:
    gpu = {"STANDIN_GPU_LOCK": str(tmp_path / "gpu.lock")}
    first = engines.start(*SLEEPY, env=gpu)
    first.process.send_signal(signal.SIGTERM)
    assert first.exit_code() == 0
    engines.start(env=gpu)


def test_without_a_gpu_lock_engines_do_not_contend(engines: Engines) -> None:
    first = engines.start(*SLEEPY)
    second = engines.start(*SLEEPY)
    assert first.call("POST", "/sleep") == (200, "")
    assert first.call("POST", "/wake_up") == (200, "")
    assert second.generate()[0] == 200


def test_a_gpu_lock_that_cannot_be_opened_is_a_plain_error(
    engines: Engines, tmp_path: Path
) -> None:
    engine = engines.spawn(env={"STANDIN_GPU_LOCK": str(tmp_path / "missing" / "gpu.lock")})
    assert engine.exit_code() == 2
    assert "STANDIN_GPU_LOCK" in engine.output() and "Traceback" not in engine.output()
