"""Model-level effects on the real engine: start, stop, look, probe.

The switcher decides; this carries out. Tests of the switcher's policy swap this
for a fake that records calls, and the integration tests use it against Docker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp

from .compose import ModelSpec
from .docker import ContainerInfo, Docker
from .errors import DockerError, ModelExited, OrchestratorError, StartTimeout

# Long enough for a loaded engine under a 50-prober benchmark, short enough that a
# hung engine is noticed within a couple of probe intervals.
PROBE_TIMEOUT = 2.0
# The lines of a failed container's log that come with the error.
LOG_TAIL_LINES = 40
# Readiness is polled this often while a model starts: the benchmark's target is to
# notice it within 100 ms of the engine answering.
READY_POLL_INTERVAL = 0.05
# Container state is checked this often while waiting, to catch an engine that exits.
EXIT_CHECK_INTERVAL = 0.5
_ANY_ADDRESS = {"", "0.0.0.0", "::"}


class LogStream(Protocol):
    """A followed engine log: ``lines()`` yields the tail, then each new line."""

    def lines(self) -> AsyncIterator[str]: ...
    def close(self) -> None: ...


class ModelRuntime(Protocol):
    async def prepare(self, spec: ModelSpec) -> None: ...
    async def start(self, spec: ModelSpec) -> None: ...
    async def stop(self, spec: ModelSpec) -> None: ...
    async def settle(self) -> None: ...
    async def containers(self, services: frozenset[str] | None = None) -> list[ContainerInfo]: ...
    async def inspect(self, container_id: str) -> ContainerInfo | None: ...
    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None: ...
    async def probe(self, url: str) -> bool: ...
    async def logs_tail(self, container_id: str, lines: int = 40) -> str: ...
    def follow_logs(self, container_id: str, tail: int) -> LogStream: ...


class DockerRuntime:
    def __init__(self, docker: Docker, *, upstream_host: str = "127.0.0.1") -> None:
        self.docker = docker
        self.upstream_host = upstream_host
        self._session: aiohttp.ClientSession | None = None
        # Removals still finishing after their containers exited, with their services.
        self._removals: dict[asyncio.Task[None], frozenset[str]] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No pooling of probe connections: docker's port proxy accepts a connection
            # even while the engine behind it is down, so a kept-alive socket would lie.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            )
        return self._session

    async def prepare(self, spec: ModelSpec) -> None:
        await self.docker.create(spec.id, spec.services)

    async def start(self, spec: ModelSpec) -> None:
        # A service shared with a model still being removed must be gone before it is
        # started again, or compose would race itself over the same container.
        overlapping = [t for t, services in self._removals.items() if services & set(spec.services)]
        if overlapping:
            await asyncio.gather(*overlapping, return_exceptions=True)
        try:
            await self.docker.up(spec.id, spec.services)
        except DockerError as err:
            raise await self._blame(spec, err) from err

    async def _blame(self, spec: ModelSpec, err: DockerError) -> OrchestratorError:
        """When ``up`` fails because one of the model's containers did (the engine, a
        service it depends on, a sidecar waiting on it), that container's words."""
        for container in await self.docker.list_containers(spec.services):
            failed = container.status in {"exited", "dead"} and container.exit_code != 0
            if not failed and container.health != "unhealthy":
                continue
            cause = (
                "was killed for lack of memory"
                if container.oom_killed
                else f"exited with code {container.exit_code}"
                if failed
                else "turned unhealthy"
            )
            return ModelExited(
                f"{spec.id}: service {container.service} {cause} while the model started",
                model=spec.id,
                service=container.service,
                exit_code=container.exit_code,
                log_tail=await self.docker.logs_tail(container.id, LOG_TAIL_LINES),
                compose_error=err.message,
            )
        return err

    async def stop(self, spec: ModelSpec) -> None:
        """Return once every container of the model has exited: its GPU memory is free.

        Docker's own clean-up after the exit (network teardown, removal) takes about
        as long again; it carries on in the background and ``settle`` collects it.
        """
        running = [c for c in await self.docker.list_containers(spec.services) if c.running]
        # Subscribed before the stop begins, so no death can slip between the two.
        deaths = await self.docker.subscribe_deaths([c.id for c in running]) if running else None
        removal = asyncio.create_task(self.docker.remove(spec.id, spec.services, spec.stop_timeout))
        self._removals[removal] = frozenset(spec.services)
        if deaths is None:
            await removal
            return
        died = asyncio.ensure_future(deaths.until_all(c.id for c in running))
        try:
            waiting: set[asyncio.Future[Any]] = {removal, died}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if died in done and died.exception() is None:
                return
        finally:
            died.cancel()
            deaths.close()
        await removal  # compose's error, if that is what finished first
        left = [c for c in await self.docker.list_containers(spec.services) if c.running]
        if left:
            names = ", ".join(c.name for c in left)
            raise DockerError(f"{spec.id}: containers still running after stop: {names}")

    async def settle(self) -> None:
        """Wait for background removals; raise the first failure."""
        removals, self._removals = self._removals, {}
        results = await asyncio.gather(*removals, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def containers(self, services: frozenset[str] | None = None) -> list[ContainerInfo]:
        return await self.docker.list_containers(services)

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        return await self.docker.inspect(container_id)

    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None:
        if spec.upstream:
            return spec.upstream.rstrip("/")
        if engine is None:
            return None
        published = engine.ports.get(spec.container_port)
        if published is not None:
            host_ip, host_port = published
            host = self.upstream_host if host_ip in _ANY_ADDRESS else host_ip
            return f"http://{host}:{host_port}"
        # Unpublished: reachable on the container's own address from the docker host.
        if engine.addresses:
            return f"http://{engine.addresses[0]}:{spec.container_port}"
        return None

    async def probe(self, url: str) -> bool:
        try:
            async with self._http().get(url, allow_redirects=False) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            # Refused, reset, or an empty reply from docker's port proxy: not ready.
            return False

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        return await self.docker.logs_tail(container_id, lines)

    def follow_logs(self, container_id: str, tail: int) -> LogStream:
        return self.docker.follow_logs(container_id, tail)


@dataclass(frozen=True)
class Ready:
    engine: ContainerInfo
    url: str


async def wait_ready(
    runtime: ModelRuntime,
    spec: ModelSpec,
    *,
    began: float,
    clock: Callable[[], float],
    seen: Callable[[ContainerInfo], None],
) -> Ready:
    """Wait until the model's engine answers its health check; raise if it exits first or
    its startup timeout passes. ``seen`` is told of each look at the engine's container."""
    deadline = began + spec.startup_timeout
    engine: ContainerInfo | None = None
    url: str | None = None
    next_exit_check = 0.0
    while True:
        now = clock()
        if now >= next_exit_check or engine is None:
            next_exit_check = now + EXIT_CHECK_INTERVAL
            engine = await _look(runtime, spec, engine)
            if engine is not None:
                seen(engine)
                _raise_if_gone(spec, engine, await _tail_if_gone(runtime, engine))
                url = url or runtime.upstream_url(spec, engine)
        if engine is not None and url is not None and await runtime.probe(url + spec.health_path):
            return Ready(engine, url)
        if clock() >= deadline:
            tail = await runtime.logs_tail(engine.id, LOG_TAIL_LINES) if engine else ""
            raise StartTimeout(
                f"{spec.id}: not healthy at {spec.health_path} within {spec.startup_timeout:g} s",
                model=spec.id,
                log_tail=tail,
            )
        await asyncio.sleep(READY_POLL_INTERVAL)


async def _look(
    runtime: ModelRuntime, spec: ModelSpec, engine: ContainerInfo | None
) -> ContainerInfo | None:
    # Once the engine is known, one inspect is far cheaper than a listing, and keeps the
    # thread pool (and the GIL) quiet while probes are served.
    if engine is None:
        found = await runtime.containers(frozenset({spec.engine_service}))
        return next((c for c in found if c.service == spec.engine_service), None)
    return await runtime.inspect(engine.id) or replace(engine, status="removed", exit_code=None)


def _gone(engine: ContainerInfo) -> bool:
    # "restarting": exited, and docker is starting it again; the daemon owns restarts
    # (the copy says restart: "no"), so that is a failed start.
    return not engine.running or engine.status == "restarting"


async def _tail_if_gone(runtime: ModelRuntime, engine: ContainerInfo) -> str:
    return await runtime.logs_tail(engine.id, LOG_TAIL_LINES) if _gone(engine) else ""


def _raise_if_gone(spec: ModelSpec, engine: ContainerInfo, tail: str) -> None:
    if not _gone(engine):
        return
    cause = (
        "was killed for lack of memory"
        if engine.oom_killed
        else "exited and is being restarted"
        if engine.status == "restarting"
        else f"exited with code {engine.exit_code}"
    )
    raise ModelExited(
        f"{spec.id}: the engine container {cause} before it became healthy",
        model=spec.id,
        exit_code=engine.exit_code,
        log_tail=tail,
    )
