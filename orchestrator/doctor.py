"""``model-orchestrator doctor``: is this machine ready to serve, and if not, what to run.

Each check looks at one thing the daemon needs and gives one finding, printed as one
line: ``ok``; a ``warning`` (the daemon runs, but something will not work: a model whose
weights are not in the cache, a pull into a folder it may not write); or a ``problem``
(the daemon cannot serve). Whatever is not ok comes with a fix to run. ``serve`` runs
the same checks at start, less the port (it binds it itself) and the compose project (it
loads it itself), and logs what is not ok.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
import docker

from .cache import SnapshotVerdict, Verdicts, download_command
from .compose import ComposeError, ComposeProject, canonical, rewrite_project
from .config import Settings
from .docker import compose_config, detect_compose_cli, run_compose, user_environment
from .errors import OrchestratorError

Mark = Literal["ok", "warning", "problem"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# Long enough for a busy engine, short enough that a socket nobody answers on is reported
# before the user gives up on the command.
ENGINE_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0
NVIDIA_SMI_TIMEOUT = 20.0
SERVICE_NAME = "model-orchestrator"

TOOLKIT_FIX = (
    "install the NVIDIA Container Toolkit, then run: sudo nvidia-ctk runtime configure"
    " --runtime=docker && sudo systemctl restart docker"
)
DRIVER_FIX = (
    "check the NVIDIA driver: nvidia-smi -L must list the GPU (reboot after a driver update)"
)
COMPOSE_FIX = (
    "install Docker Compose v2: your distribution's docker-compose-plugin package,"
    " or pip install 'model-orchestrator[compose]'"
)

_COLORS: dict[Mark, str] = {"ok": "\x1b[32m", "warning": "\x1b[33m", "problem": "\x1b[31m"}
_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Finding:
    """What one check found, as one line: its mark, what was checked and found, the fix."""

    mark: Mark
    subject: str  # what was checked: "docker engine", "weights of text-4b"
    detail: str  # what was found
    fix: str | None = None  # a command or step that makes it ok; never shown for ok

    @property
    def blocking(self) -> bool:
        """Whether it keeps the daemon from serving at all."""
        return self.mark == "problem"

    def line(self, *, color: bool = False) -> str:
        mark = f"{self.mark:<7}"
        if color:
            mark = f"{_COLORS[self.mark]}{mark}{_RESET}"
        fix = f"  fix: {self.fix}" if self.fix and self.mark != "ok" else ""
        return f"{mark} {self.subject}: {self.detail}{fix}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "$USER"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# -- the Docker engine -----------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """What the Docker engine said of itself."""

    version: str
    api_version: str
    runtimes: tuple[str, ...]
    cdi_dirs: tuple[str, ...]  # empty on engines without CDI (before Docker 25) or with it off


def docker_host(environ: Mapping[str, str]) -> str:
    return environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _ask_engine(environ: Mapping[str, str]) -> Engine:
    """Version and info from the engine DOCKER_HOST names; blocks, raises what docker-py does."""
    client = docker.DockerClient.from_env(timeout=ENGINE_TIMEOUT, environment=dict(environ))
    try:
        version = client.version()
        info = client.info()
    finally:
        client.close()
    return Engine(
        version=str(version.get("Version", "?")),
        api_version=str(version.get("ApiVersion", "?")),
        runtimes=tuple(sorted(info.get("Runtimes") or {})),
        cdi_dirs=tuple(str(d) for d in info.get("CDISpecDirs") or ()),
    )


def _causes(err: BaseException) -> Iterable[BaseException]:
    """The error and what it wraps: docker-py and requests hide the OS error in args."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [c for c in (current.__cause__, current.__context__) if c is not None]
        todo += [a for a in current.args if isinstance(a, BaseException)]


def _denied(err: BaseException) -> bool:
    return any(isinstance(cause, PermissionError) for cause in _causes(err)) or (
        "Permission denied" in str(err)
    )


def _reason(err: BaseException) -> str:
    """The OS's words for why the engine did not answer, else docker-py's."""
    for cause in _causes(err):
        # requests' errors are OSErrors too, whose arguments are no errno and strerror.
        if isinstance(cause, OSError) and isinstance(cause.strerror, str):
            return cause.strerror.lower()
    return str(err).splitlines()[0] if str(err) else type(err).__name__


async def check_engine(environ: Mapping[str, str]) -> tuple[Finding, Engine | None]:
    """Whether the engine answers at DOCKER_HOST (or the default socket), and its version."""
    where = docker_host(environ)
    try:
        engine = await asyncio.to_thread(_ask_engine, environ)
    # Whatever keeps docker-py from an answer (its own errors, requests', the OS's) is
    # the finding.
    except Exception as err:
        if _denied(err):
            return Finding(
                "problem",
                "docker engine",
                f"permission denied on {where}: this user may not use the Docker socket",
                f"sudo usermod -aG docker {_user()}, then log out and in again"
                " (or run: newgrp docker)",
            ), None
        fix = (
            f"start the engine DOCKER_HOST names, or unset DOCKER_HOST to use {DEFAULT_DOCKER_HOST}"
            if environ.get("DOCKER_HOST")
            else "start Docker: sudo systemctl start docker"
        )
        detail = f"cannot reach the engine at {where} ({_reason(err)})"
        return Finding("problem", "docker engine", detail, fix), None
    detail = f"Docker {engine.version} (API {engine.api_version}) at {where}"
    return Finding("ok", "docker engine", detail), engine


async def check_compose_cli() -> tuple[Finding, list[str] | None]:
    """Whether Compose v2 runs, as a docker plugin or on its own, and its version."""
    try:
        cli = await detect_compose_cli()
        version = (await run_compose([*cli, "version", "--short"], None, 30, "version")).strip()
    except OrchestratorError as err:
        return Finding("problem", "docker compose", err.message, COMPOSE_FIX), None
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 2:
        detail = f"{' '.join(cli)} is version {version}; the daemon needs Compose v2"
        return Finding("problem", "docker compose", detail, COMPOSE_FIX), None
    return Finding("ok", "docker compose", f"v{version.lstrip('v')} ({' '.join(cli)})"), cli


# -- GPUs ---------------------------------------------------------------------------------


def _capabilities(value: Any) -> set[str]:
    """A device's capabilities: compose takes a list, or a list of lists of them."""
    if isinstance(value, str):
        return {value.lower()}
    if isinstance(value, list | tuple):
        return {cap for item in value for cap in _capabilities(item)}
    return set()


def reserves_gpus(service: Mapping[str, Any]) -> bool:
    """Whether a compose service asks for NVIDIA GPUs (``gpus:``, or a device reservation)."""
    if service.get("gpus"):
        return True
    deploy = service.get("deploy") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    for device in reservations.get("devices") or ():
        if not isinstance(device, Mapping):
            continue
        if str(device.get("driver") or "").lower() == "nvidia":
            return True
        if "gpu" in _capabilities(device.get("capabilities")):
            return True
    return False


def gpu_services(document: Mapping[str, Any]) -> list[str]:
    """The services of a compose document that reserve NVIDIA GPUs, by name."""
    services = document.get("services") or {}
    return sorted(name for name, service in services.items() if reserves_gpus(service or {}))


def gpu_users(project: ComposeProject) -> list[str]:
    """What reserves GPUs in a project, as people know it: model ids, shared services."""
    reserving = set(gpu_services(project.document))
    users = [m for m, spec in project.models.items() if reserving & set(spec.services)]
    shared = [f"shared service {s}" for s in project.shared_services if s in reserving]
    return users + shared


def _nvidia_cdi_spec(folder: Path) -> Path | None:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.suffix not in {".yaml", ".yml", ".json"}:
            continue
        try:
            # A spec names its devices' kind: nvidia.com/gpu.
            if "nvidia.com/" in entry.read_text(errors="replace")[:65536]:
                return entry
        except OSError:
            continue
    return None


def nvidia_runtime(engine: Engine) -> str | None:
    """How the engine can hand containers NVIDIA GPUs, in words; None if it cannot."""
    if "nvidia" in engine.runtimes:
        return "the nvidia runtime is registered with Docker"
    for folder in engine.cdi_dirs:
        spec = _nvidia_cdi_spec(Path(folder))
        if spec is not None:
            return f"an NVIDIA CDI spec is in {spec}"
    return None


@dataclass(frozen=True)
class GpuList:
    """What ``nvidia-smi -L`` said; ``found`` is False when there is no nvidia-smi."""

    found: bool
    gpus: tuple[str, ...] = ()
    error: str | None = None


async def list_gpus() -> GpuList:
    if shutil.which("nvidia-smi") is None:
        return GpuList(found=False)
    try:
        process = await asyncio.create_subprocess_exec(
            "nvidia-smi",
            "-L",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), NVIDIA_SMI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return GpuList(found=True, error=f"nvidia-smi did not answer in {NVIDIA_SMI_TIMEOUT:g} s")
    except OSError as err:
        return GpuList(found=True, error=f"nvidia-smi could not run: {err.strerror}")
    lines = output.decode(errors="replace").splitlines()
    gpus = tuple(line.split(" (UUID")[0] for line in lines if line.startswith("GPU "))
    if process.returncode != 0 or not gpus:
        said = next((line.strip() for line in lines if line.strip()), "no output")
        return GpuList(found=True, gpus=gpus, error=said)
    return GpuList(found=True, gpus=gpus)


def _who_needs(needed: Sequence[str] | None) -> str:
    if needed is None:
        return "the compose project was not read, so whether a model needs GPUs is unknown"
    verb = "reserves" if len(needed) == 1 else "reserve"
    return f"{', '.join(needed)} {verb} GPUs"


# A list of the services that reserve GPUs, or None when the project could not be read.
Needed = Sequence[str] | None


def runtime_finding(engine: Engine | None, needed: Needed, engine_gpus: str) -> Finding:
    """The NVIDIA runtime (or CDI) line: a problem only when a service reserves GPUs."""
    subject = "NVIDIA runtime"
    found = None if engine is None else nvidia_runtime(engine)
    if found is None and needed == [] and engine_gpus == "none":
        return Finding("ok", subject, "not needed: no model reserves a GPU")
    if engine is None:
        return Finding(
            "warning",
            subject,
            "not checked: the Docker engine did not answer",
            "make the Docker engine answer first (see its line)",
        )
    if found is not None:
        return Finding("ok", subject, found + (f" ({_who_needs(needed)})" if needed else ""))
    missing = "Docker has neither the nvidia runtime nor an NVIDIA CDI spec"
    if needed:
        return Finding("problem", subject, f"{missing}, but {_who_needs(needed)}", TOOLKIT_FIX)
    if needed is None:
        return Finding("warning", subject, f"{missing}; {_who_needs(needed)}", TOOLKIT_FIX)
    return Finding(
        "warning",
        subject,
        f"{missing}; no compose model reserves a GPU, but models added through the API"
        f" reserve engine_gpus={engine_gpus}",
        f"{TOOLKIT_FIX} (or set engine_gpus: none)",
    )


def gpus_finding(listed: GpuList, needed: Needed) -> Finding:
    """The visible GPUs line, from nvidia-smi -L when there is one."""
    subject = "GPUs"
    if not listed.found:
        if needed:
            return Finding(
                "warning",
                subject,
                f"no nvidia-smi here to tell whether the driver sees a GPU ({_who_needs(needed)})",
                "install the NVIDIA driver, which brings nvidia-smi",
            )
        return Finding("ok", subject, "no nvidia-smi here to list them; no model needs one")
    if listed.error is None:
        return Finding("ok", subject, f"{len(listed.gpus)} visible: {'; '.join(listed.gpus)}")
    detail = f"nvidia-smi -L lists none ({listed.error})"
    return Finding("problem" if needed else "warning", subject, detail, DRIVER_FIX)


# -- the compose project and the weights ---------------------------------------------------


async def check_project(
    settings: Settings, cli: Sequence[str] | None, environ: Mapping[str, str]
) -> tuple[list[Finding], ComposeProject | None]:
    """Whether compose reads the project and the daemon can rewrite each model."""
    subject = "compose project"
    source = settings.compose_source
    missing = [str(path) for path in source.files if not path.is_file()]
    if missing:
        return [
            Finding(
                "problem",
                subject,
                f"no such file: {', '.join(missing)}",
                "give the compose file: --compose FILE (or ORCHESTRATOR_COMPOSE, or COMPOSE_FILE)",
            )
        ], None
    if cli is None:
        detail = "not read: Docker Compose v2 is missing"
        return [Finding("problem", subject, detail, COMPOSE_FIX)], None
    files = ", ".join(str(path) for path in source.files)
    try:
        text = await compose_config(cli, source, user_environment(environ))
        project = rewrite_project(source, canonical(text), settings.models_dir, settings.models)
    except (OrchestratorError, ComposeError) as err:
        message = err.message if isinstance(err, OrchestratorError) else str(err)
        flags = " ".join(f"-f {path}" for path in source.files)
        fix = f"correct the file; docker compose {flags} config shows compose's own view"
        return [Finding("problem", subject, f"{files} cannot be read: {message}", fix)], None
    if not project.models:
        return [
            Finding(
                "warning",
                subject,
                f"{files} declares no model: no service has a profile",
                "give each model's services a profile named after the model (see README)",
            )
        ], project
    shared = len(project.shared_services)
    also = f", {_plural(shared, 'shared service')}" if shared else ""
    models = f"{_plural(len(project.models), 'model')} ({', '.join(project.models)})"
    detail = f"{project.name or 'unnamed'} from {files}: {models}{also}"
    findings = [Finding("ok", subject, detail)]
    fix = "correct the service in the compose file; model-orchestrator check shows the rewrite"
    for model_id, problems in project.problems.items():
        findings += [Finding("warning", f"model {model_id}", p, fix) for p in problems]
    return findings, project


def _size(count: float) -> str:
    step = 0
    while count >= 1000 and step < 4:
        count /= 1000
        step += 1
    return f"{count:.0f} B" if step == 0 else f"{count:.1f} {'kMGT'[step - 1]}B"


def weights_fix(verdict: SnapshotVerdict, hub_dir: Path) -> str:
    """What puts the weights in place: the download command, or a look at a folder."""
    if verdict.revision == "local":
        return f"check the folder {verdict.repo}: it needs config.json and the weights"
    return download_command(verdict.repo, hub_dir, verdict.revision)


def weights_detail(verdict: SnapshotVerdict) -> str:
    """The verdict's reason, less the download hint that the fix gives on its own."""
    reason = verdict.reason
    hint_at = reason.rfind(" (run: hf download ")
    return reason[:hint_at] if hint_at >= 0 else reason


def check_weights(project: ComposeProject, models_dir: Path) -> list[Finding]:
    """Each model's weights verdict; a model without its weights is a warning, not a problem:
    the others can still be served."""
    hub = models_dir / "hub"
    verdicts = Verdicts(hub)
    findings = []
    for model_id, spec in project.models.items():
        subject = f"weights of {model_id}"
        judged = verdicts.of_model(spec)
        if not judged:
            findings.append(Finding("ok", subject, f"not checked: loads {spec.model_arg}"))
            continue
        # A second verdict is the tokenizer's, at a revision other than the weights'.
        for verdict, what in zip(judged, (subject, f"tokenizer of {model_id}"), strict=False):
            if verdict.status != "present":
                detail, fix = weights_detail(verdict), weights_fix(verdict, hub)
                findings.append(Finding("warning", what, detail, fix))
        if all(verdict.status == "present" for verdict in judged):
            first = judged[0]
            at = "" if first.revision in {"main", "local"} else f" at {first.revision}"
            detail = f"{first.repo}{at} present ({_size(first.size_bytes)})"
            findings.append(Finding("ok", subject, detail))
    return findings


# -- folders and the port -----------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    # access() asks the kernel as this user: modes, ACLs, read-only mounts, root's pass.
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_models_dir(models_dir: Path) -> Finding:
    """Whether pulls can write into <models-dir>/hub: a warning, serving reads only."""
    subject = "models dir"
    hub = models_dir / "hub"
    if not models_dir.exists():
        return Finding(
            "warning",
            subject,
            f"{models_dir} does not exist: no model's weights can be found",
            f"mkdir -p {hub}, then pull the models into it",
        )
    target = hub if hub.exists() else models_dir
    if not _writable(target):
        return Finding(
            "warning",
            subject,
            f"{target} is not writable by {_user()}: pulls would fail",
            f"sudo chown -R {_user()} {models_dir} (or give --models-dir DIR)",
        )
    return Finding("ok", subject, f"{target} is writable")


def check_state_dir(state_dir: Path) -> Finding:
    """Whether the daemon can keep its database and compose copy: a problem if not."""
    subject = "state dir"
    other = "give another one: --state-dir DIR"
    if state_dir.exists():
        if not state_dir.is_dir():
            return Finding("problem", subject, f"{state_dir} is not a folder", other)
        if not _writable(state_dir):
            return Finding(
                "problem",
                subject,
                f"{state_dir} is not writable by {_user()}",
                f"sudo chown -R {_user()} {state_dir} (or {other})",
            )
        return Finding("ok", subject, f"{state_dir} is writable")
    parent = _nearest_existing(state_dir.parent)
    if not parent.is_dir():
        return Finding(
            "problem", subject, f"{state_dir} cannot be created: {parent} is not a folder", other
        )
    if _writable(parent):
        return Finding("ok", subject, f"{state_dir} will be created")
    return Finding(
        "problem",
        subject,
        f"{state_dir} cannot be created: {parent} is not writable by {_user()}",
        f"sudo mkdir -p {state_dir} && sudo chown {_user()} {state_dir} (or {other})",
    )


def url_host(host: str) -> str:
    """A bind address as a client reaches it in a URL: the loopback for a wildcard."""
    reach = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{reach}]" if ":" in reach else reach


async def _who_listens(host: str, port: int) -> dict[str, Any] | None:
    """What answers /health/live on the port, if it answers with JSON."""
    url = f"http://{url_host(host)}:{port}/health/live"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as session,
            session.get(url) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _bind_problem(err: OSError, host: str, port: int) -> Finding:
    subject = "port"
    if err.errno == errno.EADDRNOTAVAIL:
        return Finding(
            "problem",
            subject,
            f"{host} is not an address of this machine",
            "--host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every address)",
        )
    if err.errno == errno.EACCES:
        return Finding(
            "problem",
            subject,
            f"{port} needs privileges this user lacks (ports below 1024)",
            "give a port from 1024 up: --port 8080",
        )
    return Finding("problem", subject, f"cannot bind {host}:{port}: {err.strerror}", "--port N")


async def check_port(host: str, port: int) -> Finding:
    """Whether serve can bind host:port; one taken by a running model-orchestrator is fine."""
    subject = "port"
    if port == 0:
        return Finding("ok", subject, "0: the system picks a free port at start")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        return Finding(
            "problem",
            subject,
            f"{host} is not an address or name of this machine ({err.strerror})",
            "--host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every address)",
        )
    with socket.socket(family, kind, proto) as probe:
        # As the daemon binds: a port left in TIME_WAIT by an earlier run is free to it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return _bind_problem(err, host, port)
        else:
            return Finding("ok", subject, f"{host}:{port} is free")
    answer = await _who_listens(host, port)
    if answer is not None and answer.get("service") == SERVICE_NAME:
        version = answer.get("version") or "?"
        detail = f"{host}:{port} is served by a running model-orchestrator {version}"
        return Finding("ok", subject, detail)
    return Finding(
        "problem",
        subject,
        f"{host}:{port} is in use by another program",
        f"give another port (--port N, or ORCHESTRATOR_PORT), or stop what listens there"
        f" (ss -ltnp 'sport = :{port}' names it)",
    )


# -- all of it ------------------------------------------------------------------------------


class Checkup:
    """The checks of one setup; later checks use what earlier ones found (engine, compose)."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.engine: Engine | None = None
        self.compose_cli: list[str] | None = None
        self.project: ComposeProject | None = None

    async def engine_check(self) -> list[Finding]:
        finding, self.engine = await check_engine(self.environ)
        return [finding]

    async def compose_check(self) -> list[Finding]:
        finding, self.compose_cli = await check_compose_cli()
        return [finding]

    async def project_check(self) -> list[Finding]:
        findings, self.project = await check_project(self.settings, self.compose_cli, self.environ)
        return findings

    async def gpu_check(self, project: ComposeProject | None = None) -> list[Finding]:
        """The NVIDIA runtime and the GPUs, as far as the project's services need them."""
        project = project or self.project
        needed = None if project is None else gpu_users(project)
        return [
            runtime_finding(self.engine, needed, self.settings.engine_gpus),
            gpus_finding(await list_gpus(), needed),
        ]

    async def weights_check(self) -> list[Finding]:
        if self.project is None:
            return []
        return await asyncio.to_thread(check_weights, self.project, self.settings.models_dir)

    async def folders_check(self) -> list[Finding]:
        return [check_models_dir(self.settings.models_dir)]

    async def port_check(self) -> list[Finding]:
        return [await check_port(self.settings.host, self.settings.port)]

    async def state_check(self) -> list[Finding]:
        return [check_state_dir(self.settings.state_dir)]

    def doctor_steps(self) -> list[Callable[[], Awaitable[list[Finding]]]]:
        """Every check, in the order doctor prints them."""
        return [
            self.engine_check,
            self.compose_check,
            self.project_check,
            self.gpu_check,
            self.weights_check,
            self.folders_check,
            self.port_check,
            self.state_check,
        ]

    async def before_serve(self) -> list[Finding]:
        """What serve checks before it builds the daemon: all but the port, the project
        (serve loads it) and what needs the project (``gpu_check`` once it is loaded)."""
        findings = []
        for step in (self.engine_check, self.compose_check, self.folders_check, self.state_check):
            findings += await step()
        return findings


def summary(findings: Sequence[Finding]) -> str:
    problems = sum(f.mark == "problem" for f in findings)
    warnings = sum(f.mark == "warning" for f in findings)
    if problems:
        return (
            f"{_plural(problems, 'problem')}, {_plural(warnings, 'warning')}:"
            " model-orchestrator serve will not work until the problems are fixed"
        )
    if warnings:
        return f"{_plural(warnings, 'warning')}, no problem: ready to serve"
    return "everything is ok: ready to serve"


async def doctor(settings: Settings, out: TextIO | None = None) -> int:
    """Print a line per finding as the checks go, then a summary; 1 on any problem."""
    out = out or sys.stdout
    color = out.isatty() and not os.environ.get("NO_COLOR")
    checkup = Checkup(settings)
    findings: list[Finding] = []
    for step in checkup.doctor_steps():
        for finding in await step():
            findings.append(finding)
            print(finding.line(color=color), file=out, flush=True)
    print(summary(findings), file=out)
    return 1 if any(f.blocking for f in findings) else 0
