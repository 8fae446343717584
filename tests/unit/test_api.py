"""The HTTP API over a switcher driving the fake boundary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient

from orchestrator.api import HealthAnswers
from orchestrator.daemon import Daemon
from orchestrator.states import State, Status
from orchestrator.switcher import Switcher
from tests.fakes import Behaviour, FakeRuntime, daemon_of, spec
from tests.waiting import eventually

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def daemon(tmp_path: Path, runtime: FakeRuntime) -> AsyncIterator[Daemon]:
    async with daemon_of(tmp_path, runtime, "alpha", "beta", "nocache") as made:
        yield made


@pytest.fixture
def switcher(daemon: Daemon) -> Switcher:
    return daemon.switcher


@pytest.fixture
async def client(aiohttp_client: ClientFactory, daemon: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(daemon.app)


async def error_of(response: Any) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"])
    return dict(body["error"])


class TestSwitchEndpoint:
    async def test_switch_waits_and_answers_200_with_status(
        self, client: TestClient[Any, Any]
    ) -> None:
        """POST /switch waits for readiness and returns the switch and the new status."""
        response = await client.post("/switch", json={"model": "alpha"})
        assert response.status == 200
        body = await response.json()
        assert body["switch"]["outcome"] == "ok"
        assert body["switch"]["to"] == "alpha"
        assert body["status"]["state"] == "ready"
        assert body["status"]["active"] == "alpha"

    async def test_seed_field_model_id_is_accepted(self, client: TestClient[Any, Any]) -> None:
        """The seed's {"model_id": ...} body works like {"model": ...}."""
        response = await client.post("/switch", json={"model_id": "beta"})
        assert response.status == 200
        assert (await response.json())["status"]["active"] == "beta"

    async def test_no_wait_answers_202_with_where_to_poll(
        self, client: TestClient[Any, Any]
    ) -> None:
        """wait=false answers 202 at once with a Location that later shows the outcome."""
        response = await client.post("/switch", json={"model": "alpha", "wait": False})
        assert response.status == 202
        location = response.headers["Location"]
        assert location == (await response.json())["poll"]
        for _ in range(100):
            polled = await (await client.get(location)).json()
            if polled["switch"]["outcome"] == "ok":
                break
            await asyncio.sleep(0.02)
        assert polled["switch"]["outcome"] == "ok"

    async def test_failed_switch_is_502_with_log_tail(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """A crashing target answers 502 with its log tail and says it rolled back."""
        await client.post("/switch", json={"model": "alpha"})
        runtime.behaviours["beta"] = Behaviour(crash=True)
        response = await client.post("/switch", json={"model": "beta"})
        assert response.status == 502
        error = await error_of(response)
        assert error["code"] == "model_exited"
        assert error["rolled_back"] is True
        assert "CUDA out of memory" in error["log_tail"]
        status = await (await client.get("/status")).json()
        assert status["active"] == "alpha"
        assert status["last_switch"]["outcome"] == "failed"

    async def test_stop_unloads(self, client: TestClient[Any, Any]) -> None:
        """POST /stop leaves the daemon idle and /health failing."""
        await client.post("/switch", json={"model": "alpha"})
        response = await client.post("/stop", json={})
        assert response.status == 200
        assert (await response.json())["status"]["state"] == "idle"
        assert (await client.get("/health")).status == 503

    async def test_sleep_refuses_a_model_without_a_sleep_level(
        self, client: TestClient[Any, Any]
    ) -> None:
        """POST /sleep on a model with no sleep level: 409 that says what to do instead."""
        await client.post("/switch", json={"model": "alpha"})
        response = await client.post("/sleep", json={})
        assert response.status == 409
        error = await error_of(response)
        assert "sleep: 1 or 2" in error["message"] and "POST /stop" in error["message"]
        assert (await client.get("/health")).status == 200

    async def test_status_shows_residency_and_the_warm_pool(
        self, client: TestClient[Any, Any]
    ) -> None:
        await client.post("/switch", json={"model": "alpha"})
        body = await (await client.get("/status")).json()
        assert {m["id"]: m["residency"] for m in body["models"]} == {
            "alpha": "awake",
            "beta": "stopped",
            "nocache": "stopped",
        }
        assert body["warm_pool"]["asleep"] == [] and body["warm_pool"]["max_asleep"] == 2
        assert body["last_switch"]["path"] == "cold"


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "fragment"),
        [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "JSON object"),
            (b"{}", 'missing "model"'),
            (b'{"model": 5}', "non-empty string"),
            (b'{"model": ""}', "non-empty string"),
            (b'{"model": "alpha", "model_id": "beta"}', "different models"),
            (b'{"model": "alpha", "wait": "no"}', '"wait"'),
        ],
    )
    async def test_bad_bodies_are_400(
        self, client: TestClient[Any, Any], body: bytes, fragment: str
    ) -> None:
        """Each malformed body is a 400 whose message says what is wrong."""
        response = await client.post(
            "/switch", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 400
        error = await error_of(response)
        assert error["code"] == "bad_request"
        assert fragment in error["message"]

    async def test_body_over_64_kib_is_413(self, client: TestClient[Any, Any]) -> None:
        """A body past 64 KiB is refused with 413 and a JSON error."""
        response = await client.post(
            "/switch", data=b"x" * (64 * 1024 + 1), headers={"Content-Type": "application/json"}
        )
        assert response.status == 413
        assert "64 KiB" in (await error_of(response))["message"]

    async def test_a_model_the_daemon_cannot_run_is_409_and_nothing_moves(
        self, client: TestClient[Any, Any], switcher: Switcher, runtime: FakeRuntime
    ) -> None:
        """A model whose command could not be rewritten is refused before anything stops."""
        await client.post("/switch", json={"model": "alpha"})
        switcher.set_models(
            {**switcher.models, "split": replace(spec("split"), unusable="svc-split: why")}
        )
        calls = list(runtime.calls)
        response = await client.post("/switch", json={"model": "split"})
        assert response.status == 409
        error = await error_of(response)
        assert error["code"] == "model_unusable"
        assert "svc-split: why" in error["message"] and "check" in error["message"]
        assert runtime.calls == calls
        assert switcher.status.active == "alpha"

    async def test_unknown_model_is_404(self, client: TestClient[Any, Any]) -> None:
        """A model id outside the known set is a 404 naming the known ones."""
        response = await client.post("/switch", json={"model": "a; rm -rf /"})
        assert response.status == 404
        assert "known models" in (await error_of(response))["message"]

    async def test_uncached_model_is_409_and_running_model_stays(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """A cache miss is a 409 naming repo and cache path; the ready model keeps serving."""
        await client.post("/switch", json={"model": "alpha"})
        response = await client.post("/switch", json={"model": "nocache"})
        assert response.status == 409
        error = await error_of(response)
        assert error["repo"] == "org/nocache"
        assert error["cache_path"].endswith("hub")
        assert (await client.get("/health")).status == 200
        assert runtime.calls == [("start", "alpha")]

    async def test_unknown_route_and_method_are_json(self, client: TestClient[Any, Any]) -> None:
        """aiohttp's own 404 and 405 come out in the same JSON error shape."""
        assert (await error_of(await client.get("/nope")))["code"] == "not_found"
        response = await client.get("/switch")
        assert response.status == 405
        await error_of(response)


class TestHealth:
    async def test_health_fails_when_idle_and_passes_when_ready(
        self, client: TestClient[Any, Any]
    ) -> None:
        """/health is 503 with a reason until a model is ready, then 200 pass."""
        response = await client.get("/health")
        assert response.status == 503
        assert response.content_type == "application/health+json"
        assert (await response.json())["status"] == "fail"
        await client.post("/switch", json={"model": "alpha"})
        response = await client.get("/health")
        assert response.status == 200
        assert (await response.json()) == {"status": "pass", "model": "alpha"}

    async def test_health_for_a_named_model(self, client: TestClient[Any, Any]) -> None:
        """/health?model= passes only for the ready model and 404s for unknown ones."""
        await client.post("/switch", json={"model": "alpha"})
        assert (await client.get("/health", params={"model": "alpha"})).status == 200
        other = await client.get("/health", params={"model": "beta"})
        assert other.status == 503
        assert "beta is not loaded" in (await other.json())["output"]
        assert (await client.get("/health", params={"model": "zzz"})).status == 404

    async def test_health_fails_during_a_switch(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """While a switch is under way /health answers 503 at once, not after the switch."""
        await client.post("/switch", json={"model": "alpha"})
        runtime.gate = asyncio.Event()
        pending = asyncio.ensure_future(client.post("/switch", json={"model": "beta"}))
        await asyncio.sleep(0.05)
        response = await client.get("/health")
        assert response.status == 503
        assert "switch is under way" in (await response.json())["output"]
        assert (await client.get("/health/live")).status == 200
        runtime.gate.set()
        assert (await pending).status == 200
        assert (await client.get("/health")).status == 200

    async def test_health_follows_a_hung_engine_and_its_recovery(
        self, client: TestClient[Any, Any], runtime: FakeRuntime
    ) -> None:
        """The answer is kept between changes, and each change of the status shows at once."""
        await client.post("/switch", json={"model": "alpha"})
        response = await client.get("/health")
        assert response.headers["Content-Type"] == "application/health+json; charset=utf-8"
        assert await response.json() == {"status": "pass", "model": "alpha"}
        runtime.behaviours["alpha"] = Behaviour(hang=True)

        async def failing() -> bool:
            answer = await client.get("/health")
            return answer.status == 503 and "not answering" in (await answer.json())["output"]

        await eventually(failing, what="/health failing for the hung engine")
        runtime.behaviours["alpha"] = Behaviour(probes_until_ready=0)

        async def passing() -> bool:
            return (await client.get("/health")).status == 200

        await eventually(passing, what="/health passing once the engine answers again")

    async def test_status_lists_every_model(self, client: TestClient[Any, Any]) -> None:
        """/status names each model with its container, upstream and uptime."""
        await client.post("/switch", json={"model": "alpha"})
        status = await (await client.get("/status")).json()
        by_id = {m["id"]: m for m in status["models"]}
        assert set(by_id) == {"alpha", "beta", "nocache"}
        assert by_id["alpha"]["active"] is True
        assert by_id["alpha"]["upstream"] == "http://fake/alpha"
        assert by_id["alpha"]["display_name"] == "ALPHA"
        assert by_id["beta"]["container"] is None
        assert status["last_switch"]["to"] == "alpha"


class TestModels:
    async def test_models_show_their_cache_verdict(self, client: TestClient[Any, Any]) -> None:
        """GET /models lists every model with its cache verdict and the reason for a miss."""
        body = await (await client.get("/models")).json()
        by_id = {m["id"]: m for m in body["models"]}
        assert by_id["alpha"]["cache"]["status"] == "present"
        assert by_id["nocache"]["cache"]["status"] == "missing"
        assert "org/nocache" in by_id["nocache"]["cache"]["reason"]

    async def test_one_model_and_an_unknown_one(self, client: TestClient[Any, Any]) -> None:
        """GET /models/{id} shows one model; an unknown id is a 404 in the JSON error shape."""
        body = await (await client.get("/models/beta")).json()
        assert body["model"]["id"] == "beta"
        assert body["model"]["cache"]["status"] == "present"
        response = await client.get("/models/zzz")
        assert response.status == 404
        assert (await error_of(response))["code"] == "model_not_found"


@dataclass
class SwitcherView:
    """What /health reads of the switcher, set by hand."""

    status: Status
    switch_under_way: bool = False

    @property
    def serving(self) -> bool:
        status = self.status
        return status.state is State.READY and status.healthy and not self.switch_under_way


class TestHealthAnswers:
    def test_an_accepted_switch_fails_the_answer_before_the_state_moves(self) -> None:
        """The status snapshot stays the same while a switch waits its turn; the queue alone
        turns the answer, and the answer turns back once it is done."""
        view = SwitcherView(Status(state=State.READY, active="alpha", healthy=True))
        health = HealthAnswers(cast(Switcher, view))
        code, body = health.current()
        assert (code, json.loads(body)) == (200, {"status": "pass", "model": "alpha"})
        assert health.current()[1] is body  # rendered once while nothing changes
        view.switch_under_way = True
        code, body = health.current()
        assert code == 503
        assert "a switch is under way" in json.loads(body)["output"]
        view.switch_under_way = False
        assert health.current()[0] == 200

    def test_a_new_status_is_rendered_anew(self) -> None:
        view = SwitcherView(Status(state=State.READY, active="alpha", healthy=True))
        health = HealthAnswers(cast(Switcher, view))
        assert health.current()[0] == 200
        view.status = replace(view.status, state=State.STOPPING, reason="stopping alpha")
        code, body = health.current()
        assert (code, json.loads(body)["state"]) == (503, "stopping")
