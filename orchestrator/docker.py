"""The one place that talks to Docker: the compose CLI for lifecycle, the SDK for inspection.

Compose runs as a subprocess with an argument list (never a shell string), always
against the daemon's normalized copy of the compose file, with the user's folder
as project directory so relative paths mean what the user wrote. SDK calls block,
so they go through ``_blocking``, which uses ``asyncio.to_thread`` and so keeps the
switch id and model bound in the log context.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import structlog
import yaml

from . import gate
from .compose import ComposeSource
from .errors import DockerError, TooManyStreams

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONFIG_HASH_LABEL = "com.docker.compose.config-hash"
IMAGE_LABEL = "com.docker.compose.image"
ONEOFF_LABEL = "com.docker.compose.oneoff"
# How far back wait_for_line looks in a log it starts to follow: the line may be out.
LINE_LOOK_BACK = 20


@dataclass(frozen=True)
class Dependency:
    """One entry of a service's depends_on in the compose file."""

    service: str
    condition: str = "service_started"  # or service_healthy, service_completed_successfully
    required: bool = True


def dependencies(declared: object) -> tuple[Dependency, ...]:
    """A service's depends_on, short (a list) or long (a mapping) form."""
    if isinstance(declared, list):
        return tuple(Dependency(str(name)) for name in declared)
    if not isinstance(declared, dict):
        return ()
    found = []
    for name, how in declared.items():
        how = how if isinstance(how, dict) else {}
        condition = str(how.get("condition") or "service_started")
        found.append(Dependency(str(name), condition, how.get("required", True) is not False))
    return tuple(found)


@dataclass(frozen=True)
class Blueprint:
    """What compose would create for a service now: its config hash, its image, and what
    it depends on. (Containers made with --no-deps carry no depends_on label.)"""

    config_hash: str
    image: str
    depends_on: tuple[Dependency, ...] = ()


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    service: str
    status: str  # docker's word: created, running, restarting, exited, dead, ...
    exit_code: int | None
    started_at: datetime | None
    ports: Mapping[int, tuple[str, int]]  # container port -> (host ip, host port)
    addresses: tuple[str, ...]  # the container's IPs on its networks
    oom_killed: bool = False
    health: str | None = None  # docker's healthcheck verdict: starting, healthy, unhealthy
    # What compose created it from: the service's config hash and the image's id.
    config_hash: str | None = None
    image_id: str | None = None
    # On the host's network (network_mode: host): it answers on the host's own ports.
    host_network: bool = False

    @property
    def running(self) -> bool:
        return self.status in {"running", "restarting"}


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    service: str
    action: str  # start, die, stop, kill, oom, destroy, health_status: healthy, ...
    exit_code: int | None


def _parse_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds, less trailing zeros: none at all, point included, on a
    # whole second. fromisoformat takes at most microseconds.
    head, rest = value[:19], value[19:].removeprefix(".")
    digits = len(rest) - len(rest.lstrip("0123456789"))
    fraction, zone = rest[:digits][:6], rest[digits:]
    zone = "+00:00" if zone in {"", "Z"} else zone
    text = f"{head}.{fraction or '0'}{zone}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def container_info(attrs: Mapping[str, Any]) -> ContainerInfo:
    """Map docker's inspect document onto what the daemon needs to know."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    network = attrs.get("NetworkSettings") or {}
    ports: dict[int, tuple[str, int]] = {}
    for key, bindings in (network.get("Ports") or {}).items():
        port, _, proto = key.partition("/")
        if proto != "tcp" or not bindings:
            continue
        # Prefer the IPv4 binding: docker lists one per address family.
        chosen = next((b for b in bindings if ":" not in b.get("HostIp", "")), bindings[0])
        ports[int(port)] = (chosen.get("HostIp", ""), int(chosen["HostPort"]))
    addresses = tuple(
        net["IPAddress"] for net in (network.get("Networks") or {}).values() if net.get("IPAddress")
    )
    running = state.get("Status") in {"running", "restarting"}
    return ContainerInfo(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        service=str(labels.get(SERVICE_LABEL, "")),
        status=str(state.get("Status", "unknown")),
        exit_code=None if running else state.get("ExitCode"),
        started_at=_parse_time(state.get("StartedAt")),
        ports=ports,
        addresses=addresses,
        oom_killed=bool(state.get("OOMKilled")),
        health=(state.get("Health") or {}).get("Status"),
        config_hash=labels.get(CONFIG_HASH_LABEL),
        image_id=labels.get(IMAGE_LABEL) or attrs.get("Image"),
        host_network=_on_host_network(attrs),
    )


_EXIT_CODE = re.compile(r"^Exited \((-?\d+)\)")
_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


def container_summary(attrs: Mapping[str, Any]) -> ContainerInfo:
    """The same view from docker's container list, which answers for every container in
    one call: no start time and no OOM flag, and the exit code read from its status line."""
    labels = attrs.get("Labels") or {}
    state = str(attrs.get("State", "unknown"))
    running = state in {"running", "restarting"}
    status_line = str(attrs.get("Status") or "")
    exited = _EXIT_CODE.match(status_line)
    health = _HEALTH.search(status_line)
    ports: dict[int, tuple[str, int]] = {}
    for port in sorted(attrs.get("Ports") or [], key=lambda p: ":" in str(p.get("IP", ""))):
        if port.get("Type") == "tcp" and port.get("PublicPort"):
            ports.setdefault(
                int(port["PrivatePort"]), (str(port.get("IP", "")), port["PublicPort"])
            )
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    names = attrs.get("Names") or [""]
    return ContainerInfo(
        id=str(attrs.get("Id", "")),
        name=str(names[0]).lstrip("/"),
        service=str(labels.get(SERVICE_LABEL, "")),
        status=state,
        exit_code=None if running or exited is None else int(exited.group(1)),
        started_at=None,
        ports=ports,
        addresses=tuple(n["IPAddress"] for n in networks.values() if n.get("IPAddress")),
        health=None if health is None else health.group(1).removeprefix("health: "),
        config_hash=labels.get(CONFIG_HASH_LABEL),
        image_id=labels.get(IMAGE_LABEL) or attrs.get("ImageID"),
        host_network=_on_host_network(attrs),
    )


def _on_host_network(attrs: Mapping[str, Any]) -> bool:
    # Both inspect and the container list carry the mode in HostConfig.
    return (attrs.get("HostConfig") or {}).get("NetworkMode") == "host"


# Compose interpolates "${...}" in the files it reads with its environment and may hand
# values to containers. The user's files may read the user's variables, never the
# daemon's own settings and keys; the daemon's copy, fully resolved and literal, is run
# without the Hub token either. Variables that steer compose itself are the daemon's to
# set on each call.
_DAEMON_PREFIX = "ORCHESTRATOR_"
_HUB_TOKENS = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
_COMPOSE_STEERING = frozenset(
    {"COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_ENV_FILES"}
)


def user_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What compose reads the user's files with: their variables, none of the daemon's."""
    return {name: value for name, value in environ.items() if not name.startswith(_DAEMON_PREFIX)}


def runtime_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What compose runs the daemon's copy with: no secrets, nothing that steers it."""
    return {
        name: value
        for name, value in user_environment(environ).items()
        if name not in _HUB_TOKENS and name not in _COMPOSE_STEERING
    }


async def run_compose(
    argv: Sequence[str],
    environment: Mapping[str, str] | None,
    time_limit: float | None,
    what: str,
) -> str:
    """One compose process, with an argument list; its stdout, or DockerError with its words.

    ``what`` names the call in errors: ``config``, ``up --detach engine``.
    """
    log.debug("compose", argv=list(argv))
    try:
        # Not asyncio's subprocesses: on uvloop they fork the whole daemon on the event
        # loop, 4-6 ms of copied page tables during which no probe is answered (measured
        # with 80 MB resident). Popen's vfork holds the loop only until the exec.
        process = subprocess.Popen(  # noqa: ASYNC220 (the reason above)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if environment is None else dict(environment),
        )
    except FileNotFoundError as err:
        raise DockerError(f"the compose CLI {argv[0]!r} is not installed") from err
    talk = asyncio.ensure_future(asyncio.to_thread(process.communicate))
    try:
        async with asyncio.timeout(time_limit):
            stdout, stderr = await asyncio.shield(talk)
    except TimeoutError as err:
        process.kill()
        await talk
        raise DockerError(f"docker compose {what} timed out") from err
    except asyncio.CancelledError:
        # A start called off, or the daemon stopping: compose must not go on without us.
        process.kill()
        await asyncio.shield(talk)
        raise
    if process.returncode != 0:
        words = [
            line for line in stderr.decode(errors="replace").strip().splitlines()
            if "level=warning" not in line
        ][-8:]  # fmt: skip
        raise DockerError(
            f"docker compose {what} failed (exit {process.returncode}): " + " | ".join(words)
        )
    return stdout.decode(errors="replace")


async def compose_config(
    compose_cli: Sequence[str], source: ComposeSource, environment: Mapping[str, str]
) -> str:
    """The project as ``docker compose config`` prints it: every file, every profile."""
    argv = [*compose_cli, "--project-directory", str(source.project_dir)]
    if source.project_name:
        argv += ["--project-name", source.project_name]
    for path in source.files:
        argv += ["--file", str(path)]
    for path in source.env_files:
        argv += ["--env-file", str(path)]
    return await run_compose(
        [*argv, "--profile", "*", "config"], environment, time_limit=60, what="config"
    )


async def detect_compose_cli() -> list[str]:
    """Compose v2 as a docker CLI plugin if it answers, else the standalone binary."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        process = await asyncio.create_subprocess_exec(
            *candidate,
            "version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await process.wait() == 0:
            return candidate
    raise DockerError(
        "Docker Compose v2 is not installed: neither 'docker compose' nor 'docker-compose' works"
    )


# The ENTRYPOINT and CMD of each image reference; None for an image not on this machine.
ImageReader = Callable[[Iterable[str]], Awaitable[dict[str, gate.ImageDefaults | None]]]


def image_reader() -> ImageReader:
    """How the daemon reads images' own ENTRYPOINT and CMD (for the start gate) from the
    local engine; an engine it cannot reach gives nothing, and the engines go ungated."""
    client: Any = None

    async def read(references: Iterable[str]) -> dict[str, gate.ImageDefaults | None]:
        nonlocal client
        wanted = sorted(set(references))
        try:
            client = client or await asyncio.to_thread(docker.from_env)
            found = await asyncio.gather(
                *(asyncio.to_thread(_image_defaults, client, r) for r in wanted)
            )
        except docker.errors.DockerException as err:
            log.warning("could not read the images' entrypoints", error=str(err))
            return {}
        return dict(zip(wanted, found, strict=True))

    return read


def _inspect_image(client: Any, reference: str) -> Mapping[str, Any] | None:
    """docker's document for the image; None for an image not on this machine."""
    try:
        return dict(client.api.inspect_image(reference))
    except docker.errors.NotFound:
        return None


def _image_defaults(client: Any, reference: str) -> gate.ImageDefaults | None:
    attrs = _inspect_image(client, reference)
    if attrs is None:
        return None
    config = attrs.get("Config") or {}
    entrypoint, command = config.get("Entrypoint"), config.get("Cmd")
    return gate.ImageDefaults(
        tuple(entrypoint) if entrypoint is not None else None,
        tuple(command) if command is not None else None,
    )


class Docker:
    """Every Docker and compose call the daemon makes goes through here."""

    def __init__(
        self,
        *,
        compose_file: Path,
        project_dir: Path,
        project_name: str,
        compose_cli: Sequence[str] | None = None,
        client: Any = None,
        max_log_followers: int = 64,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.compose_file = compose_file
        self.project_dir = project_dir
        self.project_name = project_name
        self.compose_cli = list(compose_cli or ["docker", "compose"])
        self._client = client
        self.max_log_followers = max_log_followers
        # What compose runs with: the daemon's environment less its secrets.
        self.environment = dict(environment) if environment is not None else None
        self._shared_logs: dict[str, SharedLog] = {}
        # compose's blueprints of the copy, with the file's identity they were read from.
        self._blueprints: tuple[tuple[int, int, int], dict[str, Blueprint]] | None = None

    # -- plumbing -------------------------------------------------------------

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.NotFound:
            raise
        except docker.errors.DockerException as err:
            raise DockerError(f"docker engine error: {err}") from err

    async def client(self) -> Any:
        if self._client is None:
            self._client = await self._blocking(docker.from_env)
        return self._client

    async def compose(
        self, *args: str, time_limit: float | None = None, compose_file: Path | None = None
    ) -> str:
        argv = [
            *self.compose_cli,
            "--project-name",
            self.project_name,
            "--project-directory",
            str(self.project_dir),
            "--file",
            str(compose_file or self.compose_file),
            *args,
        ]
        what = list(args)
        while what[:1] == ["--profile"]:
            what = what[2:]
        return await run_compose(argv, self.environment, time_limit, " ".join(what))

    # -- lifecycle (compose CLI) ----------------------------------------------

    async def validate(self, profiles: Iterable[str], compose_file: Path | None = None) -> None:
        """Let compose check the file (ours, or a candidate) with every model's profile on."""
        args: list[str] = []
        for profile in profiles:
            args += ["--profile", profile]
        await self.compose(*args, "config", "--quiet", time_limit=60, compose_file=compose_file)

    async def up(self, profile: str, services: Sequence[str]) -> None:
        await self.compose("--profile", profile, "up", "--detach", *services, time_limit=600)

    async def create(self, profiles: Iterable[str], services: Sequence[str]) -> None:
        """Create (not start) the services' containers afresh, as ``up`` would make them.

        ``--no-deps``: a dependency may be running for another model and is not ours to
        recreate here; ``--force-recreate``: the caller asks only for services whose
        container is missing, out of date, or has run before and would bring back its log.
        """
        args: list[str] = []
        for profile in profiles:
            args += ["--profile", profile]
        await self.compose(
            *args, "up", "--no-start", "--no-deps", "--force-recreate", *services, time_limit=600
        )

    async def blueprints(self) -> dict[str, Blueprint]:
        """Each service's config hash (``docker compose config --hash``) and image, read
        again only when the daemon's copy of the compose file has changed."""
        stat = await asyncio.to_thread(self.compose_file.stat)
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._blueprints is not None and self._blueprints[0] == identity:
            return self._blueprints[1]
        printed = await self.compose("--profile", "*", "config", "--hash", "*", time_limit=60)
        text = await asyncio.to_thread(self.compose_file.read_text)
        services = (yaml.safe_load(text) or {}).get("services") or {}
        found = {}
        for line in printed.splitlines():
            service, _, config_hash = line.strip().partition(" ")
            if not config_hash:
                continue
            definition = services.get(service) or {}
            # A service built and not named gets compose's name for its image.
            image = definition.get("image") or f"{self.project_name}-{service}"
            needs = dependencies(definition.get("depends_on"))
            found[service] = Blueprint(config_hash.strip(), str(image), needs)
        self._blueprints = (identity, found)
        return found

    def known_blueprints(self) -> dict[str, Blueprint] | None:
        """The blueprints last read, if the file has not changed since; no compose call."""
        if self._blueprints is None:
            return None
        try:
            stat = self.compose_file.stat()
        except OSError:
            return None
        identity, found = self._blueprints
        return found if identity == (stat.st_ino, stat.st_mtime_ns, stat.st_size) else None

    # -- lifecycle (SDK): the switch's critical path, without a compose process ------

    async def start_container(self, container_id: str) -> None:
        client = await self.client()
        try:
            await self._blocking(client.api.start, container_id)
        except docker.errors.NotFound as err:
            raise DockerError(f"container {container_id[:12]} is gone") from err

    async def stop_container(self, container_id: str, grace: float | None) -> None:
        """The container's stop signal, then SIGKILL after ``grace`` seconds; None: the
        grace compose gave the container (its stop_grace_period, else docker's 10 s)."""
        client = await self.client()
        timeout = None if grace is None else math.ceil(grace)
        with contextlib.suppress(docker.errors.NotFound):
            await self._blocking(client.api.stop, container_id, timeout=timeout)

    async def remove_container(self, container_id: str) -> None:
        client = await self.client()
        try:
            await self._blocking(client.api.remove_container, container_id, force=True)
        except docker.errors.NotFound:
            return
        except DockerError as err:
            if "already in progress" not in err.message:
                raise

    async def hold(self, container_id: str) -> None:
        """Put the start gate's hold file into a created container (see gate.py): started,
        its engine waits for ``signal_gate``."""
        client = await self.client()
        try:
            await self._blocking(client.api.put_archive, container_id, "/", gate.archive())
        except docker.errors.NotFound as err:
            raise DockerError(f"container {container_id[:12]} is gone") from err

    async def signal_gate(self, container_id: str) -> None:
        """The signal that lets a held engine through the start gate."""
        client = await self.client()
        try:
            await self._blocking(client.api.kill, container_id, signal=gate.OPEN_SIGNAL)
        except docker.errors.NotFound as err:
            raise DockerError(f"container {container_id[:12]} is gone") from err

    async def wait_for_line(self, container_id: str, text: str) -> None:
        """Until a line of the container's log (its last lines included) holds ``text``;
        DockerError if the log ends first."""
        follower = self.follow_logs(container_id, tail=LINE_LOOK_BACK)
        try:
            async for line in follower.lines():
                if text in line:
                    return
            raise DockerError(f"container {container_id[:12]} exited before it said {text!r}")
        finally:
            follower.close()

    async def held(self, container_id: str) -> bool:
        """Whether the container's engine waits behind the start gate: the gate's folder is
        there until the script hands over to the engine."""
        client = await self.client()
        try:
            await self._blocking(
                client.api.get_archive, container_id, f"{gate.GATE_DIR}/{gate.HOLD_FILE}"
            )
        except docker.errors.NotFound:
            return False
        return True

    async def fixed_host_ports(self, container_id: str) -> list[tuple[str, int]]:
        """The host addresses and ports the container asks docker to publish on (ports
        docker picks itself are left out): two such containers cannot run at once."""
        client = await self.client()
        attrs = await self._blocking(client.api.inspect_container, container_id)
        bindings = ((attrs.get("HostConfig") or {}).get("PortBindings") or {}).values()
        return [
            (str(b.get("HostIp") or ""), int(b["HostPort"]))
            for found in bindings
            for b in found or []
            if str(b.get("HostPort") or "").isdigit()
        ]

    async def image_ids(self, references: Iterable[str]) -> dict[str, str | None]:
        """The id each image reference names now; None for an image not on this machine."""
        client = await self.client()

        async def one(reference: str) -> str | None:
            attrs = await self._blocking(_inspect_image, client, reference)
            return None if attrs is None else str(attrs.get("Id") or "") or None

        wanted = sorted(set(references))
        return dict(zip(wanted, await asyncio.gather(*(one(r) for r in wanted)), strict=True))

    # -- inspection (SDK) ---------------------------------------------------------

    async def summaries(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        """The project's containers from one list call (see ``container_summary``), less
        the one-off containers of ``docker compose run``."""
        client = await self.client()
        wanted = None if services is None else set(services)
        listed = await self._blocking(
            client.api.containers,
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project_name}"]},
        )
        infos = [
            container_summary(c)
            for c in listed
            if (c.get("Labels") or {}).get(ONEOFF_LABEL, "False") != "True"
        ]
        return [c for c in infos if wanted is None or c.service in wanted]

    async def list_containers(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        client = await self.client()
        wanted = None if services is None else set(services)
        containers = await self._blocking(
            client.containers.list,
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project_name}"]},
            # The list is followed by an inspect of each: one removed in between is gone.
            ignore_removed=True,
        )
        infos = [container_info(c.attrs) for c in containers]
        return [c for c in infos if wanted is None or c.service in wanted]

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        client = await self.client()
        try:
            attrs = await self._blocking(client.api.inspect_container, container_id)
        except docker.errors.NotFound:
            return None
        return container_info(attrs)

    async def logs_tail(self, container_id: str, lines: int = 50) -> str:
        client = await self.client()
        try:
            raw = await self._blocking(client.api.logs, container_id, tail=lines)
        except docker.errors.NotFound:
            return ""
        return bytes(raw).decode(errors="replace")

    def follow_logs(self, container_id: str, tail: int) -> LogFollower:
        """The container's last ``tail`` lines, then each new line as it is written.

        Every follower of one container shares one docker log stream; past
        ``max_log_followers`` of them a new one is refused with TooManyStreams.
        """
        shared = self._shared_logs.get(container_id)
        if shared is None or shared.ended:
            shared = SharedLog(self, container_id, asyncio.get_running_loop())
            self._shared_logs[container_id] = shared
        if len(shared.followers) >= self.max_log_followers:
            raise TooManyStreams(
                f"{self.max_log_followers} clients already follow this model's log;"
                " close one or read the last lines with ?follow=false",
                retry_after=5,
            )
        return LogFollower(shared, tail)

    def _forget_log(self, shared: SharedLog) -> None:
        if self._shared_logs.get(shared.container_id) is shared:
            del self._shared_logs[shared.container_id]

    async def subscribe(self, filters: Mapping[str, Any]) -> EventSubscription:
        """Container events matching ``filters`` from now on; close it when done."""
        client = await self.client()
        stream = await self._blocking(client.events, decode=True, filters=dict(filters))
        return EventSubscription(stream, asyncio.get_running_loop())

    async def events(self) -> AsyncIterator[ContainerEvent]:
        """Container events of this compose project, as they happen."""
        subscription = await self.subscribe(
            {"type": "container", "label": [f"{PROJECT_LABEL}={self.project_name}"]}
        )
        try:
            while True:
                yield await subscription.next()
        finally:
            subscription.close()

    async def subscribe_deaths(self) -> EventSubscription:
        """The project's "die" events. Docker reports one as soon as a process has exited,
        about 0.1 s before it has torn the container's network down and calls it stopped."""
        return await self.subscribe(
            {
                "type": "container",
                "event": ["die"],
                "label": [f"{PROJECT_LABEL}={self.project_name}"],
            }
        )


class EventSubscription:
    """A docker event stream, pumped by a thread of its own into an asyncio queue.

    The SDK's stream blocks; on the default executor it would hold one of its few
    threads for as long as it runs.
    """

    def __init__(self, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._queue: asyncio.Queue[ContainerEvent | BaseException] = asyncio.Queue()
        threading.Thread(target=self._pump, name="docker-events", daemon=True).start()

    def _hand_over(self, item: ContainerEvent | BaseException) -> None:
        # The loop may be gone by the time a stream we closed finally ends.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _pump(self) -> None:
        try:
            for raw in self._stream:
                actor = raw.get("Actor") or {}
                attributes = actor.get("Attributes") or {}
                code = attributes.get("exitCode")
                self._hand_over(
                    ContainerEvent(
                        container_id=str(actor.get("ID") or raw.get("id") or ""),
                        service=str(attributes.get(SERVICE_LABEL, "")),
                        action=str(raw.get("Action") or raw.get("status") or ""),
                        exit_code=int(code) if code is not None and code.isdigit() else None,
                    )
                )
        except Exception as err:  # the stream ends with whatever the socket raised
            self._hand_over(err)
        else:
            self._hand_over(EOFError("docker event stream ended"))

    async def next(self) -> ContainerEvent:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise DockerError(f"docker event stream broke: {item}")
        return item

    async def until_all(self, container_ids: Iterable[str]) -> None:
        """Wait until an event has come for each of the containers."""
        remaining = set(container_ids)
        while remaining:
            remaining.discard((await self.next()).container_id)

    def close(self) -> None:
        self._stream.close()


# A follower may ask for this many earlier lines; the shared stream keeps as many.
LOG_RING = 10_000
# Lines a slow follower may fall behind by before it loses the oldest.
FOLLOWER_QUEUE = 2_000


def _split_timestamp(line: bytes) -> tuple[tuple[int, int], str]:
    """docker's ``timestamps=True`` prefix as (seconds, nanoseconds), and the line."""
    stamp, _, text = line.partition(b" ")
    when = _parse_time(stamp.decode(errors="replace"))
    seconds = int(when.timestamp()) if when is not None else 0
    fraction = stamp.partition(b".")[2].rstrip(b"Z").split(b"+")[0].split(b"-")[0]
    nanos = int((fraction.decode() + "000000000")[:9]) if fraction.isdigit() else 0
    return (seconds, nanos), text.decode(errors="replace")


class SharedLog:
    """One container's log, read from docker once and handed to each of its followers.

    A thread of its own reads the last ``LOG_RING`` lines, then follows from there; the
    lines reach the event loop in batches and go into a ring (for followers who join
    later and ask for a tail) and into each follower's queue.
    """

    def __init__(self, docker: Docker, container_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.docker = docker
        self.container_id = container_id
        self.loop = loop
        self.ring: deque[str] = deque(maxlen=LOG_RING)
        self.followers: set[LogFollower] = set()
        self.loaded = asyncio.Event()  # the backlog is in the ring
        self.ended = False
        self._stream: Any = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, client: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._pump, args=(client,), name="docker-logs", daemon=True
            )
            self._thread.start()

    def _hand_over(self, lines: list[str] | None, *, backlog: bool = False) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
            self.loop.call_soon_threadsafe(self._deliver, lines, backlog)

    def _deliver(self, lines: list[str] | None, backlog: bool) -> None:
        if lines is None:
            self.ended = True
            self.loaded.set()
            for follower in list(self.followers):
                follower.push(None)
            self.docker._forget_log(self)
            return
        self.ring.extend(lines)
        if backlog:
            self.loaded.set()
            return
        for follower in list(self.followers):
            for line in lines:
                follower.push(line)

    def _pump(self, client: Any) -> None:
        try:
            raw = client.api.logs(self.container_id, tail=LOG_RING, timestamps=True)
            last = (0, 0)
            backlog: list[str] = []
            for line in bytes(raw).splitlines():
                last, text = _split_timestamp(line)
                backlog.append(text)
            self._hand_over(backlog, backlog=True)
            if self._closed.is_set():
                return
            self._stream = client.api.logs(
                self.container_id,
                stream=True,
                follow=True,
                timestamps=True,
                since=last[0] or None,
            )
            pending = b""
            for chunk in self._stream:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                fresh = []
                for line in complete:
                    when, text = _split_timestamp(line)
                    if when > last:  # `since` has whole seconds: skip the backlog's lines
                        fresh.append(text)
                if fresh:
                    self._hand_over(fresh)
            if pending:
                self._hand_over([_split_timestamp(pending)[1]])
        except Exception as err:  # the stream ends with whatever the socket raised
            log.debug("log stream ended", container=self.container_id[:12], error=str(err))
        finally:
            self._hand_over(None)

    def leave(self, follower: LogFollower) -> None:
        self.followers.discard(follower)
        if not self.followers and not self.ended:
            # Nobody listens: stop reading. A later follower starts a new stream.
            self._closed.set()
            self.ended = True
            self.docker._forget_log(self)
            if self._stream is not None:
                with contextlib.suppress(Exception):
                    self._stream.close()


class LogFollower:
    """One client following a shared log: its tail first, then every new line."""

    def __init__(self, shared: SharedLog, tail: int) -> None:
        self.shared = shared
        self.tail = tail
        self._queue: deque[str | None] = deque(maxlen=FOLLOWER_QUEUE)
        self._ready = asyncio.Event()
        shared.followers.add(self)

    def push(self, line: str | None) -> None:
        self._queue.append(line)
        self._ready.set()

    def close(self) -> None:
        self.shared.leave(self)

    async def lines(self) -> AsyncIterator[str]:
        shared = self.shared
        try:
            shared.start(await shared.docker.client())
            await shared.loaded.wait()
            # The ring already holds every line queued so far: taking the tail and
            # emptying the queue in one step of the loop loses and doubles nothing.
            backlog = list(shared.ring)[-self.tail :] if self.tail else []
            self._queue.clear()
            for line in backlog:
                yield line
            while not shared.ended or self._queue:
                while self._queue:
                    queued = self._queue.popleft()
                    if queued is None:
                        return
                    yield queued
                self._ready.clear()
                await self._ready.wait()
        finally:
            self.close()
