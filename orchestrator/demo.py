"""`model-orchestrator demo`: the whole product on any machine with Docker, no GPU, no weights.

The demo builds (once) a small engine image from the stand-in engine that ships in this
package, writes a project of three models into a folder (a compose file, and a hub cache
of tiny fake snapshots), and serves it: switches, rollbacks, /health, the gateway and the
dashboard all work as they do with vLLM, but the engines answer with filler text and say
so in every answer. Ctrl-C stops the daemon and removes the demo's containers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

import orchestrator

from .docker import detect_compose_cli, run_compose, runtime_environment
from .errors import DockerError

PROJECT = "mo-demo"
DEFAULT_BASE_IMAGE = "python:3.12-slim"
IMAGE = f"model-orchestrator/demo-engine:{orchestrator.__version__}"
DEFAULT_FOLDER = Path("model-orchestrator-demo")
# A made-up commit: the demo's snapshots are laid out as huggingface_hub does it.
COMMIT = "0000000000000000000000000000000000000d30"


@dataclass(frozen=True)
class DemoModel:
    id: str
    repo: str
    name: str
    load_seconds: float
    crashes: bool = False


MODELS = (
    DemoModel("tiny-chat", "demo/tiny-chat", "Tiny Chat (demo engine)", 2.0),
    DemoModel("tiny-coder", "demo/tiny-coder", "Tiny Coder (demo engine)", 3.0),
    DemoModel("crashy", "demo/crashy", "Crashy (demo engine, always crashes)", 1.0, True),
)


def compose_document(image: str) -> dict[str, object]:
    """The demo's compose project: one profile a model, as a user would write it."""
    services: dict[str, object] = {}
    for model in MODELS:
        environment = {
            "STANDIN_FILLER": "1",
            "STANDIN_LOAD_DELAY": f"{model.load_seconds:g}",
            "STANDIN_TOKEN_DELAY": "0.03",
        }
        if model.crashes:
            environment["STANDIN_CRASH"] = "1"
        services[f"engine-{model.id}"] = {
            "image": image,
            "profiles": [model.id],
            "command": ["--model", model.repo, "--max-model-len", "4096"],
            "ports": ["127.0.0.1::8000"],
            "environment": environment,
            "volumes": ["./models/hub:/root/.cache/huggingface/hub:ro"],
            "stop_grace_period": "3s",
            "x-orchestrator": {"display_name": model.name, "startup_timeout": 60},
        }
    return {"name": PROJECT, "services": services}


def write_project(folder: Path, image: str) -> Path:
    """The compose file and a hub cache of the demo's models; returns the compose file."""
    folder.mkdir(parents=True, exist_ok=True)
    compose_file = folder / "docker-compose.yml"
    compose_file.write_text(
        "# model-orchestrator's demo: engines that answer with filler text, no GPU needed.\n"
        + yaml.safe_dump(compose_document(image), sort_keys=False)
    )
    hub = folder / "models" / "hub"
    for model in MODELS:
        repo_dir = hub / ("models--" + model.repo.replace("/", "--"))
        snapshot = repo_dir / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text('{"model_type": "demo"}\n')
        (snapshot / "model.safetensors").write_bytes(b"\0" * 64)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(COMMIT)
    return compose_file


def instructions(url: str) -> str:
    """What to try, as commands to paste: each command on a line of its own after '$ '."""
    json = "-H 'Content-Type: application/json'"
    chat = (
        'python3 -c "from openai import OpenAI; '
        f"llm = OpenAI(base_url='{url}/v1', api_key='none'); "
        "print(llm.chat.completions.create(model='tiny-coder', "
        "messages=[{'role': 'user', 'content': 'hello'}]).choices[0].message.content)\""
    )
    watch = (
        f'curl -s -X POST {url}/switch {json} -d \'{{"model": "tiny-chat", "wait": false}}\''
        " > /dev/null; for i in 1 2 3 4 5 6 7 8; do"
        f" curl -s -o /dev/null -w '%{{http_code}} ' {url}/health; sleep 0.5; done; echo"
    )
    return "\n".join(
        [
            f"Dashboard: {url}/",
            "",
            "Try it:",
            "  1. Switch the GPU to a model (about 2 s for the demo engine, a minute for vLLM):",
            f'     $ curl -X POST {url}/switch {json} -d \'{{"model": "tiny-chat"}}\'',
            "  2. Chat through the OpenAI-compatible /v1 (it switches by itself; pip install"
            " openai):",
            f"     $ {chat}",
            "  3. Watch /health during a switch: 503 while it swaps, 200 once the model is ready:",
            f"     $ {watch}",
            "  And a model that crashes while it loads, to see the rollback:",
            f'     $ curl -X POST {url}/switch {json} -d \'{{"model": "crashy"}}\'',
            "",
            "Press Ctrl-C to stop the daemon; the demo's containers go with it.",
        ]
    )


async def docker_build_environment() -> dict[str, str]:
    """The legacy builder where the docker CLI has no buildx, which BuildKit needs."""
    environment = dict(os.environ)
    probe = await asyncio.create_subprocess_exec(
        "docker",
        "buildx",
        "version",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await probe.wait() != 0:
        environment["DOCKER_BUILDKIT"] = "0"
    return environment


async def ensure_image(base_image: str, image: str = IMAGE, rebuild: bool = False) -> bool:
    """Build the demo engine's image from the packaged stand-in, unless it is there;
    True when it was built now."""
    if not rebuild:
        found = await asyncio.create_subprocess_exec(
            "docker",
            "image",
            "inspect",
            image,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await found.wait() == 0:
            return False
    with tempfile.TemporaryDirectory(prefix="mo-demo-engine-") as context:
        source = resources.files("orchestrator") / "engine"
        with resources.as_file(source) as engine:
            shutil.copytree(engine, context, dirs_exist_ok=True, ignore=_no_caches)
        build = await asyncio.create_subprocess_exec(
            "docker",
            "build",
            "--build-arg",
            f"BASE_IMAGE={base_image}",
            "--tag",
            image,
            context,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=await docker_build_environment(),
        )
        output, _ = await build.communicate()
    if build.returncode != 0:
        tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-6:])
        raise DockerError(
            f"building the demo engine's image on {base_image} failed: {tail}; give another"
            " base with --base-image (any image with python3)"
        )
    return True


def _no_caches(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__" or name.endswith(".pyc")]


async def remove_containers(folder: Path) -> None:
    """Every container of the demo's project, stopped and removed; its network too."""
    copy = folder / "state" / "compose.yml"
    cli = await detect_compose_cli()
    files = (
        ["--file", str(copy)] if copy.is_file() else ["--file", str(folder / "docker-compose.yml")]
    )
    argv = [*cli, "--project-name", PROJECT, "--project-directory", str(folder), *files]
    await run_compose(
        [*argv, "--profile", "*", "down", "--remove-orphans", "--timeout", "3"],
        runtime_environment(os.environ),
        time_limit=120,
        what="down",
    )


Serve = Callable[[Path, Callable[[str], None]], Awaitable[None]]


async def run_demo(
    folder: Path, base_image: str, url: str, serve: Serve, rebuild: bool = False
) -> int:
    """Build, write, serve until Ctrl-C, clean up. ``serve(compose_file, announce)`` runs
    the daemon and calls ``announce`` with what to print once it listens. ``folder`` is
    absolute."""
    say = _printer()
    say("model-orchestrator demo: engines that answer with filler text; nothing here is a model")
    if await ensure_image(base_image, rebuild=rebuild):
        say(f"built the demo engine's image {IMAGE} on {base_image}")
    compose_file = write_project(folder, IMAGE)
    say(f"demo project written to {folder} (three models, a tiny fake Hugging Face cache)")
    try:
        await serve(compose_file, lambda _: say(instructions(url)))
    finally:
        try:
            await remove_containers(folder)
            say(f"demo stopped; its containers are removed (the project stays in {folder})")
        except DockerError as err:
            say(f"could not remove the demo's containers: {err.message}")
    return 0


def _printer() -> Callable[[str], None]:
    def say(text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    return say
