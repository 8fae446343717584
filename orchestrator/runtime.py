"""Model-level effects on the real engine: start, stop, look, probe.

The switcher decides; this carries out. Tests of the switcher's policy swap this
for a fake that records calls, and the integration tests use it against Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import structlog

from . import gate, sleepmode
from .compose import ModelSpec
from .docker import Blueprint, ContainerInfo, Dependency, Docker, EventSubscription
from .errors import DockerError, ModelExited, OrchestratorError, StartTimeout
from .tasks import cancel_all

log = structlog.get_logger(__name__)

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
# How long a staged container has to say that its engine waits at the start gate.
GATE_TIMEOUT = 10.0
_ANY_ADDRESS = {"", "0.0.0.0", "::"}


class LogStream(Protocol):
    """A followed engine log: ``lines()`` yields the tail, then each new line."""

    def lines(self) -> AsyncIterator[str]: ...
    def close(self) -> None: ...


class ModelRuntime(Protocol):
    async def prepare(self, spec: ModelSpec) -> None: ...
    def prepare_ahead(self, specs: Sequence[ModelSpec]) -> None: ...
    def discard(self, spec: ModelSpec) -> None: ...
    async def stage(self, spec: ModelSpec, *, behind: bool = False) -> bool: ...
    async def unstage(self, spec: ModelSpec) -> None: ...
    async def in_the_way(self, spec: ModelSpec) -> list[str]: ...
    async def held(self, container: ContainerInfo) -> bool: ...
    async def start(self, spec: ModelSpec) -> None: ...
    async def stop(self, spec: ModelSpec) -> None: ...
    async def settle(self) -> None: ...
    def exit_time(self, model_id: str) -> float | None: ...
    async def running(self, services: frozenset[str]) -> list[ContainerInfo]: ...
    async def containers(self, services: frozenset[str] | None = None) -> list[ContainerInfo]: ...
    async def inspect(self, container_id: str) -> ContainerInfo | None: ...
    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None: ...
    async def probe(self, url: str) -> bool: ...
    async def is_sleeping(self, url: str) -> bool | None: ...
    async def sleep(self, spec: ModelSpec, url: str) -> None: ...
    async def wake(self, spec: ModelSpec, url: str) -> None: ...
    async def warm_up(self, spec: ModelSpec, url: str) -> None: ...
    async def logs_tail(self, container_id: str, lines: int = 40) -> str: ...
    def follow_logs(self, container_id: str, tail: int) -> LogStream: ...


class DockerRuntime:
    """Compose makes a model's containers, ahead of the switch that needs them; the
    switch itself starts and stops them through the docker API, which is what compose
    would do at that point, without a compose process's start-up on the critical path.

    Work that follows a stop (removing the exited containers, creating fresh ones for the
    model's next start) runs behind the switch; a later start or preparation of the same
    services waits for it.
    """

    def __init__(self, docker: Docker, *, upstream_host: str = "127.0.0.1") -> None:
        self.docker = docker
        self.upstream_host = upstream_host
        self._session: aiohttp.ClientSession | None = None
        # Work behind the switch, with the services it touches: removals (which settle
        # waits for) and preparations (which only a start of their services waits for).
        self._removals: dict[asyncio.Task[None], frozenset[str]] = {}
        self._preparations: dict[asyncio.Task[None], frozenset[str]] = {}
        # One look-and-create at a time: two would race to recreate the same container.
        self._creating = asyncio.Lock()
        self._ahead: asyncio.Task[None] | None = None
        # Clear while a model's containers are being started: work behind an earlier
        # switch waits, so that it does not take the docker engine's time from the start.
        self._not_starting = asyncio.Event()
        self._not_starting.set()
        # Seconds from the stop signal to the exit, at each model's last stop.
        self._exit_times: dict[str, float] = {}
        # Engine containers started behind the start gate, by model, until let through.
        self._staged: dict[str, _Staged] = {}
        self._signals: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        # A compose call cut short kills its process: none is left behind the daemon.
        await cancel_all(
            [*self._removals, *self._preparations, *self._signals, *filter(None, [self._ahead])]
        )
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

    async def _behind(self, services: Iterable[str], *, removals_only: bool = False) -> None:
        """Wait for the work behind earlier switches that touches these services, and
        for the work that work leaves (a removal is followed by a creation)."""
        wanted = set(services)
        registries = (self._removals,) if removals_only else (self._removals, self._preparations)
        while busy := [
            task
            for registry in registries
            for task, touched in registry.items()
            if touched & wanted and not task.done() and task is not asyncio.current_task()
        ]:
            await asyncio.gather(*busy, return_exceptions=True)

    # -- preparing: compose creates ------------------------------------------------------

    async def prepare(self, spec: ModelSpec) -> None:
        """Make the model's containers ready to start: created by compose from the current
        file and image. Services running for another model are left alone."""
        await self._behind(spec.services)
        await self._create([spec])

    def prepare_ahead(self, specs: Sequence[ModelSpec]) -> None:
        """Prepare these models one after another, behind everything else, so that their
        first switch finds its containers made. A switch waits for none of it: at most
        for the one model being created when it asks to create its own."""
        previous = self._ahead

        async def one_by_one() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            for spec in specs:
                await self._prepare_quietly([spec])

        if specs:
            self._ahead = asyncio.create_task(one_by_one(), name="prepare-ahead")

    def discard(self, spec: ModelSpec) -> None:
        """The model is gone from the file: remove what containers it has that do not run."""

        async def remove() -> None:
            await self._behind(spec.services)
            idle = [c for c in await self.docker.summaries(spec.services) if not c.running]
            await asyncio.gather(*(self.docker.remove_container(c.id) for c in idle))

        self._track(self._removals, remove(), frozenset(spec.services))

    async def _create(self, specs: Sequence[ModelSpec]) -> None:
        async with self._creating:
            await self._create_now(specs)

    async def _create_now(self, specs: Sequence[ModelSpec]) -> None:
        blueprints = await self.docker.blueprints()
        listed = _by_service(await self.docker.summaries(_services(specs)))
        images = {blueprints[s].image for s in _services(specs) if s in blueprints}
        image_ids = await self.docker.image_ids(images)
        profiles: dict[str, None] = {}
        wanted: dict[str, None] = {}
        for spec in specs:
            for service in spec.services:
                found = listed.get(service, [])
                if any(c.running for c in found) or service in wanted:
                    continue
                blueprint = blueprints.get(service)
                fresh = (
                    len(found) == 1
                    and found[0].status == "created"
                    and blueprint is not None
                    and found[0].config_hash == blueprint.config_hash
                    and found[0].image_id == image_ids.get(blueprint.image)
                )
                if not fresh:
                    profiles[spec.id] = None
                    wanted[service] = None
        if wanted:
            await self.docker.create(list(profiles), list(wanted))

    async def _prepare_quietly(self, specs: Sequence[ModelSpec]) -> None:
        # Not after other preparations: creations take turns (and look first) anyway,
        # and two of the same services would wait for each other.
        await self._behind(_services(specs), removals_only=True)
        try:
            await self._create(specs)
        except DockerError as err:
            # Not fatal: the model's start sees what is missing and lets compose up do it.
            log.warning(
                "could not create containers ahead",
                models=[s.id for s in specs],
                error=err.message,
            )

    def _track(
        self,
        registry: dict[asyncio.Task[None], frozenset[str]],
        work: Coroutine[Any, Any, None],
        services: frozenset[str],
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        registry[task] = services
        if registry is self._preparations:
            task.add_done_callback(lambda done: registry.pop(done, None))
        return task

    # -- starting --------------------------------------------------------------------------

    async def stage(self, spec: ModelSpec, *, behind: bool = False) -> bool:
        """Start the model's engine container with the engine held at the start gate
        (gate.py), so that docker's part of the start is done before the GPU is free; True
        once the gate says it holds. Only when the engine is the first of the model's
        containers to start, its container is made and fresh, and no running container has
        a fixed host port it asks for. ``start`` lets the engine through; ``unstage`` stops
        it unrun. ``behind``: for a standby, after any start under way."""
        if not spec.gated or spec.id in self._staged:
            return spec.id in self._staged
        await self._behind(spec.services)
        if behind:
            await self._not_starting.wait()
        try:
            listed = await self.docker.summaries()
            order = _start_order(spec, listed, self.docker.known_blueprints())
            if not order or [c.service for c in order[0]] != [spec.engine_service]:
                return False
            (engine,), rest = order[0], order[1:]
            taken = [address for c in listed if c.running for address in c.ports.values()]
            wanted = await self.docker.fixed_host_ports(engine.id)
            if any(_meet(one, other) for one in wanted for other in taken):
                return False
            await self.docker.hold(engine.id)
        except DockerError as err:
            log.info("not staged", model=spec.id, error=err.message)
            return False
        self._staged[spec.id] = _Staged(engine, rest)
        try:
            await self.docker.start_container(engine.id)
            # The gate's trap for the signal is set once it says it holds.
            async with asyncio.timeout(GATE_TIMEOUT):
                await self.docker.wait_for_line(engine.id, gate.HELD_LINE)
        except (OrchestratorError, TimeoutError) as err:
            log.warning("staged start failed", model=spec.id, error=str(err))
            # Stopped if it runs; its container, hold file and all, is removed either way.
            await self.stop(spec)
            with contextlib.suppress(DockerError):
                await self.docker.remove_container(engine.id)
            return False
        return True

    async def unstage(self, spec: ModelSpec) -> None:
        """Stop a staged engine container the switch will not use; its engine never ran."""
        if spec.id in self._staged:
            await self.stop(spec)

    async def held(self, container: ContainerInfo) -> bool:
        return container.running and await self.docker.held(container.id)

    async def in_the_way(self, spec: ModelSpec) -> list[str]:
        """The staged models whose containers publish a fixed host port that the model's
        engine container asks for: it cannot start beside them."""
        others = {m: s for m, s in self._staged.items() if m != spec.id}
        if not others:
            return []
        try:
            found = await self.docker.summaries([spec.engine_service])
            if len(found) != 1:
                return list(others)  # compose will make it: its ports are not known yet
            wanted = await self.docker.fixed_host_ports(found[0].id)
            if not wanted:
                return []
            taken = {
                model: await self.docker.fixed_host_ports(staged.engine.id)
                for model, staged in others.items()
            }
        except DockerError:
            return list(others)
        return [
            model
            for model, ports in taken.items()
            if any(_meet(one, other) for one in wanted for other in ports)
        ]

    async def start(self, spec: ModelSpec) -> None:
        staged = self._staged.pop(spec.id, None)
        if staged is not None:
            try:
                await self._let_through(spec, staged)
                return
            except DockerError as err:
                # Stopped unrun, removed and made afresh behind; the start below waits.
                log.warning("could not start the staged engine", error=err.message)
                await self.stop(spec)
        await self._behind(spec.services)
        order: list[list[ContainerInfo]] | None = None
        try:
            order = _start_order(
                spec, await self.docker.summaries(), self.docker.known_blueprints()
            )
        except DockerError as err:
            log.warning("could not list the model's containers", error=err.message)
        self._not_starting.clear()
        try:
            if order is not None:
                try:
                    for batch in order:
                        await asyncio.gather(*(self.docker.start_container(c.id) for c in batch))
                    return
                except DockerError as err:
                    log.warning("start through the docker API failed", error=err.message)
            try:
                await self.docker.up(spec.id, spec.services)
            except DockerError as err:
                raise await self._blame(spec, err) from err
        finally:
            self._not_starting.set()

    async def _let_through(self, spec: ModelSpec, staged: _Staged) -> None:
        """Signal the held engine, then start the model's other containers in their order.
        An engine whose service the file has changed since it was staged is not used."""
        blueprint = (self.docker.known_blueprints() or {}).get(spec.engine_service)
        if blueprint is None or blueprint.config_hash != staged.engine.config_hash:
            raise DockerError(f"{spec.id}: the compose file changed since it was staged")
        await self.docker.signal_gate(staged.engine.id)
        self._signal_again(staged.engine.id)
        for batch in staged.rest:
            await asyncio.gather(*(self.docker.start_container(c.id) for c in batch))

    def _signal_again(self, container_id: str) -> None:
        async def again() -> None:
            await asyncio.sleep(gate.SECOND_SIGNAL_AFTER)
            with contextlib.suppress(DockerError):
                await self.docker.signal_gate(container_id)

        task = asyncio.create_task(again(), name="gate-signal")
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

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

    # -- stopping ----------------------------------------------------------------------------

    async def stop(self, spec: ModelSpec) -> None:
        """Return once every container of the model has exited: its GPU memory is free.

        The engine gets its stop signal first, with the sidecars; services the engine
        depends on once it has exited, as compose orders a stop. Docker's own clean-up
        after the exit (network teardown), the removal of the exited containers and the
        creation of fresh ones carry on behind; ``settle`` collects the removal.
        """
        # A staged engine never ran: its exit says nothing of how the engine leaves.
        held = self._staged.pop(spec.id, None) is not None
        # Subscribed while the containers are listed, and before any is signalled, so
        # no death can slip between the two.
        subscribed, listed = await asyncio.gather(
            self.docker.subscribe_deaths(),
            self.docker.summaries(spec.services),
            return_exceptions=True,
        )
        if isinstance(listed, BaseException):
            if isinstance(subscribed, EventSubscription):
                subscribed.close()
            raise listed
        if isinstance(subscribed, BaseException):
            raise subscribed
        stops: list[asyncio.Task[None]] = []
        began = time.monotonic()
        try:
            running = [c for c in listed if c.running]
            for batch in _stop_order(spec, running, self.docker.known_blueprints()):
                signalled = [
                    asyncio.create_task(self.docker.stop_container(c.id, _grace(spec, c)))
                    for c in batch
                ]
                stops += signalled
                await _exited(subscribed, signalled, [c.id for c in batch])
        finally:
            subscribed.close()
        if stops and not held:
            self._exit_times[spec.id] = time.monotonic() - began
        # Containers that never ran stay: they are what the next start uses.
        spent = [c for c in listed if c.status != "created"]
        if not spent:
            return
        clearing = self._track(
            self._removals, self._clear(spec, spent, stops), frozenset(spec.services)
        )
        if not stops:
            # Nothing was running (a crash, say): nothing to wait for but the removal, so
            # the caller learns of the failure with the exited containers gone.
            await asyncio.shield(clearing)

    async def _clear(
        self, spec: ModelSpec, spent: list[ContainerInfo], stops: list[asyncio.Task[None]]
    ) -> None:
        await asyncio.gather(*stops, return_exceptions=True)
        await self._not_starting.wait()
        await asyncio.gather(*(self.docker.remove_container(c.id) for c in spent))
        self._track(self._preparations, self._prepare_quietly([spec]), frozenset(spec.services))

    def exit_time(self, model_id: str) -> float | None:
        """How long the model's engine took to exit after its stop signal, last time."""
        return self._exit_times.get(model_id)

    async def settle(self) -> None:
        """Wait for background removals; raise the first failure."""
        removals, self._removals = self._removals, {}
        results = await asyncio.gather(*removals, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def running(self, services: frozenset[str]) -> list[ContainerInfo]:
        return [c for c in await self.docker.summaries(services) if c.running]

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
        if engine.host_network:
            # No ports to publish on the host's network: the engine listens on the host.
            return f"http://{self.upstream_host}:{spec.container_port}"
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

    # -- vLLM's sleep mode ----------------------------------------------------------------

    async def is_sleeping(self, url: str) -> bool | None:
        return await sleepmode.is_sleeping(self._http(), url)

    async def sleep(self, spec: ModelSpec, url: str) -> None:
        await sleepmode.sleep(self._http(), url, spec.sleep or 1, spec.id)

    async def wake(self, spec: ModelSpec, url: str) -> None:
        await sleepmode.wake(self._http(), url, spec.sleep or 1, spec.id)

    async def warm_up(self, spec: ModelSpec, url: str) -> None:
        await sleepmode.warm_up(self._http(), url, spec.served_name, spec.id, spec.startup_timeout)

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        return await self.docker.logs_tail(container_id, lines)

    def follow_logs(self, container_id: str, tail: int) -> LogStream:
        return self.docker.follow_logs(container_id, tail)


@dataclass(frozen=True)
class _Staged:
    engine: ContainerInfo  # started, its engine held at the gate
    rest: list[list[ContainerInfo]]  # the model's other containers, in start order


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
    its startup timeout passes. ``seen`` is told of each look at the engine's container.

    The health check is polled, and tried again at once whenever the engine writes a log
    line: vLLM says "Application startup complete" as it becomes ready, so the daemon
    notices within milliseconds rather than within a poll interval.
    """
    deadline = began + spec.startup_timeout
    engine: ContainerInfo | None = None
    url: str | None = None
    next_exit_check = 0.0
    nudges = _Nudges()
    try:
        while True:
            now = clock()
            if now >= next_exit_check or engine is None:
                next_exit_check = now + EXIT_CHECK_INTERVAL
                engine = await _look(runtime, spec, engine)
                if engine is not None:
                    seen(engine)
                    _raise_if_gone(spec, engine, await _tail_if_gone(runtime, engine))
                    url = url or runtime.upstream_url(spec, engine)
                    nudges.follow(runtime, engine.id)
            if engine and url and await runtime.probe(url + spec.health_path):
                return Ready(engine, url)
            if clock() >= deadline:
                tail = await runtime.logs_tail(engine.id, LOG_TAIL_LINES) if engine else ""
                raise StartTimeout(
                    f"{spec.id}: not healthy at {spec.health_path} within"
                    f" {spec.startup_timeout:g} s",
                    model=spec.id,
                    log_tail=tail,
                )
            await nudges.wait(READY_POLL_INTERVAL)
    finally:
        nudges.close()


class _Nudges:
    """Set by each new line of the engine's log: the health check need not wait its turn."""

    def __init__(self) -> None:
        self._line = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stream: LogStream | None = None

    def follow(self, runtime: ModelRuntime, container_id: str) -> None:
        if self._task is not None:
            return
        try:
            self._stream = runtime.follow_logs(container_id, tail=0)
        except OrchestratorError:
            return  # followed by too many already: the poll alone will do
        self._task = asyncio.create_task(self._listen(self._stream), name="ready-nudges")

    async def _listen(self, stream: LogStream) -> None:
        with contextlib.suppress(Exception):
            async for _ in stream.lines():
                self._line.set()

    async def wait(self, at_most: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._line.wait(), at_most)
        self._line.clear()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._stream is not None:
            self._stream.close()


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


# -- orders and checks -----------------------------------------------------------------------


def _services(specs: Iterable[ModelSpec]) -> frozenset[str]:
    return frozenset(service for spec in specs for service in spec.services)


def _by_service(containers: Iterable[ContainerInfo]) -> dict[str, list[ContainerInfo]]:
    found: dict[str, list[ContainerInfo]] = {}
    for container in containers:
        found.setdefault(container.service, []).append(container)
    return found


def _start_order(
    spec: ModelSpec,
    containers: Iterable[ContainerInfo],
    blueprints: dict[str, Blueprint] | None,
) -> list[list[ContainerInfo]] | None:
    """The containers to start, in batches, dependencies first (what ``docker compose
    start`` does); None when compose up must do it: a container missing, out of date
    with the file, left over from an earlier run, or a dependency that waits on a
    condition (healthy, completed) rather than a start."""
    if blueprints is None:
        return None
    listed = _by_service(containers)
    needed: dict[str, ContainerInfo] = {}
    after: dict[str, set[str]] = {}  # service -> the services it starts after
    pending = [Dependency(service) for service in spec.services]
    while pending:
        wanted = pending.pop()
        service = wanted.service
        if service in needed:
            continue
        found = listed.get(service, [])
        blueprint = blueprints.get(service)
        if not found and not wanted.required:
            continue  # compose leaves out a dependency that is not required and not there
        if len(found) != 1 or blueprint is None:
            return None
        (container,) = found
        if not container.running:
            if container.config_hash != blueprint.config_hash:
                return None
            # The model's own services start from fresh containers; a shared service
            # that has run before is started again, as compose would.
            if service in spec.services and container.status != "created":
                return None
        for dependency in blueprint.depends_on:
            if dependency.condition != "service_started":
                return None
        pending += blueprint.depends_on
        after[service] = {d.service for d in blueprint.depends_on}
        needed[service] = container
    batches: list[list[ContainerInfo]] = []
    started: set[str] = {s for s, c in needed.items() if c.running}
    waiting = {s: c for s, c in needed.items() if not c.running}
    while waiting:
        batch = [c for s, c in waiting.items() if after[s] & set(needed) <= started]
        if not batch:
            return None  # a dependency cycle: compose reports it
        batches.append(batch)
        for container in batch:
            started.add(container.service)
            del waiting[container.service]
    return batches


def _stop_order(
    spec: ModelSpec, running: list[ContainerInfo], blueprints: dict[str, Blueprint] | None
) -> list[list[ContainerInfo]]:
    """The engine with everything that does not serve it first; what the engine depends
    on after it has exited."""
    needs = {s: {d.service for d in b.depends_on} for s, b in (blueprints or {}).items()}
    beneath: set[str] = set()
    pending = list(needs.get(spec.engine_service, ()))
    while pending:
        service = pending.pop()
        if service not in beneath:
            beneath.add(service)
            pending += needs.get(service, ())
    first = sorted(
        (c for c in running if c.service not in beneath),
        key=lambda c: c.service != spec.engine_service,
    )
    rest = [c for c in running if c.service in beneath]
    return [batch for batch in (first, rest) if batch]


def _meet(one: tuple[str, int], other: tuple[str, int]) -> bool:
    """Whether two host bindings (address, port) would take the same port."""
    return one[1] == other[1] and (
        one[0] in _ANY_ADDRESS or other[0] in _ANY_ADDRESS or one[0] == other[0]
    )


def _grace(spec: ModelSpec, container: ContainerInfo) -> float | None:
    return spec.stop_timeout if container.service == spec.engine_service else None


async def _exited(
    deaths: EventSubscription, stops: list[asyncio.Task[None]], ids: list[str]
) -> None:
    """Wait until each container has exited: its "die" event, or else its stop call's
    return (docker answers one only once the container has stopped), which raises the
    call's failure."""
    died: asyncio.Future[None] = asyncio.ensure_future(deaths.until_all(ids))
    stopped: asyncio.Future[list[None]] = asyncio.gather(*stops)
    try:
        waiting: set[asyncio.Future[Any]] = {died, stopped}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if died in done and died.exception() is None:
            return
        await stopped
    finally:
        died.cancel()
        # The stop calls go on behind, while docker cleans up; their end is collected there.
        stopped.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
