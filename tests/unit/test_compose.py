from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.compose import (
    DEFAULT_ENGINE_PORT,
    ComposeError,
    ComposeProject,
    RewriteNote,
    load_project,
    render,
    rewrite_command,
)

CACHE_PATH = "/root/.cache/huggingface/Qwen--Qwen3-4B"
HUB_TARGET = "/root/.cache/huggingface/hub"
GPT2 = ["--model", "gpt2"]
SNAPSHOT_PATH = (
    "/root/.cache/huggingface/hub/models--Qwen--Qwen3-4B/snapshots/"
    "0123456789abcdef0123456789abcdef01234567"
)

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


def write(tmp_path: Path, text: str) -> Path:
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(textwrap.dedent(text))
    return compose_file


def load(
    tmp_path: Path, text: str, overrides: dict[str, dict[str, Any]] | None = None
) -> ComposeProject:
    return load_project(write(tmp_path, text), tmp_path / "models", overrides)


def hub_mount(tmp_path: Path) -> str:
    return f"{(tmp_path / 'models').resolve()}/hub:/root/.cache/huggingface/hub"


def one_model(
    command: Any,
    keys: dict[str, Any] | None = None,
    others: dict[str, Any] | None = None,
    image: str = "vllm/vllm-openai:v0.11.0",
) -> str:
    """A file with model service `m` in profile `tiny`, plus `keys` on it and `others` beside it."""
    services = {"m": {"image": image, "profiles": ["tiny"], "command": command, **(keys or {})}}
    return yaml.safe_dump({"services": {**services, **(others or {})}}, sort_keys=False)


def service(project: ComposeProject, name: str) -> dict[str, Any]:
    services: dict[str, Any] = project.document["services"]
    return dict(services[name])


def notes_of(project: ComposeProject, model_id: str) -> list[str]:
    return [note.what for note in project.notes[model_id]]


class TestSeedFile:
    def test_seed_002_fix_is_applied(self, tmp_path: Path) -> None:
        """The user's broken file comes out as the fix seed 002 describes, with a note each."""
        project = load(tmp_path, SEED)
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
        assert engine["volumes"] == [hub_mount(tmp_path)]
        assert engine["environment"] == ["HF_HUB_OFFLINE=1"]
        assert project.notes["text-4b"] == [
            RewriteNote(
                "vllm-text",
                "--model /root/.cache/huggingface/Qwen--Qwen3-4B-Instruct-2507"
                " → Qwen/Qwen3-4B-Instruct-2507",
            ),
            RewriteNote("vllm-text", "added --served-model-name text-4b"),
            RewriteNote(
                "vllm-text",
                f"volume ./models:/root/.cache/huggingface → {hub_mount(tmp_path)}",
            ),
            RewriteNote("vllm-text", "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1"),
        ]
        assert project.problems == {"text-4b": []}

    def test_seed_002_model_spec(self, tmp_path: Path) -> None:
        """The model's spec carries the repo, served name, engine and defaults."""
        project = load(tmp_path, SEED)
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
        assert project.shared_services == ("redis",)
        assert project.source == (tmp_path / "docker-compose.yml").resolve()
        assert project.name is None


class TestModelArgument:
    def test_folded_string_command(self, tmp_path: Path) -> None:
        """A folded multi-line string is split like a shell would and returned as a list."""
        text = f"""
        services:
          m:
            image: vllm/vllm-openai:v0.11.0
            profiles: [tiny]
            command: >
              --model {CACHE_PATH}
              --chat-template '/templates/my chat.jinja'
        """
        project = load(tmp_path, text)
        assert service(project, "m")["command"] == [
            "--model",
            "Qwen/Qwen3-4B",
            "--chat-template",
            "/templates/my chat.jinja",
            "--served-model-name",
            "tiny",
        ]

    def test_list_command(self) -> None:
        """A list command is taken token by token."""
        argv, notes = rewrite_command(["--model", CACHE_PATH, "--port", "8000"], "tiny")
        assert argv == ["--model", "Qwen/Qwen3-4B", "--port", "8000", "--served-model-name", "tiny"]
        assert notes == [f"--model {CACHE_PATH} → Qwen/Qwen3-4B", "added --served-model-name tiny"]

    def test_model_equals_form(self) -> None:
        """--model=X keeps its one-token spelling."""
        argv, notes = rewrite_command([f"--model={CACHE_PATH}"], "tiny")
        assert argv == ["--model=Qwen/Qwen3-4B", "--served-model-name", "tiny"]
        assert notes[0] == f"--model {CACHE_PATH} → Qwen/Qwen3-4B"

    def test_positional_model(self) -> None:
        """A first token that is not an option is the model."""
        argv, notes = rewrite_command([CACHE_PATH, "--port", "8000"], "tiny")
        assert argv == ["Qwen/Qwen3-4B", "--port", "8000", "--served-model-name", "tiny"]
        assert notes[0] == f"positional model {CACHE_PATH} → Qwen/Qwen3-4B"

    def test_positional_repo_id_unchanged(self) -> None:
        """`command: ["Qwen/Qwen3-4B", "--port", "8000"]` only gains a served name."""
        argv, notes = rewrite_command(["Qwen/Qwen3-4B", "--port", "8000"], "tiny")
        assert argv == ["Qwen/Qwen3-4B", "--port", "8000", "--served-model-name", "tiny"]
        assert notes == ["added --served-model-name tiny"]

    @pytest.mark.parametrize("prefix", [["vllm", "serve"], ["serve"]])
    def test_serve_prefix(self, prefix: list[str]) -> None:
        """A leading `vllm serve` or `serve` is kept and the model after it is found."""
        argv, _ = rewrite_command([*prefix, SNAPSHOT_PATH, "--dtype", "auto"], "tiny")
        assert argv == [*prefix, "Qwen/Qwen3-4B", "--dtype", "auto", "--served-model-name", "tiny"]

    def test_api_server_module_takes_no_positional(self) -> None:
        """After `python3 -m vllm.entrypoints.openai.api_server` only --model names the model."""
        launcher = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        argv, _ = rewrite_command([*launcher, "--model", CACHE_PATH], "tiny")
        assert argv == [*launcher, "--model", "Qwen/Qwen3-4B", "--served-model-name", "tiny"]

    def test_snapshot_path(self) -> None:
        """A snapshots/<hash> path becomes the repo id, revision dropped."""
        argv, _ = rewrite_command(["--model", SNAPSHOT_PATH], "tiny")
        assert argv == ["--model", "Qwen/Qwen3-4B", "--served-model-name", "tiny"]

    def test_models_folder_path_without_snapshot(self) -> None:
        """A models--Org--Name folder path becomes the repo id."""
        argv, _ = rewrite_command(["--model", f"{HUB_TARGET}/models--Org--x"], "tiny")
        assert argv == ["--model", "Org/x", "--served-model-name", "tiny"]

    def test_local_checkpoint_kept(self, tmp_path: Path) -> None:
        """A path outside any cache is a local checkpoint: kept, and the spec has no repo."""
        project = load(tmp_path, one_model(["--model", "/data/checkpoints/run1"]))
        assert service(project, "m")["command"][:2] == ["--model", "/data/checkpoints/run1"]
        spec = project.models["tiny"]
        assert spec.model_arg == "/data/checkpoints/run1"
        assert spec.repo is None
        assert project.problems["tiny"] == []

    def test_repo_id_kept(self) -> None:
        """A repo id is already what offline vLLM wants."""
        argv, notes = rewrite_command("--model Qwen/Qwen3-4B", "tiny")
        assert argv == ["--model", "Qwen/Qwen3-4B", "--served-model-name", "tiny"]
        assert notes == ["added --served-model-name tiny"]

    def test_both_forms_agreeing(self, tmp_path: Path) -> None:
        """With a positional model and --model for the same repo, --model goes, quietly."""
        project = load(tmp_path, one_model(["serve", "Qwen/Qwen3-4B", "--model", CACHE_PATH]))
        assert service(project, "m")["command"] == [
            "serve",
            "Qwen/Qwen3-4B",
            "--served-model-name",
            "tiny",
        ]
        assert notes_of(project, "tiny")[0] == (
            f"dropped --model {CACHE_PATH}: the positional model Qwen/Qwen3-4B wins"
        )
        assert project.problems["tiny"] == []

    def test_both_forms_disagreeing(self, tmp_path: Path) -> None:
        """Two different models: the positional one is kept and the conflict is a problem."""
        project = load(tmp_path, one_model(["Qwen/Qwen3-4B", "--model=Other/model"]))
        assert service(project, "m")["command"] == ["Qwen/Qwen3-4B", "--served-model-name", "tiny"]
        assert project.problems["tiny"] == [
            "m: the command names two models, positional Qwen/Qwen3-4B and --model Other/model;"
            " kept Qwen/Qwen3-4B"
        ]

    def test_no_model_argument_left_alone(self) -> None:
        """A command that passes no model is not the daemon's to change."""
        assert rewrite_command(["--port", "9000"], "tiny") == (None, [])
        assert rewrite_command(None, "tiny") == (None, [])

    def test_unsplittable_command(self) -> None:
        """A command with an unbalanced quote is a ComposeError, not a crash."""
        with pytest.raises(ComposeError, match="cannot split"):
            rewrite_command("--model 'Qwen/Qwen3-4B", "tiny")

    def test_numbers_in_list_command_become_strings(self, tmp_path: Path) -> None:
        """The rewritten command is always a list of strings."""
        project = load(tmp_path, one_model(["--model", "gpt2", "--port", 8001]))
        assert service(project, "m")["command"] == [
            "--model",
            "gpt2",
            "--port",
            "8001",
            "--served-model-name",
            "tiny",
        ]

    def test_sidecar_program_is_not_a_model(self, tmp_path: Path) -> None:
        """Outside a vLLM image a first word like `nginx` is a program, not a model."""
        proxy = {"image": "nginx", "profiles": ["tiny"], "command": ["nginx", "-g", "daemon off;"]}
        project = load(tmp_path, one_model(GPT2, others={"proxy": proxy}))
        assert service(project, "proxy") == proxy
        assert project.models["tiny"].engine_service == "m"

    def test_model_flag_without_value(self, tmp_path: Path) -> None:
        """A dangling --model is reported rather than guessed at."""
        project = load(tmp_path, one_model(["--dtype", "auto", "--model"]))
        assert service(project, "m")["command"] == ["--dtype", "auto", "--model"]
        assert project.problems["tiny"] == [
            "m: --model has no value",
            "no service of profile tiny passes vLLM a model (--model or a positional model)",
        ]

    def test_repo_id_positional_outside_vllm_image(self, tmp_path: Path) -> None:
        """In another image a namespaced repo id in first place still counts as the model."""
        project = load(tmp_path, one_model(["Qwen/Qwen3-4B"], image="registry.local/llm:1"))
        assert project.models["tiny"].repo == "Qwen/Qwen3-4B"


class TestServedName:
    def test_added_when_absent(self) -> None:
        """Without --served-model-name the model id becomes the served name."""
        argv, notes = rewrite_command(["--model", "gpt2"], "tiny")
        assert argv == ["--model", "gpt2", "--served-model-name", "tiny"]
        assert notes == ["added --served-model-name tiny"]

    @pytest.mark.parametrize(
        "given",
        [
            ["--served-model-name", "chat"],
            ["--served-model-name=chat"],
            ["--served_model_name", "chat"],
            ["--served-model-name", "chat", "alias"],
        ],
    )
    def test_kept_when_present(self, tmp_path: Path, given: list[str]) -> None:
        """Any spelling of --served-model-name is kept; its first value is the served name."""
        command = [*GPT2, *given]
        project = load(tmp_path, one_model(command))
        assert service(project, "m")["command"] == command
        assert project.models["tiny"].served_name == "chat"
        assert notes_of(project, "tiny") == [
            f"added volume {hub_mount(tmp_path)}",
            "added HF_HUB_OFFLINE=1",
        ]

    def test_collision_is_a_problem(self, tmp_path: Path) -> None:
        """Two models answering to the same served name are both flagged."""
        command = [*GPT2, "--served-model-name", "chat"]
        other = {"image": "vllm/vllm-openai", "profiles": ["other"], "command": command}
        project = load(tmp_path, one_model(command, others={"n": other}))
        assert project.problems["tiny"] == ["served name 'chat' is also used by other"]
        assert project.problems["other"] == ["served name 'chat' is also used by tiny"]


class TestVolumes:
    @pytest.mark.parametrize(
        ("volume", "described"),
        [
            ("./models:/root/.cache/huggingface", "./models:/root/.cache/huggingface"),
            (f"./models/hub:{HUB_TARGET}/", f"./models/hub:{HUB_TARGET}/"),
            ("hf-cache:/root/.cache/huggingface", "hf-cache:/root/.cache/huggingface"),
            (
                {"type": "bind", "source": "./models", "target": "/root/.cache/huggingface"},
                "{type: bind, source: ./models, target: /root/.cache/huggingface}",
            ),
        ],
    )
    def test_cache_mount_replaced(
        self, tmp_path: Path, volume: str | dict[str, str], described: str
    ) -> None:
        """Short and long syntax mounts of the HF home or hub become the hub mount, in place."""
        volumes = ["./data:/data", volume, "/etc/localtime:/etc/localtime:ro"]
        project = load(tmp_path, one_model(GPT2, {"volumes": volumes}))
        assert service(project, "m")["volumes"] == [
            "./data:/data",
            hub_mount(tmp_path),
            "/etc/localtime:/etc/localtime:ro",
        ]
        assert f"volume {described} → {hub_mount(tmp_path)}" in notes_of(project, "tiny")

    @pytest.mark.parametrize(
        ("volume", "described"),
        [
            ("./models:/root/.cache/huggingface:ro", "./models:/root/.cache/huggingface:ro"),
            (
                {"type": "bind", "source": "./hub", "target": HUB_TARGET, "read_only": True},
                f"{{type: bind, source: ./hub, target: {HUB_TARGET}, read_only: true}}",
            ),
        ],
    )
    def test_read_only_kept(
        self, tmp_path: Path, volume: str | dict[str, Any], described: str
    ) -> None:
        """A read-only cache mount stays read-only."""
        project = load(tmp_path, one_model(GPT2, {"volumes": [volume]}))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path) + ":ro"]
        assert f"volume {described} → {hub_mount(tmp_path)}:ro" in notes_of(project, "tiny")

    def test_added_when_missing(self, tmp_path: Path) -> None:
        """A model service without a cache mount gets one after its own volumes."""
        project = load(tmp_path, one_model(GPT2, {"volumes": ["./data:/data"]}))
        assert service(project, "m")["volumes"] == ["./data:/data", hub_mount(tmp_path)]
        assert f"added volume {hub_mount(tmp_path)}" in notes_of(project, "tiny")

    def test_added_when_no_volumes(self, tmp_path: Path) -> None:
        """A model service without any volumes gets a volumes list."""
        project = load(tmp_path, one_model(GPT2))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path)]

    def test_second_cache_mount_removed(self, tmp_path: Path) -> None:
        """Mounting both the HF home and the hub collapses into one hub mount."""
        volumes = ["./models:/root/.cache/huggingface", f"./models/hub:{HUB_TARGET}"]
        project = load(tmp_path, one_model(GPT2, {"volumes": volumes}))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path)]
        assert f"removed volume ./models/hub:{HUB_TARGET}: {HUB_TARGET} is mounted" in notes_of(
            project, "tiny"
        )

    def test_correct_mount_is_not_a_change(self, tmp_path: Path) -> None:
        """A file that already mounts the hub where the daemon would gets no volume note."""
        project = load(tmp_path, one_model(GPT2, {"volumes": [hub_mount(tmp_path)]}))
        assert service(project, "m")["volumes"] == [hub_mount(tmp_path)]
        assert not any("volume" in note for note in notes_of(project, "tiny"))

    def test_sidecar_untouched(self, tmp_path: Path) -> None:
        """A service in the profile that runs no model keeps its volumes and environment."""
        metrics = {
            "image": "prom/prometheus",
            "profiles": ["tiny"],
            "volumes": ["./models:/root/.cache/huggingface"],
            "environment": ["HF_HUB_OFFLINE=0"],
        }
        project = load(tmp_path, one_model(GPT2, others={"metrics": metrics}))
        assert service(project, "metrics") == metrics
        assert project.models["tiny"].services == ("m", "metrics")


class TestEnvironment:
    @pytest.mark.parametrize(
        ("environment", "expected", "note"),
        [
            (
                ["A=1", "HF_HUB_OFFLINE=0", "B=2"],
                ["A=1", "HF_HUB_OFFLINE=1", "B=2"],
                "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1",
            ),
            (
                ["A=1", "HF_HUB_OFFLINE"],
                ["A=1", "HF_HUB_OFFLINE=1"],
                "HF_HUB_OFFLINE → HF_HUB_OFFLINE=1",
            ),
            (["A=1"], ["A=1", "HF_HUB_OFFLINE=1"], "added HF_HUB_OFFLINE=1"),
            (
                {"A": "1", "HF_HUB_OFFLINE": "0"},
                {"A": "1", "HF_HUB_OFFLINE": "1"},
                "HF_HUB_OFFLINE=0 → HF_HUB_OFFLINE=1",
            ),
            (
                {"HF_HUB_OFFLINE": None},
                {"HF_HUB_OFFLINE": "1"},
                "HF_HUB_OFFLINE → HF_HUB_OFFLINE=1",
            ),
            ({"A": "x"}, {"A": "x", "HF_HUB_OFFLINE": "1"}, "added HF_HUB_OFFLINE=1"),
        ],
    )
    def test_offline_set_in_the_same_form(
        self, tmp_path: Path, environment: Any, expected: Any, note: str
    ) -> None:
        """HF_HUB_OFFLINE=1 replaces the old entry in place, keeping list or mapping form."""
        project = load(tmp_path, one_model(GPT2, {"environment": environment}))
        assert service(project, "m")["environment"] == expected
        assert note in notes_of(project, "tiny")

    def test_added_as_mapping_when_absent(self, tmp_path: Path) -> None:
        """A service without environment gets a mapping with the one variable."""
        project = load(tmp_path, one_model(GPT2))
        assert service(project, "m")["environment"] == {"HF_HUB_OFFLINE": "1"}
        assert "added HF_HUB_OFFLINE=1" in notes_of(project, "tiny")

    @pytest.mark.parametrize("environment", [["HF_HUB_OFFLINE=1"], {"HF_HUB_OFFLINE": 1}])
    def test_already_offline_is_not_a_change(self, tmp_path: Path, environment: Any) -> None:
        """An environment that already says offline is left as written."""
        project = load(tmp_path, one_model(GPT2, {"environment": environment}))
        assert service(project, "m")["environment"] == environment
        assert not any("HF_HUB_OFFLINE" in note for note in notes_of(project, "tiny"))


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

    def test_merged_base_is_rewritten(self, tmp_path: Path) -> None:
        """A service that takes command and environment from a merged base gets them rewritten."""
        project = load(tmp_path, self.TEXT)
        first = service(project, "first")
        assert first["command"] == [
            "--model",
            "Org/base",
            "--dtype",
            "auto",
            "--served-model-name",
            "first",
        ]
        assert first["environment"] == ["HF_HUB_OFFLINE=1", "SHARED=1"]
        assert first["volumes"] == [hub_mount(tmp_path)]
        assert first["restart"] == "unless-stopped"

    def test_service_keys_override_the_base(self, tmp_path: Path) -> None:
        """Keys the service sets itself win over the merged base."""
        project = load(tmp_path, self.TEXT)
        second = service(project, "second")
        assert second["command"] == ["--model", "Org/second", "--served-model-name", "second"]
        assert second["environment"] == ["HF_HUB_OFFLINE=1", "SHARED=1"]
        assert second["restart"] == "no"
        assert project.models["second"].repo == "Org/second"

    def test_anchor_block_not_mutated(self, tmp_path: Path) -> None:
        """Rewriting the merged services leaves the anchor block as written."""
        project = load(tmp_path, self.TEXT)
        assert project.document["x-base"] == yaml.safe_load(textwrap.dedent(self.TEXT))["x-base"]

    def test_render_writes_no_aliases(self, tmp_path: Path) -> None:
        """The rendered file spells merged values out instead of using &id/*id references."""
        text = render(load(tmp_path, self.TEXT))
        assert "&" not in text and "*" not in text


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
        volumes: ["./models:/root/.cache/huggingface"]
        command: redis-server --appendonly yes
    networks: {llm: {}}
    volumes: {data: {}}
    """

    def test_shared_service_untouched(self, tmp_path: Path) -> None:
        """A service with no profile comes out exactly as the file has it."""
        project = load(tmp_path, self.TEXT)
        assert service(project, "redis") == {
            "image": "redis",
            "ports": ["22:22"],
            "environment": {"FLAG": "yes", "HF_HUB_OFFLINE": "0"},
            "volumes": ["./models:/root/.cache/huggingface"],
            "command": "redis-server --appendonly yes",
        }
        assert project.shared_services == ("redis",)

    def test_other_service_keys_kept(self, tmp_path: Path) -> None:
        """Only command, volumes and environment change on a model service, keys in order."""
        project = load(tmp_path, self.TEXT)
        original = yaml.safe_load(textwrap.dedent(self.TEXT))["services"]["engine"]
        rewritten = service(project, "engine")
        changed = {"command", "volumes", "environment"}
        assert {k: v for k, v in rewritten.items() if k not in changed} == {
            k: v for k, v in original.items() if k not in changed
        }
        assert list(rewritten)[: len(original)] == list(original)
        assert project.models["small"].display_name == "GPT-2"
        assert project.models["small"].stop_timeout == 90.0
        assert project.models["small"].container_port == 8000

    def test_top_level_keys_kept(self, tmp_path: Path) -> None:
        """name, networks, volumes and x- blocks pass through."""
        project = load(tmp_path, self.TEXT)
        assert project.name == "stack"
        assert project.document["name"] == "stack"
        assert project.document["x-notes"] == {"owner": "me"}
        assert project.document["networks"] == {"llm": {}}
        assert project.document["volumes"] == {"data": {}}

    def test_yaml_1_2_scalars_survive(self, tmp_path: Path) -> None:
        """`22:22` and `yes` stay strings, as compose reads them, not 1342 and true."""
        rendered = yaml.safe_load(render(load(tmp_path, self.TEXT)))
        assert rendered["services"]["redis"]["ports"] == ["22:22"]
        assert rendered["services"]["redis"]["environment"]["FLAG"] == "yes"

    @pytest.mark.parametrize("name", ["preservation", "seed", "anchors"])
    def test_render_round_trips(self, tmp_path: Path, name: str) -> None:
        """render() is YAML that loads back to the same document."""
        text = {"preservation": self.TEXT, "seed": SEED, "anchors": TestAnchorsAndMergeKeys.TEXT}
        project = load(tmp_path, text[name])
        assert yaml.safe_load(render(project)) == project.document


def vllm(profiles: list[str], **keys: Any) -> dict[str, Any]:
    """A vLLM service serving gpt2 in the given profiles."""
    return {"image": "vllm/vllm-openai", "profiles": profiles, "command": GPT2, **keys}


def compose(**services: dict[str, Any]) -> str:
    return yaml.safe_dump({"services": services}, sort_keys=False)


class TestModelSpec:
    def test_models_and_services_in_file_order(self, tmp_path: Path) -> None:
        """Models are listed by first appearance; a model's services in file order."""
        text = compose(
            b_engine=vllm(["beta"]),
            a_engine=vllm(["alpha"]),
            sidecar={"image": "busybox", "profiles": ["alpha", "beta"]},
        )
        project = load(tmp_path, text)
        assert list(project.models) == ["beta", "alpha"]
        assert project.models["alpha"].services == ("a_engine", "sidecar")
        assert project.models["beta"].services == ("b_engine", "sidecar")

    def test_engine_marked_in_x_orchestrator(self, tmp_path: Path) -> None:
        """`engine: true` picks the engine over the first service with a model."""
        gateway = {"image": "nginx", "profiles": ["chat"], "x-orchestrator": {"engine": True}}
        project = load(tmp_path, compose(server=vllm(["chat"]), gateway=gateway))
        spec = project.models["chat"]
        assert spec.engine_service == "gateway"
        assert spec.repo == "gpt2"
        assert spec.served_name == "chat"

    def test_engine_is_first_service_with_a_model(self, tmp_path: Path) -> None:
        """Without a mark, the first service that passes a model serves."""
        init = {"image": "busybox", "profiles": ["chat"]}
        project = load(tmp_path, compose(init=init, server=vllm(["chat"])))
        assert project.models["chat"].engine_service == "server"

    def test_engine_false_opts_out(self, tmp_path: Path) -> None:
        """`engine: false` keeps a service with a model from being chosen as the engine."""
        helper = vllm(["chat"], **{"x-orchestrator": {"engine": False}})
        project = load(tmp_path, compose(helper=helper, server=vllm(["chat"])))
        assert project.models["chat"].engine_service == "server"
        assert project.problems["chat"] == []

    def test_engine_falls_back_to_first_service(self, tmp_path: Path) -> None:
        """With no model argument anywhere the first service is the engine, and that's a problem."""
        text = compose(
            server={"image": "ghcr.io/some/llm", "profiles": ["chat"]},
            other={"image": "busybox", "profiles": ["chat"]},
        )
        project = load(tmp_path, text)
        spec = project.models["chat"]
        assert spec.engine_service == "server"
        assert spec.model_arg == ""
        assert spec.repo is None
        assert spec.served_name == "chat"
        assert project.problems["chat"] == [
            "no service of profile chat passes vLLM a model (--model or a positional model)"
        ]

    def test_overrides_beat_x_orchestrator(self, tmp_path: Path) -> None:
        """Settings from the daemon's config file win key by key over x-orchestrator."""
        declared = {
            "display_name": "From compose",
            "health_path": "/ready",
            "startup_timeout": 60,
            "upstream": "http://compose:1",
        }
        project = load(
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
        assert service(project, "m")["x-orchestrator"] == declared

    def test_override_names_the_engine(self, tmp_path: Path) -> None:
        """The config file's engine setting names the service that serves HTTP."""
        text = compose(server=vllm(["chat"]), gateway={"image": "nginx", "profiles": ["chat"]})
        project = load(tmp_path, text, {"chat": {"engine": "gateway"}})
        assert project.models["chat"].engine_service == "gateway"
        with pytest.raises(ComposeError, match="'nowhere' is not one of its services"):
            load(tmp_path, text, {"chat": {"engine": "nowhere"}})

    @pytest.mark.parametrize(
        ("keys", "port"),
        [
            ({"x-orchestrator": {"port": 7000}, "command": [*GPT2, "--port", "8100"]}, 7000),
            ({"command": [*GPT2, "--port", "8100"], "ports": ["9000:9001"]}, 8100),
            ({"command": [*GPT2, "--port=8100"], "ports": ["9000:9001"]}, 8100),
            ({"ports": ["9000:9001", "9100:9101"]}, 9001),
            ({"ports": ["127.0.0.1:9000:9001/tcp"]}, 9001),
            ({"ports": ["[::1]:9000:9001"]}, 9001),
            ({"ports": ["9001"]}, 9001),
            ({"ports": [9001]}, 9001),
            ({"ports": ["9000-9001:8000-8001"]}, 8000),
            ({"ports": [{"target": 9002, "published": 9000}]}, 9002),
            ({"ports": []}, DEFAULT_ENGINE_PORT),
            ({}, DEFAULT_ENGINE_PORT),
        ],
    )
    def test_port_discovery_order(self, tmp_path: Path, keys: dict[str, Any], port: int) -> None:
        """x-orchestrator port, then --port, then the first ports target, then 8000."""
        project = load(tmp_path, one_model(GPT2, keys))
        assert project.models["tiny"].container_port == port

    def test_unreadable_port_is_a_problem(self, tmp_path: Path) -> None:
        """A --port that is not a number falls back to 8000 and says so."""
        project = load(tmp_path, one_model([*GPT2, "--port", "$PORT"]))
        assert project.models["tiny"].container_port == DEFAULT_ENGINE_PORT
        assert project.problems["tiny"] == ["m: --port $PORT is not a port number"]

    @pytest.mark.parametrize(
        ("grace", "seconds"),
        [
            ("30s", 30.0),
            ("1m30s", 90.0),
            (10, 10.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1.5s", 1.5),
        ],
    )
    def test_stop_grace_period(self, tmp_path: Path, grace: str | int, seconds: float) -> None:
        """Compose durations and bare seconds become stop_timeout in seconds."""
        project = load(tmp_path, one_model(GPT2, {"stop_grace_period": grace}))
        assert project.models["tiny"].stop_timeout == seconds

    @pytest.mark.parametrize("grace", ["soon", "30", "1d"])
    def test_bad_stop_grace_period(self, tmp_path: Path, grace: str) -> None:
        """A duration compose could not read is a ComposeError naming the key."""
        with pytest.raises(ComposeError, match="stop_grace_period"):
            load(tmp_path, one_model(GPT2, {"stop_grace_period": grace}))


class TestProblems:
    def test_engine_without_image_or_build(self, tmp_path: Path) -> None:
        """An engine compose cannot start is flagged."""
        project = load(tmp_path, compose(m={"profiles": ["tiny"], "command": GPT2}))
        assert project.problems["tiny"] == ["m: the engine service has no image and no build"]

    def test_build_is_enough(self, tmp_path: Path) -> None:
        """An engine built from a Dockerfile needs no image."""
        project = load(tmp_path, compose(m={"build": ".", "profiles": ["tiny"], "command": GPT2}))
        assert project.problems["tiny"] == []

    def test_x_orchestrator_on_a_non_engine_is_reported(self, tmp_path: Path) -> None:
        """Settings placed on a sidecar are reported, not silently lost."""
        sidecar = {
            "image": "busybox",
            "profiles": ["tiny"],
            "x-orchestrator": {"display_name": "Lost"},
        }
        project = load(tmp_path, one_model(GPT2, others={"sidecar": sidecar}))
        assert project.models["tiny"].display_name == "tiny"
        assert project.problems["tiny"] == [
            "sidecar: x-orchestrator is ignored because m is the engine service; move it there"
        ]


class TestErrors:
    @pytest.mark.parametrize("profile", ["-bad", "x", "has space", "ü-model"])
    def test_bad_profile_name(self, tmp_path: Path, profile: str) -> None:
        """A profile compose would refuse is a ComposeError naming it."""
        with pytest.raises(ComposeError, match="is not a valid profile name"):
            load(tmp_path, compose(m=vllm([profile])))

    def test_unknown_override_key(self, tmp_path: Path) -> None:
        """A misspelt config-file setting names the key and the model."""
        with pytest.raises(ComposeError, match=r"model 'tiny'.*unknown setting 'helth_path'"):
            load(tmp_path, one_model(GPT2), {"tiny": {"helth_path": "/x"}})

    def test_unknown_x_orchestrator_key(self, tmp_path: Path) -> None:
        """A misspelt x-orchestrator key names the key and the service."""
        text = one_model(GPT2, {"x-orchestrator": {"prot": 1}})
        with pytest.raises(ComposeError, match=r"services\.m\.x-orchestrator: unknown setting"):
            load(tmp_path, text)

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"port": "8000"}, "port must be a port number"),
            ({"startup_timeout": 0}, "startup_timeout must be a positive number"),
            ({"health_path": "health"}, "health_path must be a path"),
            ({"upstream": "localhost:8000"}, "upstream must be an http"),
            ({"display_name": ""}, "display_name must be a non-empty string"),
            ({"engine": True}, "engine must name one of the model's services"),
        ],
    )
    def test_bad_setting_values(
        self, tmp_path: Path, settings: dict[str, Any], message: str
    ) -> None:
        """Settings of the wrong type are refused with what was expected."""
        with pytest.raises(ComposeError, match=message):
            load(tmp_path, one_model(GPT2), {"tiny": settings})

    def test_override_for_unknown_model(self, tmp_path: Path) -> None:
        """Config-file settings for a profile the file lacks are an error, not ignored."""
        with pytest.raises(ComposeError, match="has no profile 'typo'"):
            load(tmp_path, one_model(GPT2), {"typo": {}})

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable file is a ComposeError naming the file."""
        with pytest.raises(ComposeError, match=r"cannot read compose file .*nope\.yml"):
            load_project(tmp_path / "nope.yml", tmp_path / "models")

    def test_invalid_yaml(self, tmp_path: Path) -> None:
        """A YAML syntax error is a ComposeError with the parser's position."""
        with pytest.raises(ComposeError, match=r'(?s)not valid YAML.*docker-compose\.yml", line 2'):
            load(tmp_path, "services: [\n")

    @pytest.mark.parametrize("text", ["", "- a\n", "services: [a]\n", "name: x\n"])
    def test_no_services_mapping(self, tmp_path: Path, text: str) -> None:
        """A file without a services mapping is refused."""
        with pytest.raises(ComposeError, match="has no services mapping"):
            load(tmp_path, text)

    def test_compose_error_is_a_value_error(self) -> None:
        """Callers may catch ComposeError as ValueError."""
        assert issubclass(ComposeError, ValueError)
