"""orchestrator/runtime.py over recorded containers: where a model answers, whose fault a
failed start is, how a stop and its clean-up are timed, and waiting for readiness."""

from __future__ import annotations

import asyncio
import copy
import queue
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import orchestrator.runtime as runtime_module
from orchestrator.compose import ModelSpec
from orchestrator.docker import ContainerInfo, Docker, EventSubscription
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
    return replace(
        spec("alpha"), services=("engine", "sidecar"), engine_service="engine", **changes
    )


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
    """Docker as DockerRuntime calls it, over containers the test lays out: compose calls are
    recorded, removals end when the test says, deaths come as recorded docker events."""

    def __init__(self, tmp_path: Path, containers: Iterable[ContainerInfo]) -> None:
        super().__init__(
            compose_file=tmp_path / "compose.yml", project_dir=tmp_path, project_name="mo-test"
        )
        self.listed = list(containers)
        self.calls: list[tuple[str, ...]] = []
        self.up_error: DockerError | None = None
        self.removal_error: DockerError | None = None
        self.removal_may_end = asyncio.Event()
        self.removal_may_end.set()
        self.removing = False
        self.removal_removes = True  # False: compose's rm ends, and leaves the containers
        self.deaths = DeathStream()

    async def list_containers(self, services: Iterable[str] | None = None) -> list[ContainerInfo]:
        wanted = None if services is None else set(services)
        return [c for c in self.listed if wanted is None or c.service in wanted]

    async def logs_tail(self, container_id: str, lines: int = 50) -> str:
        return f"the last {lines} lines of {container_id}"

    async def up(self, profile: str, services: Sequence[str]) -> None:
        self.calls.append(("up", profile, *services))
        if self.up_error is not None:
            raise self.up_error

    async def remove(self, profile: str, services: Sequence[str], grace: float | None) -> None:
        self.calls.append(("rm", profile, *services))
        self.removing = True
        try:
            await self.removal_may_end.wait()
        finally:
            self.removing = False
        if self.removal_error is not None:
            raise self.removal_error
        if self.removal_removes:
            self.listed = [c for c in self.listed if c.service not in services]

    async def subscribe_deaths(self, container_ids: Sequence[str]) -> EventSubscription:
        self.calls.append(("subscribe", *container_ids))
        return EventSubscription(self.deaths, asyncio.get_running_loop())

    def exit(self, container: ContainerInfo, code: int = 0) -> None:
        """The container's process exits: it is listed as exited, and docker says "die"."""
        exited = replace(container, status="exited", exit_code=code, ports={}, addresses=())
        self.listed = [exited if c.id == container.id else c for c in self.listed]
        event = copy.deepcopy(next(e for e in events() if e["Action"] == "die"))
        event["id"] = event["Actor"]["ID"] = container.id
        event["Actor"]["Attributes"]["exitCode"] = str(code)
        self.deaths.events.put(event)


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


class TestStopAndSettle:
    async def test_stop_returns_at_the_death_and_settle_collects_the_removal(
        self, tmp_path: Path
    ) -> None:
        """stop returns at the engine's death, its removal still running; settle waits for it."""
        engine = info("running")
        docker = RecordedDocker(tmp_path, [engine])
        docker.removal_may_end.clear()
        runtime = DockerRuntime(docker)
        stopping = asyncio.ensure_future(runtime.stop(model()))
        await eventually(lambda: docker.removing, what="compose rm under way")
        assert docker.calls == [("subscribe", engine.id), ("rm", "alpha", "engine", "sidecar")]
        docker.exit(engine)
        assert await finished_within(stopping, 5)
        await stopping
        assert [(c.id, c.status) for c in await runtime.containers()] == [(engine.id, "exited")]
        settling = asyncio.ensure_future(runtime.settle())
        assert not await finished_within(settling, 0.2)  # the removal has not ended
        docker.removal_may_end.set()
        await asyncio.wait_for(settling, 5)
        assert await runtime.containers() == []

    async def test_settle_raises_a_failed_removal(self, tmp_path: Path) -> None:
        """A removal that failed behind the switch is reported by settle."""
        engine = info("running")
        docker = RecordedDocker(tmp_path, [engine])
        docker.removal_may_end.clear()
        docker.removal_error = DockerError("docker compose rm failed (exit 1): busy")
        runtime = DockerRuntime(docker)
        stopping = asyncio.ensure_future(runtime.stop(model()))
        await eventually(lambda: docker.removing, what="compose rm under way")
        docker.exit(engine)
        await asyncio.wait_for(stopping, 5)
        docker.removal_may_end.set()
        with pytest.raises(DockerError, match="busy"):
            await runtime.settle()
        await runtime.settle()  # reported once

    async def test_a_start_waits_for_its_services_removal(self, tmp_path: Path) -> None:
        """A start of services still being removed waits for the removal: no compose race."""
        engine = info("running")
        docker = RecordedDocker(tmp_path, [engine])
        docker.removal_may_end.clear()
        runtime = DockerRuntime(docker)
        stopping = asyncio.ensure_future(runtime.stop(model()))
        await eventually(lambda: docker.removing, what="compose rm under way")
        docker.exit(engine)
        await asyncio.wait_for(stopping, 5)
        starting = asyncio.ensure_future(runtime.start(model()))
        assert not await finished_within(starting, 0.2)
        assert ("up", "alpha", "engine", "sidecar") not in docker.calls
        docker.removal_may_end.set()
        await asyncio.wait_for(starting, 5)
        assert docker.calls[-1] == ("up", "alpha", "engine", "sidecar")

    async def test_nothing_running_is_removed_before_stop_returns(self, tmp_path: Path) -> None:
        """A model whose containers have all exited is removed within the stop itself."""
        docker = RecordedDocker(tmp_path, [info("exited")])
        runtime = DockerRuntime(docker)
        await runtime.stop(model())
        assert await runtime.containers() == []
        assert docker.calls == [("rm", "alpha", "engine", "sidecar")]

    async def test_a_container_that_outlives_the_removal_is_an_error(self, tmp_path: Path) -> None:
        """If compose's rm ends and a container still runs, stop says which."""
        engine = info("running")
        docker = RecordedDocker(tmp_path, [engine])
        docker.removal_removes = False
        with pytest.raises(DockerError, match=f"still running after stop: {engine.name}$"):
            await DockerRuntime(docker).stop(model())

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

    async def start(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def stop(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        raise NotImplementedError

    def follow_logs(self, container_id: str, tail: int) -> LogStream:
        raise NotImplementedError


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

    async def test_no_engine_at_all_times_out_without_a_log(self) -> None:
        """An engine container that never appears times out with an empty log tail."""
        scripted = Scripted(listings=[[sidecar()]], probes_until_ready=0)
        with pytest.raises(StartTimeout) as caught:
            await wait(scripted)
        assert caught.value.details["log_tail"] == ""
        assert scripted.probed == []
