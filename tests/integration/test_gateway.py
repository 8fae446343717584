"""The /v1 gateway with the real openai client, the real daemon and stand-in engines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.rig import Rig
from tests.waiting import eventually

pytestmark = pytest.mark.integration

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


def client(rig: Rig, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{rig.url}/v1", api_key=key, max_retries=0, timeout=120)


async def get(http: aiohttp.ClientSession, rig: Rig, path: str) -> dict[str, Any]:
    async with http.get(rig.url + path) as response:
        return dict(await response.json())


def error_body(err: openai.APIStatusError) -> dict[str, Any]:
    """The error object of an OpenAI-style answer, as the client parsed it."""
    assert isinstance(err.body, dict), err.body
    return err.body


async def switches(http: aiohttp.ClientSession, rig: Rig) -> list[dict[str, Any]]:
    done = (await get(http, rig, "/switches"))["switches"]
    return [s for s in done if s["kind"] == "switch" and s["outcome"] == "ok"]


async def test_chat_request_switches_on_demand(rig: Rig, http: aiohttp.ClientSession) -> None:
    """A request for an unloaded model waits for the switch and is answered by that model."""
    rig.start_daemon()
    llm = client(rig)
    listed = await llm.models.list()
    ids = {model.id for model in listed.data}
    assert {"alpha", "beta"} <= ids
    assert not any(getattr(m, "loaded", False) for m in listed.data)

    answer = await llm.chat.completions.create(model="alpha", messages=HELLO, max_tokens=5)
    assert answer.model == "alpha"
    assert answer.choices[0].message.content == "echo: hello there tok3 tok4"
    assert (await get(http, rig, "/status"))["active"] == "alpha"

    answer = await llm.chat.completions.create(model="beta", messages=HELLO, max_tokens=3)
    assert answer.model == "beta"
    assert rig.model_containers() == ["engine-beta"]
    loaded = {m.id: getattr(m, "loaded", None) for m in (await llm.models.list()).data}
    assert loaded["beta"] is True and loaded["alpha"] is False

    with pytest.raises(openai.NotFoundError) as missing:
        await llm.chat.completions.create(model="gamma", messages=HELLO)
    assert error_body(missing.value)["code"] == "model_not_found"
    with pytest.raises(openai.ConflictError) as uncached:
        await llm.chat.completions.create(model="nocache", messages=HELLO)
    assert "org/not-downloaded" in uncached.value.message
    assert rig.model_containers() == ["engine-beta"]

    async with http.get(f"{rig.url}/metrics") as response:
        metrics = await response.text()
    assert 'orchestrator_gateway_requests_total{code="200",model="alpha"} 1.0' in metrics
    assert 'orchestrator_gateway_requests_total{code="409",model="nocache"} 1.0' in metrics
    assert 'orchestrator_gateway_request_duration_seconds_count{model="beta"} 1.0' in metrics


async def test_stream_under_way_completes_before_the_swap(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A switch that arrives mid-stream waits for the stream's end, then swaps."""
    rig.start_daemon()
    llm = client(rig)
    await llm.chat.completions.create(model="alpha", messages=HELLO, max_tokens=1)
    stream = await llm.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=120, stream=True
    )
    pieces: list[str] = []
    finish: str | None = None
    switch_sent_at = 0.0
    async for chunk in stream:
        if not chunk.choices:
            continue
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
        if len(pieces) == 5:
            async with http.post(
                f"{rig.url}/switch", json={"model": "beta", "wait": False}
            ) as response:
                assert response.status == 202
                poll = response.headers["Location"]
            switch_sent_at = time.monotonic()
            assert rig.model_containers() == ["engine-alpha"]
    stream_ended_at = time.monotonic()
    assert finish == "stop"
    assert "".join(pieces).split()[-1] == "tok119"
    record: dict[str, Any] = {}

    async def switch_finished() -> bool:
        record.update((await get(http, rig, poll))["switch"])
        return record["outcome"] not in {"running", "pending"}

    await eventually(switch_finished, within=20, interval=0.1)
    assert record["outcome"] == "ok", record
    assert record["timings"]["drain"] >= (stream_ended_at - switch_sent_at) - 0.3
    assert "cut_off" not in record["timings"]
    assert rig.model_containers() == ["engine-beta"]


async def test_two_clients_alternating_share_the_swaps(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Two clients asking for opposite models in turn are grouped: five swaps, not eight."""
    rig.start_daemon()
    llm = client(rig)

    async def alternate(models: list[str]) -> list[str]:
        served = []
        for model in models:
            answer = await llm.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
            served.append(answer.model)
        return served

    first, second = ["alpha", "beta"] * 2, ["beta", "alpha"] * 2
    results = await asyncio.gather(alternate(first), alternate(second))
    assert list(results) == [first, second]
    swaps = await switches(http, rig)
    assert len(swaps) <= 5, [(s["from"], s["to"]) for s in swaps]


async def test_idle_model_is_unloaded_after_ttl(rig: Rig, http: aiohttp.ClientSession) -> None:
    """With a ttl, a model with no requests is stopped and the GPU freed."""
    rig.start_daemon(env={"ORCHESTRATOR_TTL": "1.5"})
    llm = client(rig)
    await llm.chat.completions.create(model="alpha", messages=HELLO, max_tokens=1)
    assert rig.model_containers() == ["engine-alpha"]

    async def idle() -> bool:
        status = await get(http, rig, "/status")
        return bool(status["state"] == "idle" and status["active"] is None)

    await eventually(idle, within=10, interval=0.1)
    # docker's clean-up runs behind the engine's exit
    await eventually(lambda: rig.model_containers() == [], within=5, interval=0.1)


async def test_api_keys(rig: Rig, http: aiohttp.ClientSession) -> None:
    """/v1 and every change need a key; probes and reads stay open; errors are OpenAI's."""
    rig.start_daemon(env={"ORCHESTRATOR_API_KEYS": "key-one,key-two"})
    async with http.get(f"{rig.url}/v1/models") as response:
        assert response.status == 401
        unauthenticated = await response.json()
    assert unauthenticated["error"]["type"] == "authentication_error"
    assert set(unauthenticated["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await client(rig, key="wrong").models.list()
    assert error_body(denied.value)["type"] == "permission_error"
    assert "wrong" not in rig.daemon_log()
    listed = await client(rig, key="key-two").models.list()
    assert listed.data

    async with http.post(f"{rig.url}/switch", json={"model": "alpha"}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    async with http.post(
        f"{rig.url}/stop", headers={"x-api-key": "key-one"}, json={"wait": True}
    ) as response:
        assert response.status == 200
    async with http.get(f"{rig.url}/health") as response:
        assert response.status == 503  # answered, not refused
    async with http.get(f"{rig.url}/health/live") as response:
        assert response.status == 200
    async with http.get(f"{rig.url}/status") as response:
        assert response.status == 200


async def test_queue_bound_answers_429(rig: Rig, http: aiohttp.ClientSession) -> None:
    """Past the concurrency limit requests queue; past the queue bound they get 429."""
    config = rig.root / "gateway-limits.yml"
    config.write_text("max_queue: 1\nmodels:\n  alpha: {max_concurrency: 1}\n")
    rig.start_daemon("--config", str(config))
    llm = client(rig)
    await llm.chat.completions.create(model="alpha", messages=HELLO, max_tokens=1)

    async def slow() -> str | None:
        # Streamed: the stand-in spaces streamed tokens 10 ms apart, so this takes ~0.6 s.
        stream = await llm.chat.completions.create(
            model="alpha", messages=HELLO, max_tokens=60, stream=True
        )
        finish = None
        async for chunk in stream:
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        return finish

    async def gateway_holds(in_flight: int, waiting: int) -> bool:
        gateway = (await get(http, rig, "/status"))["gateway"]
        return bool(
            gateway["in_flight"].get("alpha", 0) == in_flight
            and gateway["waiting"].get("alpha", 0) == waiting
        )

    running = asyncio.create_task(slow())
    await eventually(lambda: gateway_holds(in_flight=1, waiting=0), interval=0.05)
    queued = asyncio.create_task(slow())
    await eventually(lambda: gateway_holds(in_flight=1, waiting=1), interval=0.05)
    with pytest.raises(openai.RateLimitError) as refused:
        await llm.chat.completions.create(model="alpha", messages=HELLO, max_tokens=1)
    assert refused.value.response.headers["Retry-After"] == "1"
    assert error_body(refused.value)["type"] == "rate_limit_error"
    assert list(await asyncio.gather(running, queued)) == ["stop", "stop"]


async def test_client_that_hangs_up_cancels_its_request(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Closing a stream early ends its request upstream: the lease is back at once."""
    rig.start_daemon()
    llm = client(rig)
    stream = await llm.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=1000, stream=True
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 3:
            break
    gateway = (await get(http, rig, "/status"))["gateway"]
    assert gateway["in_flight"] == {"alpha": 1}
    await stream.close()

    async def nothing_in_flight() -> bool:
        gateway = (await get(http, rig, "/status"))["gateway"]
        return not gateway["in_flight"]

    # Left alone, the stream would run for 10 s more.
    await eventually(nothing_in_flight, within=3, interval=0.1)
