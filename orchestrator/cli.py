"""The ``model-orchestrator`` command.

``serve`` runs the daemon, ``doctor`` checks the machine, ``check`` reviews compose,
``pull`` downloads a model into the hub cache, ``models`` changes the running daemon's,
``haproxy-config`` writes the configuration for several daemons behind HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import structlog
from aiohttp import web

from . import __version__, eventloop
from .api import plain_probe_answers
from .banner import banner
from .cache import Verdicts, looks_like_path
from .catalog import NORMALIZED_COMPOSE
from .client import DEFAULT_URL, DaemonRefused, DaemonUnavailable, call, format_models
from .compose import ComposeError, ComposeProject, canonical, render, rewrite_project
from .config import Settings, load_settings
from .daemon import DATABASE, build_daemon, compose_reader
from .demo import DEFAULT_BASE_IMAGE, DEFAULT_FOLDER, run_demo
from .demo import PROJECT as DEMO_PROJECT
from .docker import (
    Docker,
    detect_compose_cli,
    image_reader,
    runtime_environment,
)
from .doctor import Checkup, Finding, doctor
from .errors import OrchestratorError
from .haproxy import FleetOptions, parse_daemon
from .haproxy import render as render_haproxy
from .logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from .probes import PlainProbes
from .pull import PullProgress, pull
from .registry import ModelEntry
from .server import (
    QuietExhaustion,
    freeze_startup_heap,
    listen,
    raise_descriptor_limit,
)
from .store import Store

log = structlog.get_logger(__name__)


PROG = "model-orchestrator"
_FORMATTER = argparse.RawDescriptionHelpFormatter


def _global_options(*, inherited: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    The main parser holds the defaults; each command's copy has none (SUPPRESS), so a value
    given before the command's name is kept unless it is given again after it, which wins.
    """
    options = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if inherited else None
    group = options.add_argument_group("global options")
    group.add_argument(
        "--url",
        default=default,
        help=f"the daemon's address, for models (ORCHESTRATOR_URL, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="YAML settings file (ORCHESTRATOR_CONFIG)",
    )
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help="serve: info (ORCHESTRATOR_LOG_LEVEL); other commands: warning",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default,
        help="console: for people; json: a JSON object a line; auto (default): console on a"
        " terminal",
    )
    return options


def _examples(*lines: str) -> str:
    title = "Example:" if len(lines) == 1 else "Examples:"
    return "\n".join([title, *(f"  {PROG} {line}" for line in lines)])


def _command(
    commands: Any, name: str, help_text: str, examples: Sequence[str], **kwargs: Any
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=kwargs.pop("description", help_text[:1].upper() + help_text[1:] + "."),
        epilog=_examples(*examples),
        formatter_class=_FORMATTER,
        parents=[_global_options(inherited=True), *kwargs.pop("parents", [])],
        **kwargs,
    )
    return parser


def _project_flags(parser: argparse.ArgumentParser, *, listens: bool = False) -> None:
    parser.add_argument(
        "--compose",
        dest="compose_files",
        action="append",
        help="a compose file, as docker compose -f takes it; give it again for more"
        " (else COMPOSE_FILE, else compose/docker-compose.yml)",
    )
    parser.add_argument(
        "--env-file",
        dest="env_files",
        action="append",
        help="a file compose reads variables from (else the project folder's .env)",
    )
    parser.add_argument(
        "--models-dir", help="root of the Hugging Face cache; holds hub/ (./models)"
    )
    parser.add_argument("--state-dir", help="the daemon's own files and database (./.state)")
    parser.add_argument(
        "--project-name", help="compose project name (else COMPOSE_PROJECT_NAME, else compose's)"
    )
    if listens:
        parser.add_argument("--host", help="address to listen on (127.0.0.1)")
        parser.add_argument("--port", type=int, help="port to listen on (8080)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Swap one GPU between vLLM models kept as docker-compose profiles.",
        epilog=_examples(
            "doctor --compose compose/docker-compose.yml --models-dir models",
            "serve --compose compose/docker-compose.yml --models-dir models",
        ),
        formatter_class=_FORMATTER,
        parents=[_global_options(inherited=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = _command(
        commands,
        "serve",
        "run the daemon",
        [
            "serve --compose compose/docker-compose.yml --models-dir models",
            "serve --host 0.0.0.0 --port 8080 --config /etc/model-orchestrator.yml",
        ],
    )
    _project_flags(serve_parser, listens=True)
    serve_parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve a non-loopback address without API keys (anyone who reaches the port"
        " can run containers on this host); without it such a bind requires a key, generated"
        " into <state-dir>/api-key when none is set",
    )
    doctor_parser = _command(
        commands,
        "doctor",
        "check that this machine can serve, and say what to run where it cannot",
        ["doctor --compose compose/docker-compose.yml --models-dir models"],
        description="Check Docker, Compose v2, the NVIDIA runtime and GPUs, the compose"
        " project, each model's weights, the folders and the port: one line each, with a"
        " fix for whatever is not ok. Exit 1 when serve could not work.",
    )
    _project_flags(doctor_parser, listens=True)
    check_parser = _command(
        commands,
        "check",
        "show what the daemon rewrites and what is wrong; non-zero exit on errors",
        ["check --compose compose/docker-compose.yml --models-dir models --show"],
    )
    _project_flags(check_parser)
    check_parser.add_argument(
        "--show", action="store_true", help="print the whole rewritten project as well"
    )
    pull_parser = _command(
        commands,
        "pull",
        "download a model into <models-dir>/hub; exit 0 once it can be served",
        [
            "pull text-4b --compose compose/docker-compose.yml --models-dir models",
            "pull Qwen/Qwen2.5-0.5B-Instruct --revision main --models-dir models",
        ],
        description="Download a model into <models-dir>/hub with huggingface_hub, which reads"
        " HF_TOKEN and HF_ENDPOINT. After an interrupted pull, pulling again fetches only"
        " the files that are not complete yet.",
    )
    pull_parser.add_argument(
        "target",
        metavar="REPO_OR_MODEL",
        help="a model id (of the compose file or the registry), or a Hub repo id",
    )
    pull_parser.add_argument("--revision", help="branch, tag or commit (the default branch)")
    _project_flags(pull_parser)
    _models_parser(commands)
    _haproxy_parser(commands)
    demo = _command(
        commands,
        "demo",
        "see what the daemon does, without a GPU or weights (needs Docker)",
        ["demo", "demo --dir /tmp/mo-demo --port 8090"],
        description="Build a small demo engine image (once), write a demo project of three"
        " models into a folder, and serve it. The engines answer with filler text.",
    )
    demo.add_argument(
        "--dir", type=Path, default=DEFAULT_FOLDER, help=f"where to write it (./{DEFAULT_FOLDER})"
    )
    demo.add_argument(
        "--base-image",
        default=DEFAULT_BASE_IMAGE,
        help=f"image with python3 to build the demo engine on ({DEFAULT_BASE_IMAGE})",
    )
    demo.add_argument("--rebuild", action="store_true", help="build the engine's image again")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    return parser


def _haproxy_parser(commands: Any) -> None:
    fleet = _command(
        commands,
        "haproxy-config",
        "print an HAProxy configuration for several daemons (one per GPU), routed by model",
        [
            "haproxy-config --daemon http://127.0.0.1:8081 --daemon http://127.0.0.1:8082"
            " > /etc/haproxy/haproxy.cfg",
            "haproxy-config --daemon http://gpu-a:8080 --daemon http://gpu-b:8080"
            " --listen :8000 --api-key-env ORCHESTRATOR_API_KEY",
        ],
        description="Ask each daemon for its models (GET /models) and its agent check"
        " (GET /status), and print a complete HAProxy 2.6 configuration: /v1 routed by the"
        " model a request names to a daemon that holds it, else to one free to switch to it."
        " HAProxy forwards each client's Authorization header unchanged; no key is written"
        " into the configuration.",
    )
    fleet.add_argument(
        "--daemon",
        dest="daemons",
        action="append",
        required=True,
        metavar="URL",
        help="a daemon's address, http://HOST:PORT; give it once per daemon",
    )
    fleet.add_argument("--listen", default=":8000", help="where HAProxy listens for /v1 (:8000)")
    fleet.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the variable holding a key for the daemons' /models and /status (with"
        " protect_reads); the key is used for these calls only",
    )
    fleet.add_argument(
        "--check-interval",
        type=int,
        default=1000,
        metavar="MS",
        help="milliseconds between HAProxy's checks of each daemon (1000)",
    )
    fleet.add_argument(
        "--agent-port",
        type=int,
        help="the agent check's port for daemons whose /status names none",
    )
    fleet.add_argument("--stats-socket", metavar="PATH", help="add HAProxy's admin socket at PATH")


async def haproxy_config(args: argparse.Namespace) -> int:
    """Print the fleet's HAProxy configuration; warnings go to stderr."""
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            _error(f"--api-key-env {args.api_key_env}: that variable is not set")
            return 1
    daemons = []
    try:
        for url in args.daemons:
            listing = await call(url, "GET", "/models", api_key=key)
            status = await call(url, "GET", "/status", api_key=key)
            daemons.append(parse_daemon(url, listing.get("models"), status))
    except (DaemonUnavailable, DaemonRefused) as err:
        _error(str(err))
        return 1
    options = FleetOptions(
        listen=args.listen,
        check_interval_ms=args.check_interval,
        stats_socket=args.stats_socket,
        agent_port=args.agent_port,
    )
    text, warnings = render_haproxy(daemons, options)
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(text, end="")
    return 0


def _models_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="the daemon's API key (else ORCHESTRATOR_API_KEY, which other users cannot see"
        " in ps as they can an argument)",
    )
    return options


def _models_parser(commands: Any) -> None:
    models = _command(
        commands,
        "models",
        "list and change the running daemon's models (through its HTTP API)",
        ["models list --url http://gpu-box:8080", "models add Qwen/Qwen2.5-0.5B-Instruct"],
        parents=[_models_options()],
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, *examples: str) -> argparse.ArgumentParser:
        return _command(
            actions, name, help_text, [f"models {e}" for e in examples], parents=[_models_options()]
        )

    listing = action("list", "every model, its state and cache verdict", "list --format csv")
    listing.add_argument("--format", choices=["table", "json", "csv"], default="table")
    add = action(
        "add",
        "register a Hub repo or a local model folder as a new model",
        "add Qwen/Qwen2.5-0.5B-Instruct --id qwen-small --max-model-len 8192",
        "add /srv/train/job_42/checkpoint-100",
    )
    add.add_argument("source", help="a Hub repo id (org/name) or an absolute folder path")
    add.add_argument("--id", dest="model_id", help="the model's id (default: a readable one)")
    add.add_argument("--name", dest="display_name", help="display name")
    add.add_argument("--image", help="engine image (the daemon's engine_image by default)")
    add.add_argument("--gpu-memory-utilization", type=float)
    add.add_argument("--max-model-len", type=int)
    add.add_argument("--tensor-parallel-size", type=int)
    add.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"])
    add.add_argument("--trust-remote-code", action="store_true", default=None)
    add.add_argument("--context-length", type=int)
    add.add_argument("--max-output-tokens", type=int)
    add.add_argument("--vision", action="store_true", default=None)
    add.add_argument("--tools", action="store_true", default=None)
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    for name, text in (
        ("rm", "remove a model added at run time"),
        ("enable", "allow switching to a model"),
        ("disable", "refuse switches to a model"),
    ):
        action(name, text, f"{name} qwen-small").add_argument("model_id", metavar="ID")


def _add_body(args: argparse.Namespace) -> dict[str, Any]:
    source = args.source
    body: dict[str, Any] = (
        {"path": str(Path(source).expanduser().absolute())}
        if looks_like_path(source)
        else {"repo": source}
    )
    if args.model_id:
        body["id"] = args.model_id
    for name in ("display_name", "image"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    engine_names = (
        "gpu_memory_utilization",
        "max_model_len",
        "tensor_parallel_size",
        "dtype",
        "trust_remote_code",
    )
    engine = {n: getattr(args, n) for n in engine_names if getattr(args, n) is not None}
    capability_names = ("context_length", "max_output_tokens", "vision", "tools")
    capabilities = {n: getattr(args, n) for n in capability_names if getattr(args, n) is not None}
    if engine:
        body["engine"] = engine
    if capabilities:
        body["capabilities"] = capabilities
    if args.disabled:
        body["enabled"] = False
    return body


def _error(message: str) -> None:
    """A command's error: one line on stderr, whatever the log settings."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _table_width() -> int:
    """A terminal's width (the table still never cuts an id); 80 columns elsewhere."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return 80


async def models_command(args: argparse.Namespace) -> int:
    """One registry action against the running daemon; prints what it did."""
    url = args.url or os.environ.get("ORCHESTRATOR_URL") or DEFAULT_URL
    key = getattr(args, "api_key", None) or os.environ.get("ORCHESTRATOR_API_KEY") or None
    try:
        if args.action == "list":
            listing = await call(url, "GET", "/models", api_key=key)
            status = await call(url, "GET", "/status", api_key=key)
            models = listing.get("models", [])
            print(format_models(models, status, args.format, width=_table_width()))
        elif args.action == "add":
            added = (await call(url, "POST", "/models", _add_body(args), api_key=key))["model"]
            print(f"added {added['id']} ({added['display_name']})")
        elif args.action == "rm":
            await call(url, "DELETE", f"/models/{quote(args.model_id, safe='')}", api_key=key)
            print(f"removed {args.model_id}")
        else:
            model = quote(args.model_id, safe="")
            await call(url, "POST", f"/models/{model}/{args.action}", api_key=key)
            print(f"{args.action}d {args.model_id}")
    except (DaemonUnavailable, DaemonRefused) as err:
        _error(str(err))
        return 1
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    names = (
        "compose_files",
        "env_files",
        "models_dir",
        "state_dir",
        "project_name",
        "host",
        "port",
        "log_level",
        "log_format",
        "insecure_no_auth",
    )
    flags = {name: getattr(args, name, None) for name in names}
    return load_settings(flags, config_file=args.config)


async def _project(settings: Settings, *, gate: bool = False) -> ComposeProject:
    """The user's project as compose reads it, rewritten (without the registry's models);
    ``gate``: with the start gate, as the daemon writes it, from the images on this machine."""
    document = canonical(await (await compose_reader())(settings.compose_source))
    images = None
    if gate:
        references = (s.get("image") for s in document["services"].values())
        images = await image_reader()(r for r in references if isinstance(r, str))
    return rewrite_project(
        settings.compose_source, document, settings.models_dir, settings.models, images
    )


async def _docker(settings: Settings, normalized: Path, project_name: str) -> Docker:
    """Compose runs our copy with the user's folder as project directory: relative paths hold."""
    return Docker(
        compose_file=normalized,
        project_dir=settings.compose_source.project_dir,
        project_name=project_name,
        compose_cli=await detect_compose_cli(),
        environment=runtime_environment(os.environ),
    )


def _log_findings(findings: Sequence[Finding]) -> None:
    """The start-up checks in the daemon's log: problems as errors, warnings as warnings."""
    for finding in findings:
        event = f"{finding.subject}: {finding.detail}"
        if finding.mark == "problem":
            log.error(event, check=finding.subject, fix=finding.fix)
        elif finding.mark == "warning":
            log.warning(event, check=finding.subject, fix=finding.fix)
        else:
            log.debug(event, check=finding.subject)


async def serve(
    settings: Settings,
    *,
    console: bool = False,
    out: TextIO | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT; whatever fails at start closes what was opened.

    ``console``: the banner goes to ``out`` (stderr, where the logs go) as lines for
    people; otherwise its facts are the ``serving`` log line. ``on_listening`` is told
    the daemon's URL once it accepts connections (the demo).
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(QuietExhaustion())
    descriptors = raise_descriptor_limit()
    checkup = Checkup(settings)
    # Reported, not enforced: what the daemon then fails at says the rest.
    _log_findings(await checkup.before_serve())
    async with contextlib.AsyncExitStack() as stack:
        daemon = await build_daemon(settings, descriptor_limit=descriptors)
        stack.push_async_callback(daemon.close)
        project = daemon.project
        _log_findings(await checkup.gpu_check(project))
        for model_id, problems in project.problems.items():
            for problem in problems:
                log.warning("compose problem", model=model_id, problem=problem)
        for model_id, spec in project.models.items():
            if spec.unusable:
                log.error("model cannot be run", model=model_id, reason=spec.unusable)
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await daemon.start()
        freeze_startup_heap()
        # Cancelling the handler of a client that hung up is what cancels its request to
        # the engine and frees its place in the queue. The keep-alive timeout also runs
        # from a connection's start: one that sends no complete request in time is closed.
        runner = web.AppRunner(
            daemon.app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=settings.header_timeout,
            # Requests in flight get this long to finish when the daemon stops; a log
            # follower or a stream to an engine is cut then, not waited for a minute.
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        probes = PlainProbes(plain_probe_answers(daemon.app), idle_timeout=settings.header_timeout)
        listener = await listen(runner, daemon.connections, settings.host, settings.port, probes)
        stack.callback(listener.close)
        port = int(listener.sockets[0].getsockname()[1]) if listener.sockets else settings.port
        facts = await banner(daemon, port)
        if console:
            print("\n".join(facts.lines()), file=out or sys.stderr, flush=True)
        else:
            log.info(
                "serving",
                **facts.fields(),
                normalized=str(daemon.catalog.paths.normalized),
                max_connections=daemon.connections.max_connections,
            )
        if on_listening is not None:
            on_listening(f"http://{_url_host(settings.host)}:{port}")
        await stopping.wait()
        log.info("shutting down; the running model is left running")


# Seconds the daemon gives requests in flight when it stops (systemd's TimeoutStopSec is 30).
SHUTDOWN_GRACE = 5.0


def _url_host(host: str) -> str:
    """How a browser on this machine reaches a daemon bound to ``host``."""
    if host in {"0.0.0.0", "::", ""}:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def check(settings: Settings, show: bool = False) -> int:
    """Print, per model, what is rewritten and what is wrong; return the exit code."""
    project = await _project(settings, gate=True)
    read = settings.compose_source.read_files
    print(f"files read: {', '.join(str(f) for f in read)}  (project {project.name})")
    errors = 0
    verdicts = Verdicts(settings.models_dir / "hub")
    for model_id, spec in project.models.items():
        print(f"model {model_id}  ({spec.display_name})")
        print(f"  services: {', '.join(spec.services)}  engine: {spec.engine_service}")
        pin = f" at {spec.revision}" if spec.revision else ""
        print(f"  model: {spec.model_arg}{pin}  served as: {spec.served_name}")
        for note in project.notes.get(model_id, []):
            print(f"  rewritten [{note.service}]: {note.what}")
        for problem in project.problems.get(model_id, []):
            errors += 1
            print(f"  ERROR: {problem}")
        for verdict in verdicts.of_model(spec):
            if verdict.status == "present":
                print(f"  weights: present at {verdict.path}")
            else:
                errors += 1
                print(f"  ERROR: {verdict.reason}")
    if project.shared_services:
        print(f"shared services (left alone): {', '.join(project.shared_services)}")
    with tempfile.TemporaryDirectory() as folder:
        normalized = Path(folder) / NORMALIZED_COMPOSE
        rendered = render(project)
        normalized.write_text(rendered)
        try:
            docker = await _docker(settings, normalized, project.name)
            await docker.validate(project.models)
            print("compose: the rewritten copy is valid (docker compose config)")
        except OrchestratorError as err:
            errors += 1
            print(f"ERROR: compose: {err.message}")
    if show:
        print("--- the rewritten project, as the daemon runs it ---")
        print(rendered, end="")
    print(f"{errors} error(s)" if errors else "ok")
    return 1 if errors else 0


def _size(count: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    step = 0
    while count >= 1000 and step < len(units) - 1:
        count /= 1000
        step += 1
    return f"{count:.0f} B" if step == 0 else f"{count:.1f} {units[step]}"


def _progress_printer(out: TextIO) -> Callable[[PullProgress], None]:
    """A bar redrawn in place on a terminal; elsewhere (logs, CI) a line per finished file."""
    on_terminal = out.isatty()
    files_shown = -1

    def show(progress: PullProgress) -> None:
        nonlocal files_shown
        counts = (
            f"{progress.files_done}/{progress.files_total} files,"
            f" {_size(progress.bytes_done)} of {_size(progress.bytes_total)}"
        )
        if on_terminal:
            filled = 30 * progress.bytes_done // progress.bytes_total if progress.bytes_total else 0
            bar = "#" * filled + "." * (30 - filled)
            end = "" if progress.state == "downloading" else "\n"
            print(f"\r[{bar}] {counts}\x1b[K", end=end, file=out, flush=True)
        elif progress.files_done != files_shown and progress.files_total:
            files_shown = progress.files_done
            print(counts, file=out, flush=True)

    return show


async def _model_source(settings: Settings, model_id: str) -> tuple[str | None, str | None]:
    """What a model id loads: (repo, None), (None, what it loads instead), or not a model."""
    if all(path.is_file() for path in settings.compose_files):
        spec = (await _project(settings)).models.get(model_id)
        if spec is not None:
            return spec.repo, None if spec.repo else spec.model_arg
    database = settings.state_dir / DATABASE
    if database.is_file():
        store = await Store.open(database)
        try:
            for raw in await store.model_entries():
                entry = ModelEntry.from_json(raw)
                if entry.id == model_id:
                    return entry.repo, entry.path
        finally:
            await store.close()
    return None, None


async def pull_model(settings: Settings, target: str, revision: str | None) -> int:
    """Download a model of the compose file or the registry, or any repo; 0 once servable."""
    repo = target
    # Profile names, and so model ids, never hold a "/": a target with one is a repo id.
    if "/" not in target:
        model_repo, other = await _model_source(settings, target)
        if other is not None:
            _error(f"model {target} loads {other}, not a Hub repo: nothing to pull")
            return 1
        repo = model_repo or target
    hub = settings.models_dir / "hub"
    at_revision = f" at {revision}" if revision else ""
    print(f"pulling {repo}{at_revision} into {hub}", flush=True)
    try:
        verdict = await pull(hub, repo, revision=revision, progress=_progress_printer(sys.stdout))
    except OrchestratorError as err:
        _error(err.message)
        return 1
    if verdict.status != "present":
        _error(verdict.reason)
        return 1
    print(f"present: {verdict.path} ({_size(verdict.size_bytes)})")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()

    async def serve_demo(compose_file: Path, announce: Callable[[str], None]) -> None:
        # The demo's own settings alone: the user's ORCHESTRATOR_* variables (keys, say)
        # would make the commands it prints fail.
        flags = {
            "compose_files": [str(compose_file)],
            "models_dir": str(folder / "models"),
            "state_dir": str(folder / "state"),
            "project_name": DEMO_PROJECT,
            "host": args.host,
            "port": args.port,
        }
        await serve(load_settings(flags, environ={}), on_listening=announce)

    url = f"http://{_url_host(args.host)}:{args.port}"
    return await run_demo(folder, args.base_image, url, serve_demo, rebuild=args.rebuild)


def _command_logging(args: argparse.Namespace, settings: Settings | None) -> None:
    """Logs of commands other than serve: warnings and worse unless --log-level says more;
    what they print is their output, and an error they print is never logged as well."""
    log_format = args.log_format or (settings.log_format if settings else "auto")
    configure_logging(args.log_level or "warning", log_format=log_format)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            _command_logging(args, None)
            return asyncio.run(_demo(args))
        if args.command == "models":
            _command_logging(args, None)
            return asyncio.run(models_command(args))
        if args.command == "haproxy-config":
            _command_logging(args, None)
            return asyncio.run(haproxy_config(args))
        settings = _settings(args)
        if args.command == "serve":
            console = configure_logging(settings.log_level, log_format=settings.log_format)
            eventloop.run(serve(settings, console=console))
            return 0
        _command_logging(args, settings)
        if args.command == "pull":
            return asyncio.run(pull_model(settings, args.target, args.revision))
        if args.command == "doctor":
            return asyncio.run(doctor(settings))
        return asyncio.run(check(settings, show=args.show))
    except (OrchestratorError, ComposeError) as err:
        _error(err.message if isinstance(err, OrchestratorError) else str(err))
        return 2
    except OSError as err:
        # A folder or file the daemon cannot make or open: the OS's words say which.
        _error(str(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
