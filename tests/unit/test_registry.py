"""The model registry through the HTTP API: CRUD, validation, enable/disable, persistence, pull."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from orchestrator.catalog import REGISTRY_COMPOSE, Catalog
from orchestrator.errors import BadRequest, DockerError
from orchestrator.schemas import Capabilities, ModelChanges, NewModel
from tests.fakes import TWO_MODEL_COMPOSE, FakeRuntime, make_snapshot, open_daemon
from tests.hubserver import FakeHub

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


class Daemon:
    """The daemon as serve() builds it, over the fake Docker boundary; opened again after
    a close, as a restarted daemon would be."""

    def __init__(self, root: Path, hub_endpoint: str | None = None) -> None:
        self.root = root
        self.hub_endpoint = hub_endpoint
        self.runtime = FakeRuntime()

    async def open(self) -> Catalog:
        self.built = await open_daemon(self.root, self.runtime, hub_endpoint=self.hub_endpoint)
        self.store, self.catalog, self.switcher = (
            self.built.store,
            self.built.catalog,
            self.built.switcher,
        )
        self.app = self.built.app
        return self.catalog

    async def close(self) -> None:
        await self.built.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "docker-compose.yml").write_text(TWO_MODEL_COMPOSE)
    hub = tmp_path / "models" / "hub"
    for repo in ("org/a", "org/b", "org/extra"):
        make_snapshot(hub, repo)
    return tmp_path


@pytest.fixture
async def daemon(root: Path) -> AsyncIterator[Daemon]:
    made = Daemon(root)
    await made.open()
    yield made
    await made.close()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, daemon: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(daemon.app)


def checkpoint(root: Path, *parts: str, base_model: str | None = None) -> Path:
    # Under the default checkpoint root, <models-dir>/checkpoints.
    folder = root.joinpath("models", "checkpoints", "train", *parts)
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"model_type": "tiny"}
    if base_model:
        config["_name_or_path"] = base_model
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """A service's mounts in compose's long syntax, by target: (source, read-only)."""
    return {
        volume["target"]: (volume["source"], bool(volume.get("read_only")))
        for volume in service["volumes"]
    }


async def add(client: TestClient[Any, Any], **body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/models", json=body)
    return response.status, await response.json()


class TestListing:
    async def test_compose_models_are_listed_with_their_origin(
        self, client: TestClient[Any, Any]
    ) -> None:
        """Models declared in compose show up as origin compose, enabled, with a verdict."""
        response = await client.get("/models")
        models = {m["id"]: m for m in (await response.json())["models"]}
        assert set(models) == {"alpha", "beta"}
        assert models["alpha"]["origin"] == "compose"
        assert models["alpha"]["enabled"] is True
        assert models["alpha"]["cache"]["status"] == "present"


class TestAdding:
    async def test_repo_model_becomes_a_profile_of_the_daemons_compose(
        self, client: TestClient[Any, Any], root: Path
    ) -> None:
        """A repo added at run time is rendered, rewritten for offline loading, and listed."""
        code, body = await add(
            client,
            repo="org/extra",
            id="extra",
            display_name="Extra model",
            engine={"gpu_memory_utilization": 0.8, "max_model_len": 8192, "dtype": "bfloat16"},
            capabilities={"context_length": 8192, "vision": True, "tools": False},
            defaults={"temperature": 0.7, "top_p": 0.9},
        )
        assert code == 201, body
        model = body["model"]
        assert model["origin"] == "registry"
        assert model["display_name"] == "Extra model"
        assert model["repo"] == "org/extra"
        assert model["served_name"] == "extra"
        assert model["cache"]["status"] == "present"
        assert model["capabilities"] == {"context_length": 8192, "vision": True, "tools": False}
        normalized = yaml.safe_load((root / "state" / "compose.yml").read_text())
        service = normalized["services"]["model-extra"]
        assert service["profiles"] == ["extra"]
        command = service["command"]
        assert command[command.index("--model") + 1] == "org/extra"
        assert command[command.index("--served-model-name") + 1] == "extra"
        assert command[command.index("--gpu-memory-utilization") + 1] == "0.8"
        assert command[command.index("--dtype") + 1] == "bfloat16"
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
        assert mounts(service)["/root/.cache/huggingface/hub"] == (
            str(root / "models" / "hub"),
            True,
        )
        # Written to by the engine: torch.compile and CUDA graph caches.
        assert mounts(service)["/root/.cache/vllm"] == (str(root / "models" / "vllm-cache"), False)
        assert "deploy" not in service  # gpus: none
        assert "svc-alpha" in normalized["services"]  # the user's models are still there
        owned = yaml.safe_load((root / "state" / REGISTRY_COMPOSE).read_text())
        assert list(owned["services"]) == ["model-extra"]

    async def test_checkpoint_gets_a_readable_id_and_a_read_only_mount(
        self, client: TestClient[Any, Any], root: Path
    ) -> None:
        """A training checkpoint is named after its base model, never its path."""
        folder = checkpoint(root, "job_7", "checkpoint-100", base_model="meta-llama/Llama-3.2-3B")
        code, body = await add(client, path=str(folder))
        assert code == 201, body
        model = body["model"]
        assert model["id"] == "Llama-3.2-3B"
        assert model["served_name"] == "Llama-3.2-3B"
        assert "/" not in model["id"] and str(root) not in model["display_name"]
        assert model["metadata"]["model_path"] == str(folder)
        assert model["cache"]["status"] == "present"
        normalized = yaml.safe_load((root / "state" / "compose.yml").read_text())
        service = normalized["services"]["model-Llama-3.2-3B"]
        assert mounts(service)["/models/Llama-3.2-3B"] == (str(folder), True)
        assert service["command"][1] == "/models/Llama-3.2-3B"

    async def test_incomplete_checkpoint_is_refused_at_switch(
        self, client: TestClient[Any, Any], root: Path
    ) -> None:
        """A checkpoint folder without weights is 409 on /switch, like a missing snapshot."""
        folder = checkpoint(root, "run", "merged")
        (folder / "model.safetensors").unlink()
        code, body = await add(client, path=str(folder), id="merged-run")
        assert code == 201, body
        assert body["model"]["cache"]["status"] == "incomplete"
        response = await client.post("/switch", json={"model": "merged-run"})
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "model_not_cached"

    async def test_duplicate_id_and_name_are_refused(self, client: TestClient[Any, Any]) -> None:
        """An id or a display name that is taken is refused, naming the field."""
        code, body = await add(client, repo="org/extra", id="alpha")
        assert (code, body["error"]["field"]) == (400, "id")
        code, body = await add(client, repo="org/extra", id="x1", display_name="One")
        assert code == 201
        code, body = await add(client, repo="org/extra", id="x2", display_name="One")
        assert (code, body["error"]["field"]) == (400, "display_name")

    async def test_a_compose_models_name_is_taken_too(
        self, aiohttp_client: ClientFactory, root: Path
    ) -> None:
        """The name a compose model shows (its file's display_name) cannot be taken either."""
        compose = root / "docker-compose.yml"
        compose.write_text(
            compose.read_text().replace(
                'command: ["--model", "org/a"]',
                'command: ["--model", "org/a"]\n    x-orchestrator: {display_name: Alpha Prime}',
            )
        )
        made = Daemon(root)
        await made.open()
        try:
            client = await aiohttp_client(made.app)
            code, body = await add(client, repo="org/extra", id="x3", display_name="Alpha Prime")
            assert (code, body["error"]["field"]) == (400, "display_name")
        finally:
            await made.close()

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"engine": {"gpu_memory_utilization": 0}}, "engine.gpu_memory_utilization"),
            ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization"),
            ({"engine": {"gpu_memory_utilization": "high"}}, "engine.gpu_memory_utilization"),
            ({"engine": {"max_model_len": 0}}, "engine.max_model_len"),
            ({"engine": {"max_model_len": 10.5}}, "engine.max_model_len"),
            ({"engine": {"tensor_parallel_size": -1}}, "engine.tensor_parallel_size"),
            ({"engine": {"dtype": "int8"}}, "engine.dtype"),
            ({"engine": {"trust_remote_code": "yes"}}, "engine.trust_remote_code"),
            ({"engine": {"quantization": "awq"}}, "engine.quantization"),
            ({"capabilities": {"context_length": 0}}, "capabilities.context_length"),
            ({"capabilities": {"max_output_tokens": -5}}, "capabilities.max_output_tokens"),
            ({"capabilities": {"vision": "no"}}, "capabilities.vision"),
            ({"capabilities": {"tools": 1}}, "capabilities.tools"),
            ({"capabilities": {"streaming": None, "x": 1}}, "capabilities.x"),
            ({"defaults": {"temperature": 2.5}}, "defaults.temperature"),
            ({"defaults": {"temperature": -0.1}}, "defaults.temperature"),
            ({"defaults": {"top_p": 1.01}}, "defaults.top_p"),
            (
                {"engine": {"max_model_len": 4096}, "capabilities": {"context_length": 8192}},
                "capabilities.context_length",
            ),
            ({"id": "a b"}, "id"),
            ({"id": "-x"}, "id"),
            ({"display_name": ""}, "display_name"),
            ({"display_name": 5}, "display_name"),
            ({"image": "has space"}, "image"),
            ({"enabled": "true"}, "enabled"),
            ({"metadata": {"base_model": 1}}, "metadata"),
            ({"engine": []}, "engine"),
            ({"flavour": "x"}, "flavour"),
        ],
    )
    async def test_bad_values_are_400_naming_the_field(
        self, client: TestClient[Any, Any], body: dict[str, Any], field: str
    ) -> None:
        """Every validated field refuses a bad value with 400 and says which field."""
        code, answer = await add(client, **{"repo": "org/extra", "id": "extra", **body})
        assert code == 400, answer
        assert answer["error"]["field"] == field
        assert field in answer["error"]["message"]
        assert "extra" not in {
            m["id"] for m in (await (await client.get("/models")).json())["models"]
        }

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({}, "repo"),
            ({"repo": "org/x", "path": "/srv/x"}, "repo"),
            ({"repo": "/root/.cache/huggingface/x"}, "repo"),
            ({"repo": "not a repo"}, "repo"),
            ({"path": "relative/folder"}, "path"),
            ({"path": "~nobody-here/x"}, "path"),
            ({"path": "/srv/a:b"}, "path"),
            ({"path": "/srv/\u0014x"}, "path"),
        ],
    )
    async def test_bad_sources_are_400(
        self, client: TestClient[Any, Any], body: dict[str, Any], field: str
    ) -> None:
        """A model needs exactly one well-formed source."""
        code, answer = await add(client, **body)
        assert (code, answer["error"]["field"]) == (400, field)


class TestChanging:
    async def test_patch_merges_sections(self, client: TestClient[Any, Any], root: Path) -> None:
        """PATCH changes the fields given and keeps the others; the compose copy follows."""
        await add(client, repo="org/extra", id="extra", engine={"max_model_len": 4096})
        response = await client.patch(
            "/models/extra", json={"engine": {"dtype": "float16"}, "display_name": "Renamed"}
        )
        body = await response.json()
        assert response.status == 200, body
        assert body["model"]["engine"] == {"max_model_len": 4096, "dtype": "float16"}
        assert body["model"]["display_name"] == "Renamed"
        command = yaml.safe_load((root / "state" / "compose.yml").read_text())["services"][
            "model-extra"
        ]["command"]
        assert "--dtype" in command and "--max-model-len" in command

    async def test_compose_model_takes_only_descriptive_changes(
        self, client: TestClient[Any, Any]
    ) -> None:
        """A compose model's name and capabilities can change; its engine is the file's."""
        response = await client.patch(
            "/models/alpha", json={"display_name": "Model A", "capabilities": {"tools": True}}
        )
        assert response.status == 200
        assert (await response.json())["model"]["display_name"] == "Model A"
        response = await client.patch("/models/alpha", json={"engine": {"dtype": "float16"}})
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "engine"

    async def test_delete(self, client: TestClient[Any, Any], root: Path) -> None:
        """A registry model can be deleted; a compose one cannot; an unknown one is 404."""
        await add(client, repo="org/extra", id="extra")
        assert (await client.delete("/models/extra", json={})).status == 200
        assert "model-extra" not in (root / "state" / "compose.yml").read_text()
        assert (await client.get("/models/extra")).status == 404
        response = await client.delete("/models/alpha", json={})
        assert response.status == 409
        assert "compose" in (await response.json())["error"]["message"]
        assert (await client.delete("/models/nope", json={})).status == 404

    async def test_active_model_cannot_be_deleted_or_disabled(
        self, client: TestClient[Any, Any]
    ) -> None:
        """The model on the GPU stays registered and enabled until it is switched away."""
        await add(client, repo="org/extra", id="extra")
        response = await client.post("/switch", json={"model": "extra"})
        assert response.status == 200, await response.json()
        assert (await client.delete("/models/extra", json={})).status == 409
        assert (await client.post("/models/extra/disable", json={})).status == 409
        await client.post("/switch", json={"model": "alpha"})
        assert (await client.delete("/models/extra", json={})).status == 200

    async def test_disabled_model_cannot_be_switched_to(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        """Disable refuses switches with 409 and leaves the running model alone."""
        assert (await client.post("/switch", json={"model": "alpha"})).status == 200
        response = await client.post("/models/beta/disable", json={})
        assert (await response.json())["model"]["enabled"] is False
        response = await client.post("/switch", json={"model": "beta"})
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "model_disabled"
        assert daemon.switcher.status.active == "alpha"
        assert (await client.post("/models/beta/enable", json={})).status == 200
        assert (await client.post("/switch", json={"model": "beta"})).status == 200


async def test_vllm_cache_folder_is_made_before_compose_runs(daemon: Daemon, root: Path) -> None:
    """The daemon makes <models-dir>/vllm-cache as its own user; docker would as root."""
    folder = root / "models" / "vllm-cache"
    assert folder.is_dir()
    assert folder.stat().st_uid == os.getuid()


async def test_registry_survives_a_restart(root: Path) -> None:
    """Added models, changes and disabled flags come back after the daemon restarts."""
    first = Daemon(root)
    catalog = await first.open()
    await catalog.add(NewModel(repo="org/extra", id="extra", capabilities=Capabilities(tools=True)))
    await catalog.set_enabled("beta", False)
    await catalog.update("alpha", ModelChanges(display_name="Model A"))
    await first.close()

    second = Daemon(root)
    catalog = await second.open()
    try:
        assert set(catalog.specs()) == {"alpha", "beta", "extra"}
        entry = catalog.entry_or_none("extra")
        assert entry is not None and entry.capabilities == {"tools": True}
        assert catalog.disabled() == {"beta"}
        assert second.switcher.disabled == {"beta"}
        assert catalog.specs()["alpha"].display_name == "Model A"
        assert "model-extra" in (root / "state" / "compose.yml").read_text()
    finally:
        await second.close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    files = {"config.json": b"{}", "model.safetensors": b"\1" * 50_000}
    with FakeHub({"org/pulled": {"alpha" * 40: files}}) as server:
        yield server


async def test_pull_through_the_api_shows_progress(
    aiohttp_client: ClientFactory, root: Path, hub: FakeHub
) -> None:
    """POST /models/{id}/pull downloads in the background; /models and /status show it."""
    made = Daemon(root, hub_endpoint=hub.url)
    await made.open()
    try:
        client = await aiohttp_client(made.app)
        code, body = await add(client, repo="org/pulled", id="pulled")
        assert code == 201 and body["model"]["cache"]["status"] == "missing"
        response = await client.post("/models/pulled/pull", json={})
        assert response.status == 202
        assert response.headers["Location"] == "/models/pulled"
        for _ in range(200):
            model = (await (await client.get("/models/pulled")).json())["model"]
            if model["pull"]["state"] != "downloading":
                break
            await asyncio.sleep(0.05)
        assert model["pull"]["state"] == "done", model["pull"]
        assert model["pull"]["files_done"] == model["pull"]["files_total"] == 2
        assert model["cache"]["status"] == "present"
        status = await (await client.get("/status")).json()
        assert status["pulls"]["pulled"]["state"] == "done"
        response = await client.post("/models/alpha/pull", json={"revision": 3})
        assert (await response.json())["error"]["field"] == "revision"
    finally:
        await made.close()


async def test_model_compose_refuses_is_400_and_nothing_changes(root: Path) -> None:
    """When `docker compose config` refuses the candidate, nothing is saved or installed."""
    made = Daemon(root)
    catalog = await made.open()
    seen: list[list[str]] = []

    async def refuse(candidate: Path, profiles: Iterable[str]) -> None:
        seen.append(sorted(profiles))
        assert "model-extra" in await asyncio.to_thread(candidate.read_text)
        raise DockerError("service model-extra: invalid reference format")

    catalog.connect(validate=refuse, on_change=made.switcher.set_models, in_use=lambda _m: False)
    before = (root / "state" / "compose.yml").read_text()
    try:
        with pytest.raises(BadRequest, match="invalid reference format"):
            await catalog.add(NewModel(repo="org/extra", id="extra"))
        assert seen == [["alpha", "beta", "extra"]]
        assert (root / "state" / "compose.yml").read_text() == before
        assert "extra" not in made.switcher.models
        assert await made.store.model_entries() == []
        assert not list((root / "state").glob("*.candidate"))
    finally:
        await made.close()


def test_cli_says_when_the_daemon_is_unreachable() -> None:
    """`models list` against a port nobody listens on explains itself and exits 1."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", "--url", "http://127.0.0.1:9", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot reach the daemon at http://127.0.0.1:9" in result.stderr
