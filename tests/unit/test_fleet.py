"""What a balancer in front of several daemons is told: /health?can_switch, the agent check,
and the HAProxy configuration haproxy-config writes."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from orchestrator.cli import build_parser, haproxy_config
from orchestrator.compose import canonical, rewrite_project
from orchestrator.config import load_settings
from orchestrator.daemon import Daemon
from orchestrator.errors import ConfigError
from orchestrator.haproxy import DaemonAgent, DaemonModel, FleetDaemon, FleetOptions, render
from tests.fakes import FakeRuntime, daemon_of, read_config
from tests.rig import REPO_ROOT, free_port
from tests.waiting import eventually

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def daemon(tmp_path: Path, runtime: FakeRuntime) -> AsyncIterator[Daemon]:
    settings = {"agent_port": free_port(), "models": {"gamma": {"sleep": 1}, "alpha": {"sleep": 1}}}
    async with daemon_of(
        tmp_path, runtime, "alpha", "beta", "gamma", "nocache", **settings
    ) as made:
        yield made


@pytest.fixture
async def client(aiohttp_client: ClientFactory, daemon: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(daemon.app)


async def switchable(client: TestClient[Any, Any], model: str) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health", params={"model": model, "can_switch": "true"})
    return response.status, await response.json()


async def agent_says(daemon: Daemon) -> str:
    assert daemon.agent is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.agent.port)
    try:
        return (await reader.read()).decode()
    finally:
        writer.close()


async def checked(client: TestClient[Any, Any], model: str) -> None:
    """The weights verdicts are kept behind the answers: wait for the first look."""

    async def looked() -> bool:
        _, body = await switchable(client, model)
        return "have not been checked" not in body.get("output", "")

    await eventually(looked, what="the balancer's first look at the weights")


class TestCanSwitch:
    async def test_passes_for_a_model_it_would_switch_to(
        self, client: TestClient[Any, Any]
    ) -> None:
        """Idle with alpha loaded: beta is not loaded (503) but would be switched to (200)."""
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        assert (await client.get("/health", params={"model": "beta"})).status == 503
        status, body = await switchable(client, "beta")
        assert status == 200
        assert body == {
            "status": "pass",
            "model": "beta",
            "loaded": "alpha",
            "output": "beta: would switch from alpha",
        }
        # The loaded model passes as it always did.
        status, body = await switchable(client, "alpha")
        assert (status, body) == (200, {"status": "pass", "model": "alpha"})

    async def test_refuses_a_model_whose_weights_are_missing(
        self, client: TestClient[Any, Any]
    ) -> None:
        await checked(client, "nocache")
        status, body = await switchable(client, "nocache")
        assert status == 503
        assert "would not be taken now" in body["output"]
        assert "org/nocache" in body["output"]

    async def test_refuses_a_disabled_model(self, client: TestClient[Any, Any]) -> None:
        await client.post("/models/beta/disable", json={})
        await checked(client, "beta")
        status, body = await switchable(client, "beta")
        assert status == 503
        assert "beta is disabled" in body["output"]

    async def test_refuses_while_requests_are_in_flight(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        """A switch would wait for alpha's requests: another daemon should take beta."""
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        async with daemon.traffic.lease("alpha"):
            status, body = await switchable(client, "beta")
            assert status == 503
            assert "1 request(s) in flight on alpha" in body["output"]
            # alpha itself still passes: the requests are its own.
            assert (await switchable(client, "alpha"))[0] == 200
        assert (await switchable(client, "beta"))[0] == 200

    async def test_during_a_switch_only_its_target_passes(
        self, client: TestClient[Any, Any], daemon: Daemon, runtime: FakeRuntime
    ) -> None:
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        runtime.gate = asyncio.Event()
        pending = asyncio.ensure_future(client.post("/switch", json={"model": "beta"}))
        await eventually(lambda: daemon.switcher.status.target == "beta")
        status, body = await switchable(client, "gamma")
        assert status == 503
        assert "a switch is under way" in body["output"]
        # A request for the model being started joins that switch.
        assert (await switchable(client, "beta"))[0] == 200
        runtime.gate.set()
        assert (await pending).status == 200

    async def test_a_sleeping_model_is_not_loaded_but_switchable(
        self, client: TestClient[Any, Any]
    ) -> None:
        await client.post("/switch", json={"model": "gamma"})
        await client.post("/switch", json={"model": "alpha"})
        status = await (await client.get("/status")).json()
        assert status["warm_pool"]["asleep"] == ["gamma"]
        assert (await client.get("/health", params={"model": "gamma"})).status == 503
        await checked(client, "gamma")
        assert (await switchable(client, "gamma"))[0] == 200

    @pytest.mark.parametrize(
        ("query", "fragment"),
        [
            ({"can_switch": "true"}, "can_switch asks about one model"),
            ({"model": "beta", "can_switch": "maybe"}, "can_switch must be true or false"),
        ],
    )
    async def test_bad_questions_are_400(
        self, client: TestClient[Any, Any], query: dict[str, str], fragment: str
    ) -> None:
        response = await client.get("/health", params=query)
        assert response.status == 400
        assert fragment in (await response.json())["error"]["message"]

    async def test_status_names_the_agent_and_models_their_timeouts(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        status = await (await client.get("/status")).json()
        assert daemon.agent is not None
        assert status["agent"] == {"host": "127.0.0.1", "port": daemon.agent.port}
        models = {m["id"]: m for m in (await (await client.get("/models")).json())["models"]}
        assert models["alpha"]["startup_timeout"] == 5.0
        assert models["alpha"]["aliases"] == []


class TestAgentCheck:
    async def test_ready_at_full_weight_when_idle(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        assert await agent_says(daemon) == "ready up 100%\n"

    async def test_weight_falls_with_requests_in_flight(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        async with daemon.traffic.lease("alpha"):
            one = await agent_says(daemon)
            async with daemon.traffic.lease("alpha"):
                two = await agent_says(daemon)
        assert one == "ready up 50%\n"
        assert two == "ready up 33%\n"

    async def test_weight_falls_as_the_drain_would_take_longer(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        """Requests to alpha have taken half the drain bound: one in flight weighs less."""
        await client.post("/switch", json={"model": "alpha"})
        await checked(client, "beta")
        daemon.balancer.observe_request("alpha", 200, daemon.balancer.drain_timeout / 2)
        async with daemon.traffic.lease("alpha"):
            assert await agent_says(daemon) == "ready up 38%\n"  # 50 % x (1 - 0.5 x 0.5)

    async def test_drain_during_a_switch(
        self, client: TestClient[Any, Any], daemon: Daemon, runtime: FakeRuntime
    ) -> None:
        await client.post("/switch", json={"model": "alpha"})
        runtime.gate = asyncio.Event()
        pending = asyncio.ensure_future(client.post("/switch", json={"model": "beta"}))
        await eventually(lambda: daemon.switcher.status.target == "beta")
        assert await agent_says(daemon) == "drain\n"
        runtime.gate.set()
        assert (await pending).status == 200
        assert await agent_says(daemon) == "ready up 100%\n"

    async def test_down_when_no_model_can_start(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        await checked(client, "beta")
        for model in ("alpha", "beta", "gamma"):
            await client.post(f"/models/{model}/disable", json={})
        assert await agent_says(daemon) == "down\n"


# --- the configuration ----------------------------------------------------------------------


def fleet(*, agent: bool = True) -> list[FleetDaemon]:
    models = (
        DaemonModel(id="alpha", served_name="org/alpha", aliases=["gpt-4o-mini"]),
        DaemonModel(id="beta", served_name="beta", startup_timeout=1800),
    )
    return [
        FleetDaemon(
            f"http://127.0.0.1:{port}",
            models,
            DaemonAgent(host="127.0.0.1", port=port + 100) if agent else None,
        )
        for port in (8081, 8082)
    ]


def test_the_configuration_routes_every_name_and_falls_back() -> None:
    text, warnings = render(fleet(), FleetOptions(check_interval_ms=200))
    assert warnings == []
    assert "acl want_alpha var(txn.model) -m str -- alpha org/alpha gpt-4o-mini" in text
    assert "use_backend model_alpha if want_alpha { nbsrv(model_alpha) gt 0 }" in text
    assert "use_backend fallback_alpha if want_alpha { nbsrv(fallback_alpha) gt 0 }" in text
    assert "default_backend daemons" in text
    assert "option httpchk GET /health?model=beta&can_switch=true" in text
    assert "json_query('$.model')" in text and "url_param(model)" in text
    assert "option http-buffer-request" in text
    # The largest startup_timeout (beta's 1800 s) and a margin for the drain.
    assert "timeout server 1920s" in text
    assert "agent-check agent-addr 127.0.0.1 agent-port 8181 agent-inter 200ms" in text
    # Each model's fallback starts from another daemon.
    fallback_beta = text.split("\nbackend fallback_beta\n")[1]
    assert fallback_beta.index("daemon2") < fallback_beta.index("daemon1")
    fallback_alpha = text.split("\nbackend fallback_alpha\n")[1].split("\nbackend")[0]
    assert fallback_alpha.index("daemon1") < fallback_alpha.index("daemon2")


def test_names_that_are_not_plain_are_left_out_and_ids_refused() -> None:
    odd = FleetDaemon(
        "http://127.0.0.1:8081",
        (DaemonModel(id="alpha", served_name="x }\n backend evil", aliases=["ok/name"]),),
    )
    text, warnings = render([odd], FleetOptions())
    assert "evil" not in text
    assert "-m str -- alpha ok/name" in text
    assert any("left out of the routing" in w for w in warnings)
    assert any("no agent check" in w for w in warnings)
    bad_id = FleetDaemon("http://127.0.0.1:8081", (DaemonModel(id="a b", served_name="a"),))
    with pytest.raises(ConfigError, match="cannot name an HAProxy backend"):
        render([bad_id], FleetOptions())
    with pytest.raises(ConfigError, match="HOST:PORT"):
        render([FleetDaemon("http://x y:1", ())], FleetOptions())
    with pytest.raises(ConfigError, match="--listen"):
        render(fleet(), FleetOptions(listen="8000; evil"))


def test_a_name_two_models_claim_goes_to_one() -> None:
    first = DaemonModel(id="alpha", served_name="shared")
    second = DaemonModel(id="beta", served_name="shared")
    text, warnings = render([FleetDaemon("http://127.0.0.1:8081", (first, second))], FleetOptions())
    assert "-m str -- alpha shared" in text
    assert "-m str -- beta\n" in text
    assert any("names both alpha and beta" in w for w in warnings)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy (.ci/run)")
def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    text, _ = render(
        fleet(), FleetOptions(check_interval_ms=200, stats_socket=str(tmp_path / "stats"))
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ALERT" not in checked.stderr and "WARNING" not in checked.stderr


async def test_the_command_asks_each_daemon(
    aiohttp_server: Callable[..., Awaitable[Any]],
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = await aiohttp_server(daemon.app)
    url = f"http://127.0.0.1:{server.port}"
    args = build_parser().parse_args(
        ["haproxy-config", "--daemon", url, "--check-interval", "250", "--listen", "127.0.0.1:8000"]
    )
    assert isinstance(args, argparse.Namespace)
    assert await haproxy_config(args) == 0
    out = capsys.readouterr().out
    assert daemon.agent is not None
    assert f"server daemon1 127.0.0.1:{server.port} weight 100 check agent-check" in out
    assert f"agent-port {daemon.agent.port} agent-inter 250ms" in out
    for model in ("alpha", "beta", "gamma", "nocache"):
        assert f"backend model_{model}\n" in out


# --- the two-GPU example ----------------------------------------------------------------------

TWO_GPUS = REPO_ROOT / "compose" / "two-gpus"


def env_file(path: Path) -> dict[str, str]:
    """The variables of an env file as `set -a; . file` exports them (plain KEY=value)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


@pytest.mark.parametrize("gpu", [0, 1])
async def test_the_two_gpu_example_gives_each_daemon_its_own_gpu(gpu: int) -> None:
    """Each env file makes a project of its own on its own GPU, and a daemon with its own
    port, agent port and state dir; the models are the same on both."""
    variables = env_file(TWO_GPUS / f"gpu{gpu}.env")
    settings = load_settings({}, environ=variables)
    source = settings.compose_source
    assert source.files == (TWO_GPUS / "docker-compose.yml",)
    project = rewrite_project(
        source, canonical(await read_config(source)), settings.models_dir, settings.models
    )
    assert project.name == f"llm-gpu{gpu}"
    assert sorted(project.models) == ["qwen3vl-30b", "qwen3vl-4b", "text-4b"]
    for spec in project.models.values():
        assert spec.unusable is None
        service = project.document["services"][spec.engine_service]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(gpu)]
        assert service["ports"][0].get("published") in {"", None}  # Docker picks: no clash
    assert (settings.port, settings.agent_port) == (8081 + gpu, 9081 + gpu)
    assert settings.state_dir.name == f"gpu{gpu}"


def test_the_two_gpu_example_files_differ_only_where_they_must() -> None:
    first, second = (env_file(TWO_GPUS / f"gpu{gpu}.env") for gpu in (0, 1))
    assert first.keys() == second.keys()
    differ = {key for key in first if first[key] != second[key]}
    assert differ == {
        "COMPOSE_PROJECT_NAME",
        "GPU",
        "ORCHESTRATOR_PROJECT_NAME",
        "ORCHESTRATOR_PORT",
        "ORCHESTRATOR_AGENT_PORT",
        "ORCHESTRATOR_STATE_DIR",
        "ORCHESTRATOR_ENV_FILES",
    }
