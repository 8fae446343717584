"""What people and tools watch: /metrics, /events, model logs, the dashboard's files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from orchestrator import api
from orchestrator.daemon import Daemon
from orchestrator.events import Event
from orchestrator.switcher import Switcher
from tests.fakes import Behaviour, FakeRuntime, daemon_of

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def daemon(tmp_path: Path, runtime: FakeRuntime) -> AsyncIterator[Daemon]:
    async with daemon_of(tmp_path, runtime, "alpha", "beta") as made:
        yield made


@pytest.fixture
def switcher(daemon: Daemon) -> Switcher:
    return daemon.switcher


@pytest.fixture
async def client(aiohttp_client: ClientFactory, daemon: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(daemon.app)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def read_events(response: Any, until: Callable[[str, dict[str, Any]], bool]) -> list[Any]:
    """Server-sent events as (event, data) until one matches, within a few seconds."""
    seen: list[tuple[str, dict[str, Any]]] = []
    event = ""
    async with asyncio.timeout(5):
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                seen.append((event, data))
                if until(event, data):
                    return seen
    return seen


class TestMetrics:
    async def test_switches_state_and_health_age(self, client: TestClient[Any, Any]) -> None:
        """Counters follow switches; gauges describe the present at scrape time."""
        before = await (await client.get("/metrics")).text()
        assert metric(before, 'orchestrator_state{state="idle"}') == 1.0
        assert metric(before, "orchestrator_serving") == 0.0
        assert (metric(before, "orchestrator_seconds_since_health_pass") or 0) >= 0
        assert (await client.post("/switch", json={"model": "alpha"})).status == 200
        response = await client.get("/metrics")
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
        assert metric(text, 'orchestrator_switches_total{operation="switch",outcome="ok"}') == 1
        count = 'orchestrator_switch_duration_seconds_count{operation="switch",outcome="ok"}'
        assert metric(text, count) == 1
        assert metric(text, 'orchestrator_state{state="ready"}') == 1.0
        assert metric(text, 'orchestrator_active_model{model="alpha"}') == 1.0
        assert metric(text, 'orchestrator_active_model{model="beta"}') == 0.0
        assert metric(text, "orchestrator_seconds_since_health_pass") == 0.0

    async def test_failed_switch_counts_as_failed(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """A crash is counted under its outcome, and health age grows while nothing serves."""
        await client.post("/switch", json={"model": "alpha"})
        runtime.behaviours["beta"] = Behaviour(crash=True)
        assert (await client.post("/switch", json={"model": "beta"})).status == 502
        await client.post("/stop", json={})
        await asyncio.sleep(0.2)
        text = await (await client.get("/metrics")).text()
        assert metric(text, 'orchestrator_switches_total{operation="switch",outcome="failed"}') == 1
        assert (metric(text, "orchestrator_seconds_since_health_pass") or 0) >= 0.2


class TestEvents:
    async def test_a_switch_as_events(self, client: TestClient[Any, Any]) -> None:
        """/events starts with the status, then tells the switch step by step."""
        async with client.get("/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            first = await read_events(response, lambda event, _data: event == "status")
            assert first[0][1]["state"] == "idle"
            switching = asyncio.create_task(client.post("/switch", json={"model": "beta"}))
            seen = await read_events(response, lambda event, _data: event == "switch_finished")
            await switching
        kinds = [event for event, _ in seen]
        assert kinds[0] == "switch_requested"
        states = [data["state"] for event, data in seen if event == "state"]
        assert states == ["starting", "ready"]
        finished = seen[-1][1]
        assert (finished["to_model"], finished["outcome"]) == ("beta", "ok")
        ids = [data["id"] for _, data in seen]
        assert ids == sorted(ids)

    async def test_death_is_an_event(
        self, client: TestClient[Any, Any], runtime: FakeRuntime, switcher: Switcher
    ) -> None:
        """A model dying behind the daemon's back is announced."""
        await client.post("/switch", json={"model": "alpha"})
        async with client.get("/events") as response:
            await read_events(response, lambda event, _data: event == "status")
            runtime.kill("alpha")
            seen = await read_events(response, lambda event, _data: event == "model_died")
        assert seen[-1][1]["model"] == "alpha"

    async def test_two_followers_get_the_same_bytes_encoded_once(
        self, client: TestClient[Any, Any], daemon: Daemon
    ) -> None:
        """An event is encoded once for all who follow, in the format each one parses."""
        sent: list[Event] = []
        async with client.get("/events") as first, client.get("/events") as second:
            for response in (first, second):
                await read_events(response, lambda event, _data: event == "status")
            async with daemon.events.subscribe() as queue:
                await client.post("/switch", json={"model": "alpha"})
                while (event := await queue.get()) is not None:
                    sent.append(event)
                    if event.kind == "switch_finished":
                        break
            seen = [
                await read_events(response, lambda event, _data: event == "switch_finished")
                for response in (first, second)
            ]
        assert seen[0] == seen[1]
        assert [data for _, data in seen[0]] == [event.to_json() for event in sent]
        assert all(event.sse is event.sse for event in sent)

    async def test_a_quiet_stream_gets_heartbeats(
        self, client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Nothing happening: a comment now and then keeps proxies from closing the stream."""
        monkeypatch.setattr(api, "SSE_HEARTBEAT", 0.01)
        beats = 0
        async with client.get("/events") as response, asyncio.timeout(5):
            async for raw in response.content:
                beats += raw == b": keep-alive\n"
                if beats == 2:
                    break
        assert beats == 2

    def test_an_event_as_server_sent(self) -> None:
        event = Event("state", {"state": "ready"}, 7, at=1.5)
        expected = (
            b"id: 7\nevent: state\n"
            b'data: {"id": 7, "kind": "state", "at": 1.5, "state": "ready"}\n\n'
        )
        assert event.sse == expected


class TestLogs:
    async def test_tail_and_follow(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """The last lines as JSON; follow streams them and ends when the engine stops."""
        await client.post("/switch", json={"model": "alpha"})
        body = await (await client.get("/models/alpha/logs", params={"tail": "5"})).json()
        assert body["model"] == "alpha" and body["container"].endswith("svc-alpha-1")
        assert body["lines"][-1] == "CUDA out of memory"
        async with client.get(
            "/models/alpha/logs", params={"follow": "true", "tail": "3"}
        ) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            lines = await read_events(
                response, lambda event, data: event == "log" and str(data).endswith("2")
            )
            runtime.kill("alpha")
            rest = await read_events(response, lambda event, _data: event == "end")
        assert [data for event, data in lines if event == "log"][-1].endswith("line 2")
        assert rest[-1][0] == "end"

    async def test_bad_requests(self, client: TestClient[Any, Any]) -> None:
        """Unknown models, bad tails and following a model with no container are refused."""
        assert (await client.get("/models/zz/logs")).status == 404
        response = await client.get("/models/alpha/logs", params={"tail": "0"})
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "tail"
        assert (await client.get("/models/alpha/logs", params={"follow": "maybe"})).status == 400
        response = await client.get("/models/beta/logs", params={"follow": "1"})
        assert response.status == 404
        assert "no container" in (await response.json())["error"]["message"]
        body = await (await client.get("/models/beta/logs")).json()
        assert body == {"model": "beta", "container": None, "lines": []}


async def test_dashboard_files_are_served(client: TestClient[Any, Any]) -> None:
    """/ is the dashboard; its script and style come from the package."""
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    html = await page.text()
    assert "/ui/app.js" in html and "/ui/style.css" in html
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert (await client.get(asset)).status == 200
