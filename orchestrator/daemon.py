"""The daemon assembled: every part built and wired in one place, ``build_daemon``.

``cli serve`` and the tests both build the daemon here; the tests hand in a fake runtime
(and no Docker), everything else is the same. Each part is given what it needs when it is
made, and the few links that go both ways (the switcher and the gateway's traffic, the
catalog and the switcher) are made by explicit ``connect`` calls below, nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .agent import AgentServer
from .answers import AgentAddress
from .api import create_app
from .balancer import Balancer
from .cache import Verdicts
from .catalog import Catalog, CatalogPaths, ConfigReader, Validator
from .docker import (
    Docker,
    ImageReader,
    compose_config,
    detect_compose_cli,
    image_reader,
    runtime_environment,
    user_environment,
)
from .events import EventFeed, EventHub
from .gateway import Gateway
from .history import History
from .metrics import Metrics
from .pool import PoolLimits, default_budget
from .registry import EngineDefaults, RegistryLimits
from .runtime import DockerRuntime, ModelRuntime
from .security import AccessPolicy, keys_for_bind
from .server import ConnectionGuard, connection_bound
from .store import Store
from .switcher import Switcher
from .traffic import Traffic
from .watcher import Watcher

if TYPE_CHECKING:
    from .compose import ComposeProject, ComposeSource
    from .config import Settings

DATABASE = "orchestrator.db"


@dataclass
class Daemon:
    settings: Settings
    project: ComposeProject
    store: Store
    catalog: Catalog
    runtime: ModelRuntime
    watcher: Watcher
    history: History
    switcher: Switcher
    traffic: Traffic
    gateway: Gateway
    events: EventHub
    metrics: Metrics
    connections: ConnectionGuard
    app: web.Application
    docker: Docker | None
    keys: tuple[str, ...]
    balancer: Balancer
    agent: AgentServer | None
    _closing: contextlib.AsyncExitStack

    async def start(self) -> None:
        """Reconcile with Docker and start the background work (the worker, the watcher)."""
        await self.switcher.start(self.docker.events if self.docker is not None else None)
        self.traffic.start()
        self.balancer.start()
        if self.agent is not None:
            await self.agent.start()
            self._closing.push_async_callback(self.agent.close)

    async def close(self) -> None:
        """Stop the background work and close what was opened; the models keep running."""
        await self._closing.aclose()


async def compose_reader(environment: dict[str, str] | None = None) -> ConfigReader:
    """How the daemon asks compose for a project: the user's variables, none of its own."""
    cli = await detect_compose_cli()
    variables = user_environment(os.environ) if environment is None else environment

    async def read(source: ComposeSource) -> str:
        return await compose_config(cli, source, variables)

    return read


async def build_daemon(
    settings: Settings,
    *,
    runtime: ModelRuntime | None = None,
    read_config: ConfigReader | None = None,
    descriptor_limit: int = 1024,
) -> Daemon:
    """Open the store, read the compose project, and build and wire every part.

    Without ``runtime`` the daemon drives Docker (and compose validates its copy); a test
    gives a fake. Whatever fails on the way closes what was already opened.
    """
    closing = contextlib.AsyncExitStack()
    try:
        return await _build(settings, runtime, read_config, descriptor_limit, closing)
    except BaseException:
        await closing.aclose()
        raise


async def _build(
    settings: Settings,
    runtime: ModelRuntime | None,
    read_config: ConfigReader | None,
    descriptor_limit: int,
    closing: contextlib.AsyncExitStack,
) -> Daemon:
    keys = keys_for_bind(
        host=settings.host,
        keys=settings.api_keys,
        state_dir=settings.state_dir,
        insecure_no_auth=settings.insecure_no_auth,
    )
    # A test's fake runtime runs no images: its engines are not gated.
    read_images = image_reader() if runtime is None else None
    store, catalog = await _store_and_catalog(settings, read_config, read_images, closing)
    project = await catalog.load()
    docker: Docker | None = None
    if runtime is None:
        docker, runtime = await _docker(settings, catalog, project, closing)
    switcher = _switcher(settings, catalog, store, runtime)
    closing.push_async_callback(switcher.close)
    watcher, history = switcher.watcher, switcher.history
    traffic = Traffic(
        switcher,
        auto_switch=settings.auto_switch,
        max_queue=settings.max_queue,
        drain_timeout=settings.drain_timeout,
        default_ttl=settings.ttl,
    )
    closing.push_async_callback(traffic.close)
    events = EventHub()
    feed = EventFeed(events, serving=lambda: switcher.serving)
    metrics = Metrics(switcher)
    balancer = Balancer(switcher, traffic, drain_timeout=settings.drain_timeout)
    closing.push_async_callback(balancer.close)
    gateway = Gateway(switcher, traffic, aliases=settings.aliases, observers=[metrics, balancer])
    closing.push_async_callback(gateway.close)
    agent = None
    if settings.agent_port:
        agent = AgentServer(balancer, settings.agent_host, settings.agent_port)
    # The links that go both ways, made here and nowhere else.
    switcher.connect(drain=traffic, observers=[traffic, metrics, feed])
    catalog.connect(
        validate=_validator(docker),
        on_change=switcher.set_models,
        in_use=switcher.involves,
        on_pull=feed.pull,
    )
    connections = ConnectionGuard(connection_bound(settings.max_connections, descriptor_limit))
    app = create_app(
        switcher=switcher,
        runtime=runtime,
        watcher=watcher,
        history=history,
        events=events,
        metrics=metrics,
        catalog=catalog,
        gateway=gateway,
        policy=_policy(settings, keys),
        max_streams=settings.max_streams,
        connections=connections,
        balancer=balancer,
        agent=None if agent is None else AgentAddress(host=agent.host, port=agent.port),
    )
    return Daemon(
        settings, project, store, catalog, runtime, watcher, history, switcher, traffic,
        gateway, events, metrics, connections, app, docker, keys, balancer, agent, closing,
    )  # fmt: skip


def _switcher(
    settings: Settings, catalog: Catalog, store: Store, runtime: ModelRuntime
) -> Switcher:
    watcher = Watcher(
        runtime, probe_interval=settings.probe_interval, probe_failures=settings.probe_failures
    )
    return Switcher(
        models=catalog.specs(),
        runtime=runtime,
        store=store,
        history=History(store),
        verdicts=Verdicts(settings.models_dir / "hub"),
        watcher=watcher,
        rollback=settings.rollback,
        restore_on_start=settings.restore_on_start,
        preload=settings.preload,
        standby=settings.standby,
        pool=PoolLimits(
            max_asleep=settings.max_asleep,
            ram_budget=default_budget(settings.sleep_ram_budget),
            sleep_ttl=settings.sleep_ttl,
        ),
    )


async def _store_and_catalog(
    settings: Settings,
    read_config: ConfigReader | None,
    read_images: ImageReader | None,
    closing: contextlib.AsyncExitStack,
) -> tuple[Store, Catalog]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(settings.state_dir / DATABASE)
    closing.push_async_callback(store.close)
    catalog = Catalog(
        paths=CatalogPaths(settings.compose_source, settings.models_dir, settings.state_dir),
        store=store,
        read_config=read_config or await compose_reader(),
        overrides=settings.models,
        engine_defaults=EngineDefaults(image=settings.engine_image, gpus=settings.engine_gpus),
        limits=RegistryLimits(settings.checkpoint_roots, settings.allowed_images),
        hub_endpoint=settings.hub_endpoint,
        read_images=read_images,
    )
    closing.push_async_callback(catalog.close)
    return store, catalog


async def _docker(
    settings: Settings,
    catalog: Catalog,
    project: ComposeProject,
    closing: contextlib.AsyncExitStack,
) -> tuple[Docker, ModelRuntime]:
    """Docker for the daemon's copy of the project, checked by compose, and its runtime."""
    docker = Docker(
        compose_file=catalog.paths.normalized,
        project_dir=settings.compose_source.project_dir,
        project_name=project.name,
        compose_cli=await detect_compose_cli(),
        max_log_followers=settings.max_streams,
        environment=runtime_environment(os.environ),
    )
    await docker.validate(project.models)
    runtime = DockerRuntime(docker, upstream_host=settings.upstream_host)
    closing.push_async_callback(runtime.close)
    return docker, runtime


def _validator(docker: Docker | None) -> Validator | None:
    """How the catalog has compose check a candidate copy; none without Docker (tests)."""
    if docker is None:
        return None

    async def validate(candidate: Path, profiles: Iterable[str]) -> None:
        await docker.validate(profiles, compose_file=candidate)

    return validate


def _policy(settings: Settings, keys: tuple[str, ...]) -> AccessPolicy:
    return AccessPolicy.build(
        keys=keys,
        bind_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        protect_reads=settings.protect_reads,
    )
