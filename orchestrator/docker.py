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
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import structlog

from .errors import DockerError

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


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
    # Docker gives nanoseconds; fromisoformat takes at most microseconds.
    head, _, rest = value.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
    zone = rest[len(rest.rstrip("Z+-0123456789:")) :] if rest else ""
    zone = "+00:00" if zone.endswith("Z") or not zone else zone[-6:]
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
    ) -> None:
        self.compose_file = compose_file
        self.project_dir = project_dir
        self.project_name = project_name
        self.compose_cli = list(compose_cli or ["docker", "compose"])
        self._client = client

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
        log.debug("compose", argv=argv[len(self.compose_cli) :])
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as err:
            raise DockerError(
                f"the compose CLI {' '.join(self.compose_cli)!r} is not installed"
            ) from err
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), time_limit)
        except TimeoutError as err:
            process.kill()
            await process.wait()
            raise DockerError(f"docker compose {args[0] if args else ''} timed out") from err
        if process.returncode != 0:
            words = stderr.decode(errors="replace").strip().splitlines()[-8:]
            raise DockerError(
                f"docker compose {' '.join(args)} failed (exit {process.returncode}): "
                + " | ".join(words)
            )
        return stdout.decode(errors="replace")

    # -- lifecycle (compose CLI) ----------------------------------------------

    async def validate(self, profiles: Iterable[str], compose_file: Path | None = None) -> None:
        """Let compose check the file (ours, or a candidate) with every model's profile on."""
        args: list[str] = []
        for profile in profiles:
            args += ["--profile", profile]
        await self.compose(*args, "config", "--quiet", time_limit=60, compose_file=compose_file)

    async def up(self, profile: str, services: Sequence[str]) -> None:
        await self.compose("--profile", profile, "up", "--detach", *services, time_limit=600)

    async def create(self, profile: str, services: Sequence[str]) -> None:
        """Create (not start) the services' containers; an existing one is left as it is."""
        await self.compose(
            "--profile", profile, "create", "--no-recreate", *services, time_limit=600
        )

    async def remove(self, profile: str, services: Sequence[str], grace: float | None) -> None:
        """Stop and remove the services' containers, so none lingers holding GPU memory.

        One ``rm --stop`` rather than ``stop`` then ``rm``: each compose call costs a
        process start and a project load, and this is on every switch's path. Compose
        stops each container with its service's stop_grace_period.
        """
        await self.compose(
            "--profile",
            profile,
            "rm",
            "--stop",
            "--force",
            *services,
            time_limit=(grace or 10) + 120,
        )

    # -- inspection (SDK) ---------------------------------------------------------

    async def list_containers(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        client = await self.client()
        wanted = None if services is None else set(services)
        containers = await self._blocking(
            client.containers.list,
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project_name}"]},
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

    async def follow_logs(self, container_id: str, tail: int) -> AsyncIterator[str]:
        """The container's last ``tail`` lines, then each new line as it is written."""
        client = await self.client()
        try:
            stream = await self._blocking(
                client.api.logs, container_id, stream=True, follow=True, tail=tail
            )
        except docker.errors.NotFound:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        def pump() -> None:
            try:
                for chunk in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as err:  # the stream ends with whatever the socket raised
                log.debug("log stream ended", error=str(err))
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name="docker-logs", daemon=True).start()
        pending = b""
        try:
            while (chunk := await queue.get()) is not None:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            stream.close()

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

    async def subscribe_deaths(self, container_ids: Sequence[str]) -> EventSubscription:
        """Docker reports "die" as soon as a process has exited, about 0.1 s before it
        has torn the container's network down and calls it stopped."""
        return await self.subscribe(
            {"type": "container", "event": ["die"], "container": list(container_ids)}
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
