"""orchestrator/runtime.py over recorded containers: where a model answers, whose fault a
failed start is, how a stop and its clean-up are timed, and waiting for readiness."""

from __future__ import annotations

import asyncio
import copy
import queue
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import orchestrator.runtime as runtime_module
from orchestrator import gate
from orchestrator.compose import ModelSpec
from orchestrator.docker import Blueprint, ContainerInfo, Dependency, Docker, EventSubscription
from orchestrator.errors import DockerError, ModelExited, StartTimeout
from orchestrator.runtime import (
    EXIT_CHECK_INTERVAL,
    DockerRuntime,
    LogStream,
    ModelRuntime,
    Ready,
    wait_ready,
)
from tests.fakes import FakeRuntime, spec
from tests.recorded import events, info
from tests.waiting import eventually


def model(**changes: Any) -> ModelSpec:
    """A model whose engine is the recorded stand-ins' service, with a sidecar."""
    fields: dict[str, Any] = {"services": ("engine", "sidecar"), "engine_service": "engine"}
    return replace(spec("alpha"), **{**fields, **changes})


class DeathStream:
    """docker's event stream of "die" events, as the test hands them over, until closed."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self.events.get()) is not None:
            yield event

    def close(self) -> None:
        self.events.put(None)


class RecordedDocker(Docker):
    """Docker as DockerRuntime calls it, over containers the test lays out: every call is
    recorded; a stop call signals the container, which exits when the test says (and then
    docker says "die"), and returns when the test lets it; compose's calls change nothing
    unless the test says how."""

    def __init__(self, tmp_path: Path, containers: Iterable[ContainerInfo]) -> None:
        super().__init__(
            compose_file=tmp_path / "compose.yml", project_dir=tmp_path, project_name="mo-test"
        )
        self.listed = list(containers)
        self.calls: list[tuple[str, ...]] = []
        self.up_error: DockerError | None = None
        self.start_error: DockerError | None = None
        self.stop_error: DockerError | None = None
        self.removal_error: DockerError | None = None
        self.create_error: DockerError | None = None
        self.stop_calls_may_end = asyncio.Event()
        self.stop_calls_may_end.set()
        self.exit_on_signal = True  # False: the test says when a signalled container exits
        self.plans: dict[str, Blueprint] | None = None
        self.images: dict[str, str | None] = {}
        self.subscriptions: list[DeathStream] = []
        self.made = 0
        # The start gate: host ports each service asks for, and whether it says it holds.
        self.fixed_ports: dict[str, list[tuple[str, int]]] = {}
        self.says_held = True

    async def list_containers(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        wanted = None if services is None else set(services)
        return [c for c in self.listed if wanted is None or c.service in wanted]

    async def summaries(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        self.calls.append(("list",))
        return await self.list_containers(services)

    async def logs_tail(self, container_id: str, lines: int = 50) -> str:
        return f"the last {lines} lines of {container_id}"

    async def up(self, profile: str, services: Sequence[str]) -> None:
        self.calls.append(("up", profile, *services))
        if self.up_error is not None:
            raise self.up_error

    async def create(self, profiles: Iterable[str], services: Sequence[str]) -> None:
        self.calls.append(("create", ",".join(profiles), *services))
        if self.create_error is not None:
            raise self.create_error
        for service in services:
            self.made += 1
            self.listed = [c for c in self.listed if c.service != service]
            blueprint = (self.plans or {}).get(service)
            self.listed.append(made(service, f"new-{service}-{self.made}", blueprint, self.images))

    async def blueprints(self) -> dict[str, Blueprint]:
        if self.plans is None:
            raise DockerError("docker compose config failed (exit 1): no file")
        return self.plans

    def known_blueprints(self) -> dict[str, Blueprint] | None:
        return self.plans

    async def image_ids(self, references: Iterable[str]) -> dict[str, str | None]:
        return {r: self.images.get(r) for r in references}

    async def start_container(self, container_id: str) -> None:
        self.calls.append(("start", self._service(container_id)))
        await asyncio.sleep(0)
        if self.start_error is not None:
            raise self.start_error
        self._replace(container_id, status="running")

    async def stop_container(self, container_id: str, grace: float | None) -> None:
        self.calls.append(("signal", self._service(container_id), str(grace)))
        if self.exit_on_signal:
            self.exit(container_id)
        await self.stop_calls_may_end.wait()
        if self.stop_error is not None:
            raise self.stop_error

    async def fixed_host_ports(self, container_id: str) -> list[tuple[str, int]]:
        return self.fixed_ports.get(self._service(container_id), [])

    async def hold(self, container_id: str) -> None:
        self.calls.append(("hold", self._service(container_id)))

    async def wait_for_line(self, container_id: str, text: str) -> None:
        assert text == gate.HELD_LINE
        if not self.says_held:
            await asyncio.Event().wait()  # a gate that never speaks: the caller times out

    async def signal_gate(self, container_id: str) -> None:
        self.calls.append(("let through", self._service(container_id)))
        if not any(c.id == container_id and c.running for c in self.listed):
            raise DockerError(f"container {container_id[:12]} is not running")

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(("remove", self._service(container_id)))
        if self.removal_error is not None:
            raise self.removal_error
        self.listed = [c for c in self.listed if c.id != container_id]

    async def subscribe_deaths(self) -> EventSubscription:
        self.calls.append(("subscribe",))
        stream = DeathStream()
        self.subscriptions.append(stream)
        return EventSubscription(stream, asyncio.get_running_loop())

    def _service(self, container_id: str) -> str:
        """The container's service; "gone" for one removed, which docker calls not found."""
        return next((c.service for c in self.listed if c.id == container_id), "gone")

    def _replace(self, container_id: str, **changes: Any) -> None:
        self.listed = [replace(c, **changes) if c.id == container_id else c for c in self.listed]

    def exit(self, container_id: str, code: int = 0) -> None:
        """The container's process exits: it is listed as exited, and docker says "die"."""
        self._replace(container_id, status="exited", exit_code=code, ports={}, addresses=())
        event = copy.deepcopy(next(e for e in events() if e["Action"] == "die"))
        event["id"] = event["Actor"]["ID"] = container_id
        event["Actor"]["Attributes"]["exitCode"] = str(code)
        for stream in self.subscriptions:
            stream.events.put(event)


IMAGE = "model-orchestrator/standin:test"
IMAGE_ID = "sha256:" + "1" * 64
PLANS = {
    "engine": Blueprint("hash-engine", IMAGE),
    "sidecar": Blueprint("hash-sidecar", IMAGE),
    "database": Blueprint("hash-database", IMAGE),
}


def made(
    service: str,
    container_id: str,
    blueprint: Blueprint | None,
    images: Mapping[str, str | None],
    status: str = "created",
) -> ContainerInfo:
    """A container as compose creates it from the blueprint (its hash, its image's id)."""
    return replace(
        info("running"),
        id=container_id,
        name=f"mo-test-{service}-1",
        service=service,
        status=status,
        exit_code=None,
        ports={},
        addresses=(),
        config_hash=blueprint.config_hash if blueprint else None,
        image_id=images.get(blueprint.image) if blueprint else None,
    )


def laid_out(tmp_path: Path, *containers: tuple[str, str, tuple[str, ...]]) -> RecordedDocker:
    """A project of created containers, up to date: (service, status, depends_on) each."""
    images: dict[str, str | None] = {IMAGE: IMAGE_ID}
    docker = RecordedDocker(
        tmp_path,
        [
            made(service, f"id-{service}", PLANS[service], images, status=status)
            for service, status, _ in containers
        ],
    )
    docker.plans, docker.images = dict(PLANS), images
    for service, _, needs in containers:
        docker.plans[service] = replace(
            PLANS[service], depends_on=tuple(Dependency(d) for d in needs)
        )
    return docker


# --- upstream_url ---------------------------------------------------------------------------


class TestUpstreamUrl:
    def test_published_on_every_address(self, tmp_path: Path) -> None:
        """A port published on 0.0.0.0 (and ::) is reached on the configured upstream host."""
        engine = info("running")
        (port,) = {host_port for _, host_port in engine.ports.values()}
        docker = RecordedDocker(tmp_path, [])
        assert DockerRuntime(docker).upstream_url(model(), engine) == f"http://127.0.0.1:{port}"
        elsewhere = DockerRuntime(docker, upstream_host="host.docker.internal")
        assert elsewhere.upstream_url(model(), engine) == f"http://host.docker.internal:{port}"

    def test_published_on_one_address(self, tmp_path: Path) -> None:
        """A port bound to one address is reached there."""
        engine = info("unhealthy")
        runtime = DockerRuntime(RecordedDocker(tmp_path, []), upstream_host="10.0.0.9")
        assert runtime.upstream_url(model(), engine) == f"http://127.0.0.1:{engine.ports[8000][1]}"

    def test_unpublished_port_on_the_container_address(self, tmp_path: Path) -> None:
        """A port the compose file does not publish is reached on the container's own IP."""
        engine = info("running")
        runtime = DockerRuntime(RecordedDocker(tmp_path, []))
        url = runtime.upstream_url(model(container_port=9000), engine)
        assert url == f"http://{engine.addresses[0]}:9000"

    def test_on_the_host_network_at_its_own_port(self, tmp_path: Path) -> None:
        """An engine with network_mode: host publishes nothing: it answers on the host."""
        engine = replace(info("running"), ports={}, addresses=(), host_network=True)
        runtime = DockerRuntime(RecordedDocker(tmp_path, []), upstream_host="10.0.0.9")
        assert runtime.upstream_url(model(container_port=8123), engine) == "http://10.0.0.9:8123"

    def test_nowhere_to_reach(self, tmp_path: Path) -> None:
        """An exited engine (no port, no address) or none at all has no upstream."""
        runtime = DockerRuntime(RecordedDocker(tmp_path, []))
        assert runtime.upstream_url(model(), info("exited")) is None
        assert runtime.upstream_url(model(), None) is None

    def test_configured_upstream_wins(self, tmp_path: Path) -> None:
        """An upstream set for the model is used as given, less a trailing slash."""
        runtime = DockerRuntime(RecordedDocker(tmp_path, []))
        configured = model(upstream="http://gpu-box:8000/")
        assert runtime.upstream_url(configured, info("running")) == "http://gpu-box:8000"
        assert runtime.upstream_url(configured, None) == "http://gpu-box:8000"


# --- a failed start: whose fault --------------------------------------------------------------

UP_FAILED = DockerError("docker compose up --detach engine sidecar failed (exit 1): dependency")


def sidecar(state: Any = "running") -> ContainerInfo:
    return replace(info(state), service="sidecar")


class TestBlame:
    @pytest.mark.parametrize(
        ("engine", "cause", "code"),
        [
            ("exited", "exited with code 1", 1),
            ("oom-killed", "was killed for lack of memory", 137),
        ],
    )
    async def test_the_container_that_failed_is_named_with_its_log(
        self, tmp_path: Path, engine: Any, cause: str, code: int
    ) -> None:
        """When up fails because the engine died, the error names it with its log and compose's."""
        failed = info(engine)
        docker = RecordedDocker(tmp_path, [sidecar(), failed])
        docker.up_error = UP_FAILED
        with pytest.raises(ModelExited) as caught:
            await DockerRuntime(docker).start(model())
        assert caught.value.message == f"alpha: service engine {cause} while the model started"
        assert caught.value.details == {
            "model": "alpha",
            "service": "engine",
            "exit_code": code,
            "log_tail": f"the last 40 lines of {failed.id}",
            "compose_error": UP_FAILED.message,
        }
        assert caught.value.__cause__ is UP_FAILED

    async def test_an_unhealthy_dependency_is_named(self, tmp_path: Path) -> None:
        """A service whose healthcheck failed is blamed, though it still runs."""
        unhealthy = info("unhealthy")
        docker = RecordedDocker(tmp_path, [replace(info("running"), id="e"), unhealthy])
        docker.up_error = UP_FAILED
        with pytest.raises(ModelExited, match="service sidecar turned unhealthy") as caught:
            await DockerRuntime(docker).start(model())
        assert caught.value.details["log_tail"] == f"the last 40 lines of {unhealthy.id}"

    async def test_nothing_to_blame(self, tmp_path: Path) -> None:
        """With every container running or done with exit 0, compose's own error stands."""
        finished = replace(sidecar("exited"), exit_code=0)
        docker = RecordedDocker(tmp_path, [info("running"), finished])
        docker.up_error = UP_FAILED
        with pytest.raises(DockerError) as caught:
            await DockerRuntime(docker).start(model())
        assert caught.value is UP_FAILED


# --- stop and settle ------------------------------------------------------------------------


async def finished_within(task: asyncio.Future[Any], seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return task in done


ENGINE_AND_SIDECAR = (("engine", "running", ()), ("sidecar", "running", ("engine",)))


class TestStop:
    async def test_the_engine_is_signalled_first_and_stop_returns_at_the_deaths(
        self, tmp_path: Path
    ) -> None:
        """The engine's stop signal goes out first (with its stop grace period), the
        sidecar's with it; stop returns at their deaths while docker's stop calls go on."""
        docker = laid_out(tmp_path, *ENGINE_AND_SIDECAR)
        docker.stop_calls_may_end.clear()
        runtime = DockerRuntime(docker)
        await asyncio.wait_for(runtime.stop(model(stop_timeout=7.0)), 5)
        assert sorted(docker.calls[:2]) == [("list",), ("subscribe",)]
        assert docker.calls[2:] == [("signal", "engine", "7.0"), ("signal", "sidecar", "None")]
        assert {c.status for c in await runtime.containers()} == {"exited"}
        settling = asyncio.ensure_future(runtime.settle())
        assert not await finished_within(settling, 0.2)  # docker has not finished stopping
        docker.stop_calls_may_end.set()
        await asyncio.wait_for(settling, 5)
        assert ("remove", "engine") in docker.calls and ("remove", "sidecar") in docker.calls

    async def test_what_the_engine_depends_on_stops_after_it(self, tmp_path: Path) -> None:
        """A database the engine needs gets its signal once the engine has exited."""
        docker = laid_out(
            tmp_path, ("database", "running", ()), ("engine", "running", ("database",))
        )
        docker.exit_on_signal = False
        docker.stop_calls_may_end.clear()
        runtime = DockerRuntime(docker)
        stopping = asyncio.ensure_future(runtime.stop(model(services=("engine", "database"))))
        await eventually(lambda: ("signal", "engine", "None") in docker.calls, what="signal")
        assert not await finished_within(stopping, 0.1)
        assert not any(c[:2] == ("signal", "database") for c in docker.calls)
        docker.exit("id-engine")
        await eventually(lambda: ("signal", "database", "None") in docker.calls, what="second")
        docker.exit("id-database")
        await asyncio.wait_for(stopping, 5)
        docker.stop_calls_may_end.set()
        await runtime.settle()

    async def test_the_stop_calls_end_is_enough_without_an_event(self, tmp_path: Path) -> None:
        """If no "die" comes (the event stream is late), the stop call's return is the exit."""
        docker = laid_out(tmp_path, ("engine", "running", ()))
        docker.exit_on_signal = False
        await asyncio.wait_for(DockerRuntime(docker).stop(model()), 5)

    async def test_a_failed_stop_call_is_raised(self, tmp_path: Path) -> None:
        """A stop call that fails while the engine still runs fails the stop."""
        docker = laid_out(tmp_path, ("engine", "running", ()))
        docker.exit_on_signal = False
        docker.stop_error = DockerError("docker engine error: 500 Server Error")
        with pytest.raises(DockerError, match="500 Server Error"):
            await asyncio.wait_for(DockerRuntime(docker).stop(model()), 5)

    async def test_the_removal_and_fresh_containers_follow_behind(self, tmp_path: Path) -> None:
        """After the stop, the exited containers are removed and fresh ones created from the
        current file, so that the model's next start is a docker start."""
        docker = laid_out(tmp_path, *ENGINE_AND_SIDECAR)
        runtime = DockerRuntime(docker)
        await runtime.stop(model())
        await runtime.settle()
        await eventually(
            lambda: ("create", "alpha", "engine", "sidecar") in docker.calls, what="created"
        )
        assert {(c.service, c.status) for c in docker.listed} == {
            ("engine", "created"),
            ("sidecar", "created"),
        }

    async def test_containers_that_never_ran_are_left_for_the_next_start(
        self, tmp_path: Path
    ) -> None:
        """A model with nothing running is not signalled; its created containers stay."""
        docker = laid_out(tmp_path, ("engine", "created", ()))
        runtime = DockerRuntime(docker)
        await runtime.stop(model())
        await runtime.settle()
        assert [c[0] for c in docker.calls if c[0] not in {"list", "subscribe"}] == []
        assert [c.id for c in docker.listed] == ["id-engine"]

    async def test_settle_raises_a_failed_removal_once(self, tmp_path: Path) -> None:
        """A removal that failed behind the switch is reported by settle, once."""
        docker = laid_out(tmp_path, ("engine", "running", ()))
        docker.removal_error = DockerError("docker engine error: removal busy")
        runtime = DockerRuntime(docker)
        await runtime.stop(model())
        with pytest.raises(DockerError, match="busy"):
            await runtime.settle()
        await runtime.settle()

    async def test_the_fake_runtime_keeps_the_same_timing(self) -> None:
        """FakeRuntime too keeps stopped containers listed, exited, until settle removes them."""
        fake = FakeRuntime()
        alpha = spec("alpha")
        await fake.start(alpha)
        (running,) = await fake.containers()
        await fake.stop(alpha)
        (stopped,) = await fake.containers()
        assert (stopped.id, stopped.status, stopped.running) == (running.id, "exited", False)
        await fake.settle()
        assert await fake.containers() == []
        assert fake.removed == [running.id]


# --- start and prepare -----------------------------------------------------------------------


def started(docker: RecordedDocker) -> list[str]:
    return [c[1] for c in docker.calls if c[0] == "start"]


def composed(docker: RecordedDocker) -> list[tuple[str, ...]]:
    return [c for c in docker.calls if c[0] in {"up", "create"}]


class TestStart:
    async def test_created_containers_start_through_the_api_dependencies_first(
        self, tmp_path: Path
    ) -> None:
        """Up-to-date containers are started with docker's API in dependency order (what
        compose start does), a dependency outside the model too; no compose process."""
        docker = laid_out(
            tmp_path,
            ("database", "created", ()),
            ("engine", "created", ("database",)),
            ("sidecar", "created", ("engine",)),
        )
        await DockerRuntime(docker).start(model())
        assert started(docker) == ["database", "engine", "sidecar"]
        assert composed(docker) == []

    async def test_a_dependency_not_required_and_not_there_is_left_out(
        self, tmp_path: Path
    ) -> None:
        """depends_on with required: false: compose starts the model without it."""
        docker = laid_out(tmp_path, ("engine", "created", ()))
        assert docker.plans is not None
        docker.plans["engine"] = replace(
            docker.plans["engine"], depends_on=(Dependency("database", required=False),)
        )
        await DockerRuntime(docker).start(model(services=("engine",)))
        assert started(docker) == ["engine"]

    async def test_a_running_dependency_is_left_as_it_is(self, tmp_path: Path) -> None:
        """A shared service already up is not started again."""
        docker = laid_out(
            tmp_path, ("database", "running", ()), ("engine", "created", ("database",))
        )
        await DockerRuntime(docker).start(model(services=("engine",)))
        assert started(docker) == ["engine"]

    @pytest.mark.parametrize(
        "why",
        ["stale hash", "missing", "exited", "healthy condition", "file unread", "cycle"],
    )
    async def test_compose_up_when_the_containers_are_not_ready_to_start(
        self, tmp_path: Path, why: str
    ) -> None:
        """compose up does the start when a container is missing, out of date with the file,
        left over from a run, waits on a condition, or the file's hashes are unknown."""
        docker = laid_out(tmp_path, ("engine", "created", ()), ("sidecar", "created", ()))
        engine = docker.listed[0]
        assert docker.plans is not None
        plans = docker.plans
        if why == "stale hash":
            docker.listed[0] = replace(engine, config_hash="an older hash")
        elif why == "missing":
            del docker.listed[0]
        elif why == "exited":
            docker.listed[0] = replace(engine, status="exited", exit_code=0)
        elif why == "healthy condition":
            plans["sidecar"] = replace(
                plans["sidecar"], depends_on=(Dependency("engine", "service_healthy"),)
            )
        elif why == "file unread":
            docker.plans = None
        else:
            plans["engine"] = replace(plans["engine"], depends_on=(Dependency("sidecar"),))
            plans["sidecar"] = replace(plans["sidecar"], depends_on=(Dependency("engine"),))
        await DockerRuntime(docker).start(model())
        assert started(docker) == []
        assert composed(docker) == [("up", "alpha", "engine", "sidecar")]

    async def test_a_failed_api_start_falls_back_to_compose(self, tmp_path: Path) -> None:
        """If docker refuses the start, compose up tries, and its error is what is raised."""
        docker = laid_out(tmp_path, ("engine", "created", ()))
        docker.start_error = DockerError("docker engine error: port is already allocated")
        docker.up_error = UP_FAILED
        with pytest.raises(DockerError) as caught:
            await DockerRuntime(docker).start(model(services=("engine",)))
        assert caught.value is UP_FAILED
        assert started(docker) == ["engine"]
        assert composed(docker) == [("up", "alpha", "engine")]

    async def test_a_model_stopped_twice_still_starts(self, tmp_path: Path) -> None:
        """Two stops of one model leave two clean-ups behind; its start waits for both and
        they never wait for each other."""
        docker = laid_out(tmp_path, ("engine", "running", ()))
        docker.stop_calls_may_end.clear()
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",))
        await runtime.stop(spec)
        # docker lists a container as running for a moment after its death was reported
        docker.listed = [replace(c, status="running") for c in docker.listed]
        await runtime.stop(spec)
        docker.stop_calls_may_end.set()  # both clean-ups go on at once
        await asyncio.wait_for(runtime.start(spec), 5)
        assert started(docker) == ["engine"]

    async def test_a_start_waits_for_the_work_behind_its_services(self, tmp_path: Path) -> None:
        """Starting a model just stopped waits for its removal and fresh containers, then
        starts those with the API."""
        docker = laid_out(tmp_path, ("engine", "running", ()))
        docker.stop_calls_may_end.clear()
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",))
        await runtime.stop(spec)
        starting = asyncio.ensure_future(runtime.start(spec))
        assert not await finished_within(starting, 0.2)
        assert started(docker) == []
        docker.stop_calls_may_end.set()
        await asyncio.wait_for(starting, 5)
        assert started(docker) == ["engine"]
        assert [c.id for c in docker.listed] == ["new-engine-1"]


class TestStage:
    """Containers started behind the start gate, then let through by ``start``."""

    async def test_the_engine_starts_held_and_start_lets_it_through_then_the_rest(
        self, tmp_path: Path
    ) -> None:
        docker = laid_out(tmp_path, ("engine", "created", ()), ("sidecar", "created", ("engine",)))
        runtime = DockerRuntime(docker)
        spec = model(gated=True)
        assert await runtime.stage(spec)
        assert [c for c in docker.calls if c[0] != "list"] == [
            ("hold", "engine"),
            ("start", "engine"),
        ]
        assert await runtime.stage(spec)  # already staged: nothing more
        docker.calls.clear()
        await runtime.start(spec)
        # The sidecar waits on the engine: it starts once the engine is let through.
        assert docker.calls == [("let through", "engine"), ("start", "sidecar")]
        await runtime.close()

    async def test_the_signal_is_sent_twice(self, tmp_path: Path) -> None:
        """One that lands while the gate is between its look and its wait is caught but
        wakes nothing: a second follows."""
        docker = laid_out(tmp_path, ("engine", "created", ()))
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",), gated=True)
        assert await runtime.stage(spec)
        await runtime.start(spec)
        await eventually(
            lambda: docker.calls.count(("let through", "engine")) == 2, what="a second signal"
        )

    @pytest.mark.parametrize("why", ["ungated", "port taken", "dependency first", "stale"])
    async def test_not_staged(self, tmp_path: Path, why: str) -> None:
        """Nothing is started ahead for an ungated model, an engine whose fixed host port a
        running container publishes, one that starts after a dependency, or a container
        compose must make again: the start does it as before."""
        docker = laid_out(tmp_path, ("engine", "created", ()), ("database", "created", ()))
        docker.listed.append(
            replace(made("other", "id-other", None, {}, "running"), ports={8000: ("0.0.0.0", 8000)})
        )
        spec = model(services=("engine",), gated=why != "ungated")
        if why == "port taken":
            docker.fixed_ports["engine"] = [("127.0.0.1", 8000)]
        elif why == "dependency first":
            assert docker.plans is not None
            docker.plans["engine"] = replace(PLANS["engine"], depends_on=(Dependency("database"),))
        elif why == "stale":
            docker.listed[0] = replace(docker.listed[0], config_hash="an older hash")
        runtime = DockerRuntime(docker)
        assert not await runtime.stage(spec)
        assert [c for c in docker.calls if c[0] in {"hold", "start"}] == []

    async def test_a_gate_that_never_says_it_holds_is_stopped_and_removed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the gate's line the signal could come before its trap: the container is
        not used, and a later start makes a fresh one through compose."""
        monkeypatch.setattr(runtime_module, "GATE_TIMEOUT", 0.05)
        docker = laid_out(tmp_path, ("engine", "created", ()))
        docker.says_held = False
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",), gated=True)
        assert not await runtime.stage(spec)
        assert ("signal", "engine", "None") in docker.calls
        assert ("remove", "engine") in docker.calls
        await runtime.close()

    async def test_a_staged_engine_gone_meanwhile_is_started_afresh(self, tmp_path: Path) -> None:
        """The held container died (killed by hand, say): the start stops what is left and
        starts the model as if it had not been staged."""
        docker = laid_out(tmp_path, ("engine", "created", ()))
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",), gated=True)
        assert await runtime.stage(spec)
        docker.exit("id-engine", code=137)
        await asyncio.wait_for(runtime.start(spec), 5)
        assert ("remove", "engine") in docker.calls
        assert started(docker)[-1] == "engine"
        assert [c.status for c in docker.listed] == ["running"]

    @pytest.mark.parametrize(("port", "in_the_way"), [(8000, ["beta"]), (8001, [])])
    async def test_a_standby_is_in_the_way_when_it_holds_a_fixed_port_the_target_asks_for(
        self, tmp_path: Path, port: int, in_the_way: list[str]
    ) -> None:
        docker = laid_out(tmp_path, ("engine", "created", ()), ("sidecar", "created", ()))
        runtime = DockerRuntime(docker)
        beta = replace(
            model(services=("sidecar",), engine_service="sidecar", gated=True), id="beta"
        )
        assert await runtime.stage(beta)
        docker.fixed_ports = {"sidecar": [("0.0.0.0", 8000)], "engine": [("127.0.0.1", port)]}
        assert await runtime.in_the_way(model(services=("engine",))) == in_the_way
        await runtime.close()

    async def test_the_exit_time_is_kept_for_engines_that_ran(self, tmp_path: Path) -> None:
        docker = laid_out(tmp_path, ("engine", "running", ()))
        runtime = DockerRuntime(docker)
        spec = model(services=("engine",), gated=True)
        assert runtime.exit_time("alpha") is None
        await runtime.stop(spec)
        first = runtime.exit_time("alpha")
        assert first is not None and first >= 0
        await runtime.settle()
        assert await runtime.stage(spec)  # a fresh container, held
        await runtime.stop(spec)  # its engine never ran: says nothing of the engine's exit
        assert runtime.exit_time("alpha") == first
        await runtime.close()


class TestPrepare:
    async def test_up_to_date_containers_are_left_alone(self, tmp_path: Path) -> None:
        docker = laid_out(tmp_path, ("engine", "created", ()), ("sidecar", "created", ()))
        await DockerRuntime(docker).prepare(model())
        assert composed(docker) == []

    async def test_only_what_is_missing_or_stale_is_created(self, tmp_path: Path) -> None:
        """A service whose image moved on, or whose container ran before, is made again;
        one running (for another model) is not touched."""
        docker = laid_out(
            tmp_path,
            ("engine", "created", ()),
            ("sidecar", "exited", ()),
            ("database", "running", ()),
        )
        docker.images[IMAGE] = "sha256:" + "2" * 64  # the tag now names a newer build
        await DockerRuntime(docker).prepare(model(services=("engine", "sidecar", "database")))
        assert composed(docker) == [("create", "alpha", "engine", "sidecar")]

    async def test_ahead_of_time_one_model_after_another(self, tmp_path: Path) -> None:
        """Models prepared ahead are made one at a time; a failure is logged, not raised."""
        docker = laid_out(tmp_path)
        docker.create_error = DockerError("docker compose up failed (exit 1): no such image")
        runtime = DockerRuntime(docker)
        runtime.prepare_ahead([model(), model(id="beta", services=("database",))])
        await eventually(lambda: len(composed(docker)) == 2, what="both models tried")
        assert composed(docker) == [
            ("create", "alpha", "engine", "sidecar"),
            ("create", "beta", "database"),
        ]

    async def test_a_dropped_model_loses_its_idle_containers(self, tmp_path: Path) -> None:
        """discard removes what a removed model left that does not run."""
        docker = laid_out(tmp_path, ("engine", "created", ()), ("sidecar", "exited", ()))
        runtime = DockerRuntime(docker)
        runtime.discard(model())
        await runtime.settle()
        assert docker.listed == []


# --- wait_ready -----------------------------------------------------------------------------


@dataclass
class Scripted:
    """Just enough of a ModelRuntime for wait_ready: what each look at the engine finds, and
    a health check that passes after a number of probes. Every call takes 0.1 s of a clock
    of its own."""

    listings: list[list[ContainerInfo]]
    inspections: list[ContainerInfo | None] = field(default_factory=list)
    probes_until_ready: int | None = None  # None: never healthy
    now: float = 100.0
    probed: list[str] = field(default_factory=list)
    inspected: list[str] = field(default_factory=list)
    followed: list[str] = field(default_factory=list)
    log: LogStream | None = None  # the engine's log as followed; None: it says nothing

    def clock(self) -> float:
        return self.now

    def _tick(self) -> None:
        self.now += 0.1

    async def containers(self, services: frozenset[str] | None = None) -> list[ContainerInfo]:
        self._tick()
        return self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        self._tick()
        self.inspected.append(container_id)
        if not self.inspections:
            return next(c for c in self.listings[-1] if c.id == container_id)
        return self.inspections.pop(0) if len(self.inspections) > 1 else self.inspections[0]

    def upstream_url(self, spec: ModelSpec, engine: ContainerInfo | None) -> str | None:
        return None if engine is None else f"http://engine-{engine.id[:12]}:8000"

    async def probe(self, url: str) -> bool:
        self._tick()
        self.probed.append(url)
        limit = self.probes_until_ready
        return limit is not None and len(self.probed) > limit

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        return f"the last {lines} lines of {container_id}"

    # Not used while waiting for readiness.
    async def prepare(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    def prepare_ahead(self, specs: Sequence[ModelSpec]) -> None:
        raise NotImplementedError

    def discard(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def running(self, services: frozenset[str]) -> list[ContainerInfo]:
        raise NotImplementedError

    async def stage(self, spec: ModelSpec, *, behind: bool = False) -> bool:
        raise NotImplementedError

    async def unstage(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def in_the_way(self, spec: ModelSpec) -> list[str]:
        raise NotImplementedError

    async def held(self, container: ContainerInfo) -> bool:
        raise NotImplementedError

    async def start(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def stop(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        raise NotImplementedError

    def exit_time(self, model_id: str) -> float | None:
        raise NotImplementedError

    async def is_sleeping(self, url: str) -> bool | None:
        raise NotImplementedError

    async def sleep(self, spec: ModelSpec, url: str) -> None:
        raise NotImplementedError

    async def wake(self, spec: ModelSpec, url: str) -> None:
        raise NotImplementedError

    async def warm_up(self, spec: ModelSpec, url: str) -> None:
        raise NotImplementedError

    def follow_logs(self, container_id: str, tail: int) -> LogStream:
        self.followed.append(container_id)
        return self.log if self.log is not None else Silent()


class Talking:
    """A followed log whose lines the test writes."""

    def __init__(self) -> None:
        self.written: asyncio.Queue[str] = asyncio.Queue()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def lines(self) -> AsyncIterator[str]:
        while True:
            yield await self.written.get()


class Silent:
    """A followed log with nothing more to say."""

    def close(self) -> None:
        pass

    async def lines(self) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield ""  # never reached: the wait lasts until the follower is closed


@pytest.fixture(autouse=True)
def no_poll_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_ready's pause between probes, in real time, is no part of these tests."""
    monkeypatch.setattr(runtime_module, "READY_POLL_INTERVAL", 0)


async def wait(scripted: Scripted, seen: list[ContainerInfo] | None = None) -> Ready:
    runtime: ModelRuntime = scripted
    return await wait_ready(
        runtime,
        model(),
        began=scripted.clock(),
        clock=scripted.clock,
        seen=(seen if seen is not None else []).append,
    )


class TestWaitReady:
    async def test_ready_once_the_health_check_passes(self) -> None:
        """The engine, once found, is probed at its health path until it answers; looks reported."""
        engine = info("running")
        scripted = Scripted(listings=[[], [sidecar(), engine]], probes_until_ready=3)
        seen: list[ContainerInfo] = []
        ready = await wait(scripted, seen)
        url = f"http://engine-{engine.id[:12]}:8000"
        assert ready == Ready(engine, url)
        assert scripted.probed == [url + "/health"] * 4
        assert seen and all(c == engine for c in seen)

    async def test_the_engine_is_looked_at_between_probes_not_on_each(self) -> None:
        """Probes go on every turn; the container is inspected once per exit-check interval."""
        scripted = Scripted(listings=[[info("running")]], probes_until_ready=40)
        await wait(scripted)
        # 4 s of fake time (0.1 s a call): one inspection per interval, give or take one.
        assert len(scripted.probed) == 41
        expected = 4.0 / EXIT_CHECK_INTERVAL
        assert expected / 2 <= len(scripted.inspected) <= expected + 1

    @pytest.mark.parametrize(
        ("state", "cause", "code"),
        [
            ("exited", "exited with code 1", 1),
            ("oom-killed", "was killed for lack of memory", 137),
            ("restarting", "exited and is being restarted", None),
        ],
    )
    async def test_an_engine_that_dies_fails_the_start(
        self, state: Any, cause: str, code: int | None
    ) -> None:
        """An engine seen exited, OOM-killed or restarting ends the wait with its log."""
        engine, gone = info("running"), info(state)
        scripted = Scripted(listings=[[engine]], inspections=[engine, gone])
        with pytest.raises(ModelExited) as caught:
            await wait(scripted)
        assert caught.value.message == (
            f"alpha: the engine container {cause} before it became healthy"
        )
        assert caught.value.details == {
            "model": "alpha",
            "exit_code": code,
            "log_tail": f"the last 40 lines of {gone.id}",
        }

    async def test_an_engine_already_gone_at_the_first_look(self) -> None:
        """An engine that exited before the first look is not probed at all."""
        scripted = Scripted(listings=[[info("exited")]], probes_until_ready=0)
        with pytest.raises(ModelExited, match="exited with code 1"):
            await wait(scripted)
        assert scripted.probed == []

    async def test_a_removed_engine_fails_the_start(self) -> None:
        """An engine whose container disappears (removed by hand) ends the wait."""
        engine = info("running")
        scripted = Scripted(listings=[[engine]], inspections=[engine, None])
        with pytest.raises(ModelExited) as caught:
            await wait(scripted)
        assert caught.value.details["exit_code"] is None
        assert caught.value.details["log_tail"] == f"the last 40 lines of {engine.id}"

    async def test_an_engine_that_never_answers_times_out(self) -> None:
        """Past the startup timeout the wait ends with StartTimeout and the engine's log."""
        engine = info("running")
        scripted = Scripted(listings=[[engine]])
        with pytest.raises(StartTimeout) as caught:
            await wait(scripted)
        assert caught.value.message == "alpha: not healthy at /health within 5 s"
        assert caught.value.details["log_tail"] == f"the last 40 lines of {engine.id}"
        assert 100.0 + 5.0 <= scripted.now < 100.0 + 5.0 + 0.5

    async def test_a_log_line_brings_the_next_probe_forward(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a poll interval of a minute, the engine's log lines alone drive the probes:
        each line, a probe; the followed log is closed once the engine is ready."""
        monkeypatch.setattr(runtime_module, "READY_POLL_INTERVAL", 60)
        log = Talking()
        scripted = Scripted(listings=[[info("running")]], probes_until_ready=2, log=log)
        waiting = asyncio.ensure_future(wait(scripted))

        def probed_more_than(count: int) -> Callable[[], bool]:
            return lambda: len(scripted.probed) > count

        for line in ("Starting to load model", "Application startup complete."):
            await eventually(lambda: log.written.empty(), what="the line read")
            log.written.put_nowait(line)
            await eventually(probed_more_than(len(scripted.probed)), what="a probe")
        await asyncio.wait_for(waiting, 5)
        assert scripted.followed == [info("running").id]
        assert log.closed

    async def test_no_engine_at_all_times_out_without_a_log(self) -> None:
        """An engine container that never appears times out with an empty log tail."""
        scripted = Scripted(listings=[[sidecar()]], probes_until_ready=0)
        with pytest.raises(StartTimeout) as caught:
            await wait(scripted)
        assert caught.value.details["log_tail"] == ""
        assert scripted.probed == []
