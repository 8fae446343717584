"""orchestrator/docker.py against what Docker really says: recorded inspect documents and
events of stand-in containers (tests/data/docker/), a fake compose CLI, a fake log client."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from orchestrator.docker import (
    LOG_RING,
    Blueprint,
    ContainerEvent,
    Dependency,
    Docker,
    EventSubscription,
    LogFollower,
    _parse_time,
    container_info,
    container_summary,
    dependencies,
    run_compose,
    runtime_environment,
    user_environment,
)
from orchestrator.errors import DockerError, TooManyStreams
from tests.recorded import (
    State,
    config_hashes,
    events,
    info,
    inspect_document,
    listed,
    log_lines,
)
from tests.waiting import eventually

# --- container_info -------------------------------------------------------------------------


class TestContainerInfo:
    def test_running_container(self) -> None:
        """A running stand-in: its service label, address, start time and published port."""
        document = inspect_document("running")
        bindings = document["NetworkSettings"]["Ports"]["8000/tcp"]
        assert [b["HostIp"] for b in bindings] == ["0.0.0.0", "::"]  # one per family
        seen = container_info(document)
        assert seen.id == document["Id"]
        assert seen.name == document["Name"].removeprefix("/")
        assert (seen.service, seen.status, seen.running) == ("engine", "running", True)
        assert seen.exit_code is None
        assert seen.started_at is not None
        assert seen.started_at.isoformat().startswith(document["State"]["StartedAt"][:26])
        assert seen.ports == {8000: ("0.0.0.0", int(bindings[0]["HostPort"]))}  # IPv4 chosen
        assert seen.addresses == (document["NetworkSettings"]["Networks"]["bridge"]["IPAddress"],)
        assert (seen.oom_killed, seen.health) == (False, None)

    def test_host_network_is_read_from_inspect_and_list_alike(self) -> None:
        """network_mode: host shows in HostConfig of both documents; the recorded
        containers are on a bridge network."""
        document = inspect_document("running")
        summary = next(c for c in listed() if c["Id"] == document["Id"])
        assert not container_info(document).host_network
        assert not container_summary(summary).host_network
        document["HostConfig"]["NetworkMode"] = "host"
        summary.setdefault("HostConfig", {})["NetworkMode"] = "host"
        assert container_info(document).host_network
        assert container_summary(summary).host_network

    def test_exited_container(self) -> None:
        """A crashed stand-in: exited with its code, no port, no address left."""
        seen = info("exited")
        assert (seen.status, seen.running, seen.exit_code) == ("exited", False, 1)
        assert (seen.ports, seen.addresses) == ({}, ())
        assert not seen.oom_killed

    def test_oom_killed_container(self) -> None:
        """The kernel's OOM kill shows as oom_killed with docker's exit code 137."""
        seen = info("oom-killed")
        assert (seen.status, seen.exit_code, seen.oom_killed) == ("exited", 137, True)

    def test_restarting_container(self) -> None:
        """A container docker is restarting counts as running, with no exit code."""
        document = inspect_document("restarting")
        assert document["State"]["ExitCode"] == 1  # its last run's, which is not reported
        seen = container_info(document)
        assert (seen.status, seen.running, seen.exit_code) == ("restarting", True, None)

    def test_unhealthy_container(self) -> None:
        """docker's healthcheck verdict is read; a port bound to one address keeps it."""
        document = inspect_document("unhealthy")
        (binding,) = document["NetworkSettings"]["Ports"]["8000/tcp"]
        seen = container_info(document)
        assert (seen.service, seen.running, seen.health) == ("sidecar", True, "unhealthy")
        assert seen.ports == {8000: ("127.0.0.1", int(binding["HostPort"]))}

    def test_ipv4_binding_is_preferred_in_any_order(self) -> None:
        """Docker lists the IPv4 and IPv6 bindings in no promised order: IPv4 is chosen."""
        document = inspect_document("running")
        bindings = document["NetworkSettings"]["Ports"]["8000/tcp"]
        bindings.reverse()
        assert bindings[0]["HostIp"] == "::"
        assert container_info(document).ports[8000][0] == "0.0.0.0"

    def test_only_bound_tcp_ports_are_kept(self) -> None:
        """UDP ports and ports exposed without a binding are not upstreams."""
        document = inspect_document("running")
        document["NetworkSettings"]["Ports"].update(
            {"8001/udp": [{"HostIp": "0.0.0.0", "HostPort": "5353"}], "9000/tcp": None}
        )
        assert list(container_info(document).ports) == [8000]

    def test_a_bare_document(self) -> None:
        """A document missing every section gives an unknown, stopped container."""
        seen = container_info({})
        assert (seen.id, seen.service, seen.status, seen.running) == ("", "", "unknown", False)
        assert (seen.ports, seen.addresses, seen.started_at) == ({}, (), None)


# --- container_summary: the same view from one list call -----------------------------------


def summary_of(state: State) -> dict[str, Any]:
    container_id = inspect_document(state)["Id"]
    return next(c for c in listed() if c["Id"] == container_id)


class TestContainerSummary:
    @pytest.mark.parametrize("state", ["running", "exited", "restarting", "unhealthy"])
    def test_agrees_with_inspect(self, state: State) -> None:
        """What the list tells of a container is what its inspect document tells."""
        from_list, from_inspect = container_summary(summary_of(state)), info(state)
        for field in ("id", "name", "service", "status", "running", "exit_code", "ports"):
            assert getattr(from_list, field) == getattr(from_inspect, field), field
        assert (from_list.health, from_list.addresses) == (
            from_inspect.health,
            from_inspect.addresses,
        )

    def test_what_the_list_does_not_say(self) -> None:
        """No start time, and an OOM kill is only an exit code of 137 there."""
        from_list = container_summary(summary_of("oom-killed"))
        assert (from_list.status, from_list.exit_code) == ("exited", 137)
        assert (from_list.started_at, from_list.oom_killed) == (None, False)

    def test_compose_labels(self) -> None:
        """compose's labels give the config hash that ``config --hash`` prints and the image
        it was made from."""
        made = {c.service: c for c in map(container_summary, listed()) if c.status == "created"}
        assert set(made) == {"database", "engine"}
        assert {s: c.config_hash for s, c in made.items()} == config_hashes()
        assert made["engine"].image_id is not None
        assert made["engine"].image_id.startswith("sha256:")
        assert not made["engine"].running


class TestDependencies:
    @pytest.mark.parametrize(
        ("declared", "expected"),
        [
            (None, ()),
            (["db", "cache"], (Dependency("db"), Dependency("cache"))),
            (
                {
                    "db": {"condition": "service_healthy", "required": True, "restart": True},
                    "init": {"condition": "service_completed_successfully"},
                    "cache": {"condition": "service_started", "required": False},
                },
                (
                    Dependency("db", "service_healthy"),
                    Dependency("init", "service_completed_successfully"),
                    Dependency("cache", "service_started", required=False),
                ),
            ),
        ],
    )
    def test_short_and_long_forms(self, declared: object, expected: tuple[Dependency, ...]) -> None:
        """A service's depends_on as a list, or as compose config writes it: a mapping of
        service to condition, required and restart."""
        assert dependencies(declared) == expected


class ListingClient:
    """Just the docker SDK's low-level list, answering with the recorded list."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.api = self
        self.documents = documents
        self.filters: list[Any] = []

    def containers(self, all: bool, filters: Any) -> list[dict[str, Any]]:
        assert all
        self.filters.append(filters)
        return self.documents


async def test_summaries_filter_by_project_and_leave_out_one_off_containers(
    tmp_path: Path,
) -> None:
    """One list call for the project; a `docker compose run` container is no service's."""
    one_off = json.loads(json.dumps(summary_of("running")))
    one_off["Id"] = "one-off"
    one_off["Labels"]["com.docker.compose.oneoff"] = "True"
    client = ListingClient([*listed(), one_off])
    docker = Docker(
        compose_file=tmp_path / "compose.yml",
        project_dir=tmp_path,
        project_name="mo-record",
        client=client,
    )
    found = await docker.summaries({"engine", "database"})
    assert "one-off" not in {c.id for c in found}
    assert {c.service for c in found} == {"engine", "database"}
    assert len(found) == len([c for c in listed() if c["Labels"]["com.docker.compose.service"]
                              in {"engine", "database"}])  # fmt: skip
    assert client.filters == [{"label": ["com.docker.compose.project=mo-record"]}]


# --- _parse_time ----------------------------------------------------------------------------


class TestParseTime:
    @pytest.mark.parametrize("state", ["running", "exited", "oom-killed", "restarting"])
    def test_recorded_start_times(self, state: State) -> None:
        """Docker's nanoseconds (trailing zeros trimmed) are cut to microseconds, in UTC."""
        value = inspect_document(state)["State"]["StartedAt"]
        whole, _, rest = value.rstrip("Z").partition(".")
        expected = datetime.fromisoformat(whole).replace(
            microsecond=int(rest[:6].ljust(6, "0")), tzinfo=UTC
        )
        assert _parse_time(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            # Go's RFC 3339 drops an all-zero fraction, point and all.
            ("2026-11-30T06:43:16Z", datetime(2026, 11, 30, 6, 43, 16, tzinfo=UTC)),
            ("2026-11-30T06:43:16.5Z", datetime(2026, 11, 30, 6, 43, 16, 500000, tzinfo=UTC)),
            (
                "2026-11-30T06:43:16.123456789+02:00",
                datetime(2026, 11, 30, 6, 43, 16, 123456, tzinfo=timezone(timedelta(hours=2))),
            ),
            (
                "2026-11-30T06:43:16.5-05:00",
                datetime(2026, 11, 30, 6, 43, 16, 500000, tzinfo=timezone(timedelta(hours=-5))),
            ),
        ],
    )
    def test_spellings(self, value: str, expected: datetime) -> None:
        """Whole seconds, short fractions and offsets other than Z all parse."""
        assert _parse_time(value) == expected

    @pytest.mark.parametrize("value", [None, "", "0001-01-01T00:00:00Z", "yesterday"])
    def test_no_time(self, value: str | None) -> None:
        """Docker's zero time (never finished, never started), nothing, or nonsense: None."""
        assert _parse_time(value) is None

    def test_zero_time_as_recorded(self) -> None:
        """A running container's FinishedAt is docker's zero time."""
        assert _parse_time(inspect_document("running")["State"]["FinishedAt"]) is None


# --- EventSubscription ----------------------------------------------------------------------


class ClosableStream:
    """An event stream that records being closed, and blocks until told to go on."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.items
        self.closed.wait(10)

    def close(self) -> None:
        self.closed.set()


async def drain(subscription: EventSubscription, count: int) -> list[ContainerEvent]:
    return [await asyncio.wait_for(subscription.next(), 5) for _ in range(count)]


class TestEventSubscription:
    async def test_recorded_events(self) -> None:
        """Each docker event becomes the container, its service, the action and exit code."""
        recorded = events()
        first, second = recorded[0]["Actor"]["ID"], recorded[-1]["Actor"]["ID"]
        subscription = EventSubscription(recorded, asyncio.get_running_loop())
        seen = await drain(subscription, len(recorded))
        assert [(e.container_id, e.action, e.exit_code) for e in seen] == [
            (first, "create", None),
            (first, "start", None),
            (first, "kill", None),
            (first, "die", 0),
            (first, "stop", None),
            (first, "destroy", None),
            (second, "create", None),
            (second, "start", None),
            (second, "die", 1),
            (second, "destroy", None),
        ]
        assert {e.service for e in seen} == {"engine"}

    async def test_end_of_stream_is_an_error(self) -> None:
        """A stream that ends (docker restarted, socket closed) is reported, not waited on."""
        subscription = EventSubscription(events()[:1], asyncio.get_running_loop())
        await drain(subscription, 1)
        with pytest.raises(DockerError, match=r"docker event stream broke: .*stream ended"):
            await asyncio.wait_for(subscription.next(), 5)

    async def test_a_broken_stream_says_why(self) -> None:
        """Whatever the socket raised reaches the reader as a DockerError."""

        def broken() -> Iterator[dict[str, Any]]:
            yield events()[0]
            raise ConnectionResetError("connection reset by peer")

        subscription = EventSubscription(broken(), asyncio.get_running_loop())
        await drain(subscription, 1)
        with pytest.raises(DockerError, match="connection reset by peer"):
            await asyncio.wait_for(subscription.next(), 5)

    async def test_until_all(self) -> None:
        """until_all returns once each container has had an event, whatever came between."""
        recorded = [e for e in events() if e["Action"] == "die"]
        ids = [e["Actor"]["ID"] for e in recorded]
        stream = ClosableStream(recorded)
        subscription = EventSubscription(stream, asyncio.get_running_loop())
        await asyncio.wait_for(subscription.until_all(reversed(ids)), 5)
        subscription.close()
        assert stream.closed.is_set()

    async def test_until_all_waits_for_the_last(self) -> None:
        """An event for one of two containers is not enough."""
        die = next(e for e in events() if e["Action"] == "die")
        subscription = EventSubscription(ClosableStream([die]), asyncio.get_running_loop())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(subscription.until_all([die["Actor"]["ID"], "other"]), 0.3)
        subscription.close()

    async def test_fields_of_older_engines_and_odd_codes(self) -> None:
        """Old engines' "id"/"status" are read; an exit code that is no number is None."""
        die = next(e for e in events() if e["Action"] == "die")
        old = {"id": die["id"], "status": die["status"]}
        odd = {**die, "Actor": {**die["Actor"], "Attributes": {"exitCode": "-1"}}}
        subscription = EventSubscription([old, odd], asyncio.get_running_loop())
        assert await drain(subscription, 2) == [
            ContainerEvent(die["id"], "", "die", None),
            ContainerEvent(die["id"], "", "die", None),
        ]


# --- environments ---------------------------------------------------------------------------

ENVIRON = {
    "PATH": "/usr/bin",
    "MODEL_PATH": "org/tiny",
    "ORCHESTRATOR_API_KEYS": "key-1",
    "ORCHESTRATOR_PORT": "8080",
    "MY_ORCHESTRATOR_NOTE": "kept",
    "HF_TOKEN": "hf-secret",
    "HUGGING_FACE_HUB_TOKEN": "hf-secret-2",
    "COMPOSE_FILE": "other.yml",
    "COMPOSE_PROFILES": "all",
    "COMPOSE_PROJECT_NAME": "other",
    "COMPOSE_ENV_FILES": ".env.other",
    "COMPOSE_HTTP_TIMEOUT": "120",
}


def test_user_environment_drops_the_daemons_settings() -> None:
    """The user's files are read with every variable but the daemon's own."""
    assert user_environment(ENVIRON) == {
        name: value for name, value in ENVIRON.items() if not name.startswith("ORCHESTRATOR_")
    }


def test_runtime_environment_drops_secrets_and_steering() -> None:
    """The daemon's copy runs without Hub tokens or variables that would steer compose."""
    assert runtime_environment(ENVIRON) == {
        "PATH": "/usr/bin",
        "MODEL_PATH": "org/tiny",
        "MY_ORCHESTRATOR_NOTE": "kept",
        "COMPOSE_HTTP_TIMEOUT": "120",
    }


# --- the compose CLI ------------------------------------------------------------------------

FAKE_COMPOSE = """\
#!{python}
# A stand-in for `docker compose`: records its arguments and environment, then does
# what FAKE_* in its environment (or the file next to it) says.
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as calls:
    calls.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
with open(os.path.join(here, "pid"), "w") as pid:
    pid.write(str(os.getpid()))
plan = json.load(open(os.path.join(here, "plan.json"))) if os.path.exists(
    os.path.join(here, "plan.json")) else {{}}
time.sleep(plan.get("sleep", 0))
sys.stderr.write("".join(line + "\\n" for line in plan.get("stderr", [])))
print(plan["stdout"] if "stdout" in plan else json.dumps(sys.argv[1:]))
sys.exit(plan.get("exit", 0))
"""


@pytest.fixture
def fake_compose(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "compose"
    script.parent.mkdir()
    script.write_text(FAKE_COMPOSE.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def plan(fake_compose: Path, **what: object) -> None:
    (fake_compose.parent / "plan.json").write_text(json.dumps(what))


def calls(fake_compose: Path) -> list[dict[str, Any]]:
    lines = (fake_compose.parent / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def docker(tmp_path: Path, fake_compose: Path) -> Docker:
    return Docker(
        compose_file=tmp_path / "state" / "compose.yml",
        project_dir=tmp_path / "project",
        project_name="mo-test",
        compose_cli=[str(fake_compose)],
        environment={"PATH": "/usr/bin", "MODEL_PATH": "org/tiny"},
    )


class TestCompose:
    async def test_lifecycle_argv(self, docker: Docker, fake_compose: Path, tmp_path: Path) -> None:
        """Each lifecycle call is one argv: project, folder and file, then profile and services."""
        candidate = tmp_path / "candidate.yml"
        await docker.up("alpha", ["engine-alpha", "sidecar"])
        await docker.create(["alpha", "beta"], ["engine-alpha", "engine-beta"])
        await docker.validate(["alpha", "beta"], compose_file=candidate)
        project = ["--project-name", "mo-test", "--project-directory", str(tmp_path / "project")]
        ours = [*project, "--file", str(tmp_path / "state" / "compose.yml")]
        assert [call["argv"] for call in calls(fake_compose)] == [
            [*ours, "--profile", "alpha", "up", "--detach", "engine-alpha", "sidecar"],
            [*ours, "--profile", "alpha", "--profile", "beta", "up", "--no-start", "--no-deps",
             "--force-recreate", "engine-alpha", "engine-beta"],
            [*project, "--file", str(candidate), "--profile", "alpha", "--profile", "beta",
             "config", "--quiet"],
        ]  # fmt: skip

    async def test_blueprints_are_read_once_per_version_of_the_file(
        self, docker: Docker, fake_compose: Path, tmp_path: Path
    ) -> None:
        """compose's config hashes, with each service's image (compose's name for a built
        one), read again only once the daemon's copy has changed."""
        copy = tmp_path / "state" / "compose.yml"
        copy.parent.mkdir()
        copy.write_text(
            "services:\n  engine-alpha: {image: 'vllm/vllm-openai:v0.11.0'}\n"
            "  sidecar:\n    build: ./sidecar\n"
            "    depends_on: {engine-alpha: {condition: service_started, required: true}}\n"
        )
        plan(fake_compose, stdout="engine-alpha 1111\nsidecar 2222\n")
        assert docker.known_blueprints() is None
        expected = {
            "engine-alpha": Blueprint("1111", "vllm/vllm-openai:v0.11.0"),
            "sidecar": Blueprint("2222", "mo-test-sidecar", (Dependency("engine-alpha"),)),
        }
        assert await docker.blueprints() == expected
        assert await docker.blueprints() == expected
        assert docker.known_blueprints() == expected
        argv = [call["argv"] for call in calls(fake_compose)]
        assert argv == [[*argv[0][:6], "--profile", "*", "config", "--hash", "*"]]
        copy.write_text("services:\n  engine-alpha: {image: 'other:1'}\n")
        assert docker.known_blueprints() is None  # a new version: no compose call for that
        plan(fake_compose, stdout="engine-alpha 3333\n")
        assert await docker.blueprints() == {"engine-alpha": Blueprint("3333", "other:1")}
        assert len(calls(fake_compose)) == 2

    async def test_compose_returns_stdout(self, docker: Docker) -> None:
        """compose() hands back what compose printed."""
        printed = await docker.compose("ps", "--format", "json")
        assert json.loads(printed)[-3:] == ["ps", "--format", "json"]

    async def test_compose_runs_with_the_given_environment_only(
        self, docker: Docker, fake_compose: Path
    ) -> None:
        """Compose sees the environment the daemon gives it, not the daemon's own."""
        await docker.up("alpha", ["engine-alpha"])
        (call,) = calls(fake_compose)
        assert {k: v for k, v in call["env"].items() if k != "LC_CTYPE"} == {
            "PATH": "/usr/bin",
            "MODEL_PATH": "org/tiny",
        }

    async def test_failure_names_the_call_and_compose_words(
        self, docker: Docker, fake_compose: Path
    ) -> None:
        """A failure names the call, the exit code and compose's last 8 lines, not warnings."""
        warning = 'time="2026-11-30T06:43:16Z" level=warning msg="orphan containers"'
        stderr = [f"error line {n}" for n in range(1, 7)] + [warning]
        stderr += [f"error line {n}" for n in range(7, 11)]
        plan(fake_compose, exit=17, stderr=stderr)
        with pytest.raises(DockerError) as caught:
            await docker.up("alpha", ["engine-alpha"])
        words = " | ".join(f"error line {n}" for n in range(3, 11))
        assert caught.value.message == (
            f"docker compose up --detach engine-alpha failed (exit 17): {words}"
        )

    async def test_missing_cli(self, tmp_path: Path) -> None:
        """A compose CLI that is not there is named in the error."""
        missing = str(tmp_path / "no-such-compose")
        with pytest.raises(DockerError, match=f"the compose CLI '{missing}' is not installed"):
            await run_compose([missing, "config"], None, 10, "config")

    async def test_time_limit(self, fake_compose: Path) -> None:
        """A call past its time limit is killed and reported as timed out."""
        plan(fake_compose, sleep=30)
        with pytest.raises(DockerError, match=r"^docker compose up --detach x timed out$"):
            await run_compose([str(fake_compose)], None, 0.5, "up --detach x")
        pid = int((fake_compose.parent / "pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    async def test_cancelled_call_kills_compose(self, fake_compose: Path) -> None:
        """A call cancelled (a start called off) does not leave compose running."""
        plan(fake_compose, sleep=30)
        call = asyncio.create_task(run_compose([str(fake_compose)], None, 60, "up"))
        pid_file = fake_compose.parent / "pid"
        await eventually(pid_file.exists, what="compose started")
        call.cancel()
        done, _ = await asyncio.wait({call}, timeout=5)  # compose would sleep for 30 s
        assert call in done and call.cancelled()
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


# --- SharedLog and LogFollower --------------------------------------------------------------


class LiveLog:
    """docker's followed log stream: chunks as the test hands them over, until closed."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self.chunks.get()) is not None:
            yield chunk

    def close(self) -> None:
        self.closed = True
        self.chunks.put(None)


class LogClient:
    """The slice of the SDK client SharedLog uses: ``client.api.logs``."""

    def __init__(self, backlog: list[str]) -> None:
        self.api = self
        self.backlog = backlog
        self.calls: list[dict[str, Any]] = []
        self.streams: list[LiveLog] = []

    def logs(self, container_id: str, **options: Any) -> bytes | LiveLog:
        self.calls.append({"container": container_id, **options})
        if not options.get("stream"):
            return "".join(line + "\n" for line in self.backlog).encode()
        self.streams.append(LiveLog())
        return self.streams[-1]


def later(line: str, seconds: int, text: str) -> str:
    """A log line ``seconds`` after the recorded ``line``, in docker's timestamp format."""
    stamp = line.split(" ", 1)[0]
    moved = datetime.fromisoformat(stamp[:19]) + timedelta(seconds=seconds)
    return f"{moved.isoformat()}{stamp[19:]} {text}"


async def next_line(lines: AsyncIterator[str]) -> str:
    return await asyncio.wait_for(anext(lines), 5)


@pytest.fixture
def recorded_log() -> list[str]:
    lines = log_lines()
    # The whole backlog was written in one second: docker's `since` (whole seconds) sends
    # it all again at the start of the followed stream.
    assert len({line[:19] for line in lines}) == 1
    return lines


def log_docker(tmp_path: Path, client: LogClient, max_followers: int = 64) -> Docker:
    return Docker(
        compose_file=tmp_path / "compose.yml",
        project_dir=tmp_path,
        project_name="mo-test",
        client=client,
        max_log_followers=max_followers,
    )


class TestLogs:
    async def test_tail_then_live_lines_without_duplicates(
        self, tmp_path: Path, recorded_log: list[str]
    ) -> None:
        """A follower gets its tail, then each new line once and whole, however docker cuts it."""
        client = LogClient(recorded_log)
        docker = log_docker(tmp_path, client)
        follower = docker.follow_logs("cid", tail=3)
        lines = follower.lines()
        texts = [line.split(" ", 1)[1] for line in recorded_log]
        assert [await next_line(lines) for _ in range(3)] == texts[-3:]
        await eventually(lambda: len(client.streams) == 1, what="the followed stream opened")
        (live,) = client.streams
        new = [
            later(recorded_log[-1], 1, 'INFO: 172.17.0.1:41234 - "GET /health HTTP/1.1" 200 OK'),
            later(recorded_log[-1], 2, 'INFO: 172.17.0.1:41236 - "GET /v1/models HTTP/1.1" 200 OK'),
        ]
        replayed = "".join(line + "\n" for line in recorded_log).encode()
        fresh = "".join(line + "\n" for line in new).encode()
        for chunk in (replayed, fresh[:10], fresh[10:50], fresh[50:]):
            live.chunks.put(chunk)
        assert [await next_line(lines) for _ in range(2)] == [line.split(" ", 1)[1] for line in new]
        stamp = datetime.fromisoformat(recorded_log[-1][:19]).replace(tzinfo=UTC)
        assert client.calls == [
            {"container": "cid", "tail": LOG_RING, "timestamps": True},
            {
                "container": "cid",
                "stream": True,
                "follow": True,
                "timestamps": True,
                "since": int(stamp.timestamp()),
            },
        ]
        follower.close()
        assert live.closed

    async def test_followers_share_one_stream_up_to_the_limit(
        self, tmp_path: Path, recorded_log: list[str]
    ) -> None:
        """Followers share one docker stream; past the limit TooManyStreams, until one leaves."""
        client = LogClient(recorded_log)
        docker = log_docker(tmp_path, client, max_followers=2)
        first, second = docker.follow_logs("cid", tail=1), docker.follow_logs("cid", tail=2)
        with pytest.raises(TooManyStreams) as refused:
            docker.follow_logs("cid", tail=1)
        assert refused.value.headers() == {"Retry-After": "5"}
        ones, twos = first.lines(), second.lines()
        assert await next_line(ones) == recorded_log[-1].split(" ", 1)[1]
        assert [await next_line(twos) for _ in range(2)] == [
            line.split(" ", 1)[1] for line in recorded_log[-2:]
        ]
        await eventually(lambda: len(client.streams) == 1, what="the followed stream opened")
        client.streams[0].chunks.put((later(recorded_log[-1], 1, "INFO: both") + "\n").encode())
        assert (await next_line(ones), await next_line(twos)) == ("INFO: both", "INFO: both")
        assert len(client.calls) == 2  # one backlog read, one followed stream
        first.close()
        third = docker.follow_logs("cid", tail=0)
        assert isinstance(third, LogFollower)
        third.close()
        assert not client.streams[0].closed
        second.close()
        assert client.streams[0].closed

    async def test_the_last_follower_leaving_ends_the_stream(
        self, tmp_path: Path, recorded_log: list[str]
    ) -> None:
        """With nobody following, docker's stream is closed; a later follower opens a new one."""
        client = LogClient(recorded_log)
        docker = log_docker(tmp_path, client)
        follower = docker.follow_logs("cid", tail=1)
        lines = follower.lines()
        await next_line(lines)
        await eventually(lambda: len(client.streams) == 1, what="the followed stream opened")
        follower.close()
        assert client.streams[0].closed
        again = docker.follow_logs("cid", tail=1)
        more = again.lines()
        assert await next_line(more) == recorded_log[-1].split(" ", 1)[1]
        await eventually(lambda: len(client.streams) == 2, what="a second stream opened")
        again.close()

    async def test_followers_end_with_the_container(
        self, tmp_path: Path, recorded_log: list[str]
    ) -> None:
        """When docker ends the stream, followers get the lines left (even unended), then stop."""
        client = LogClient(recorded_log)
        docker = log_docker(tmp_path, client)
        lines = docker.follow_logs("cid", tail=0).lines()
        reading = asyncio.ensure_future(next_line(lines))
        await eventually(lambda: len(client.streams) == 1, what="the followed stream opened")
        live = client.streams[0]
        live.chunks.put((later(recorded_log[-1], 1, "INFO: Shutting down") + "\n").encode())
        assert await reading == "INFO: Shutting down"
        live.chunks.put(later(recorded_log[-1], 2, "last words, no newline").encode())
        live.chunks.put(None)
        assert await next_line(lines) == "last words, no newline"
        with pytest.raises(StopAsyncIteration):
            await next_line(lines)

    async def test_a_late_follower_gets_its_tail_once(
        self, tmp_path: Path, recorded_log: list[str]
    ) -> None:
        """A follower that joins while lines arrive takes them in its tail, not twice."""
        client = LogClient(recorded_log)
        docker = log_docker(tmp_path, client)
        early = docker.follow_logs("cid", tail=0)
        early_lines = early.lines()
        reading = asyncio.ensure_future(next_line(early_lines))
        await eventually(lambda: len(client.streams) == 1, what="the followed stream opened")
        live = client.streams[0]
        late = docker.follow_logs("cid", tail=2)  # following, not yet reading
        live.chunks.put((later(recorded_log[-1], 1, "INFO: one") + "\n").encode())
        assert await reading == "INFO: one"
        late_lines = late.lines()
        tail = [await next_line(late_lines) for _ in range(2)]
        assert tail == [recorded_log[-1].split(" ", 1)[1], "INFO: one"]
        live.chunks.put((later(recorded_log[-1], 2, "INFO: two") + "\n").encode())
        assert await next_line(late_lines) == "INFO: two"
        early.close()
        late.close()
