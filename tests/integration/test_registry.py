"""Models added at run time, through the CLI and the API, on the real engine and the stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from tests.fakes import make_snapshot
from tests.rig import REPO_ROOT, STANDIN_IMAGE, Rig

pytestmark = pytest.mark.integration

REGISTRY_ENV = {
    "ORCHESTRATOR_ENGINE_IMAGE": STANDIN_IMAGE,
    "ORCHESTRATOR_ENGINE_GPUS": "none",
}


def cli(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", "--url", rig.url, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def switch(http: aiohttp.ClientSession, rig: Rig, model: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{rig.url}/switch", json={"model": model}) as response:
        return response.status, await response.json()


def engine_of(rig: Rig, service: str) -> Any:
    (container,) = [
        c for c in rig.containers() if c.labels["com.docker.compose.service"] == service
    ]
    return container


async def test_models_added_by_cli_and_api_run_like_compose_ones(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A repo added with the CLI and a checkpoint added with the API both serve offline."""
    make_snapshot(rig.root / "models" / "hub", "org/gamma")
    checkpoint = rig.root / "models" / "checkpoints" / "job_12" / "checkpoint-100"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps({"_name_or_path": "org/Tiny-Base-1B"}))
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 64)
    rig.start_daemon(env=REGISTRY_ENV)

    added = cli(
        rig, "add", "org/gamma", "--id", "gamma", "--name", "Gamma", "--max-model-len", "2048"
    )
    assert added.returncode == 0, added.stderr
    code, body = await switch(http, rig, "gamma")
    assert code == 200, body
    args = engine_of(rig, "model-gamma").attrs["Config"]["Cmd"]
    assert args[args.index("--model") + 1] == "org/gamma"
    assert args[args.index("--served-model-name") + 1] == "gamma"
    assert args[args.index("--max-model-len") + 1] == "2048"

    async with http.post(f"{rig.url}/models", json={"path": str(checkpoint)}) as response:
        created = await response.json()
    assert response.status == 201, created
    model_id = created["model"]["id"]
    assert model_id == "Tiny-Base-1B"
    code, body = await switch(http, rig, model_id)
    assert code == 200, body
    assert rig.model_containers() == [f"model-{model_id}"]
    container = engine_of(rig, f"model-{model_id}")
    mount = next(m for m in container.attrs["Mounts"] if m["Destination"] == f"/models/{model_id}")
    assert mount["Source"] == str(checkpoint) and mount["RW"] is False
    async with http.get(f"{body['status']['upstream']}/v1/models") as response:
        served = await response.json()
    assert [m["id"] for m in served["data"]] == [model_id]

    listed = cli(rig, "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    by_id = {m["id"]: m for m in json.loads(listed.stdout)}
    assert by_id[model_id]["metadata"]["model_path"] == str(checkpoint)
    assert by_id["gamma"]["display_name"] == "Gamma"
    table = cli(rig, "list").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "ORIGIN"]
    assert any(line.startswith(model_id) and "ready" in line for line in table)
    csv_lines = cli(rig, "list", "--format", "csv").stdout.splitlines()
    assert csv_lines[0] == "id,display_name,origin,enabled,state,cache,source"

    assert cli(rig, "disable", "gamma").returncode == 0
    code, body = await switch(http, rig, "gamma")
    assert code == 409 and body["error"]["code"] == "model_disabled"
    assert rig.model_containers() == [f"model-{model_id}"]
    refused = cli(rig, "rm", model_id)
    assert refused.returncode == 1 and "loaded" in refused.stderr
    assert cli(rig, "enable", "gamma").returncode == 0

    # A restart keeps the registry and adopts the running checkpoint model.
    rig.stop_daemons()
    rig.start_daemon(env=REGISTRY_ENV)
    async with http.get(f"{rig.url}/status") as response:
        status = await response.json()
    assert status["active"] == model_id and status["state"] == "ready"
    assert {"gamma", model_id} <= {m["id"] for m in status["models"]}
    code, body = await switch(http, rig, "gamma")
    assert code == 200, body
    removed = cli(rig, "rm", model_id)
    assert removed.returncode == 0, removed.stderr
    assert model_id not in cli(rig, "list").stdout
