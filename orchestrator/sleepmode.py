"""vLLM's sleep mode over HTTP: put an engine to sleep, wake it, ask whether it sleeps.

vLLM (0.11) serves these only with ``VLLM_SERVER_DEV_MODE=1`` and ``--enable-sleep-mode``;
the rewrite adds both to a model with ``sleep`` set. Level 1 moves the weights to host
RAM and frees the KV cache; level 2 drops the weights too, so waking from it reloads them
from disk: wake the weights' memory, ``collective_rpc`` ``reload_weights``, then wake the
KV cache, the sequence vLLM documents for that version.

Every step is confirmed by ``GET /is_sleeping`` rather than trusted from a 200: the
switcher must know the GPU is free before another engine wakes or starts on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from .errors import SleepModeFailed

# Bounds on each step. Offloading a 70 B model's weights to host RAM takes seconds, and
# a wake from level 2 reads them from disk again: generous, but a hung engine is caught.
SLEEP_TIMEOUT = 120.0
WAKE_TIMEOUT = 300.0
# How long an engine has to confirm the state it was asked for once it answered 200.
CONFIRM_TIMEOUT = 10.0
CONFIRM_INTERVAL = 0.02
# What of an engine's error answer comes with ours.
ERROR_TEXT = 300


async def is_sleeping(session: aiohttp.ClientSession, url: str) -> bool | None:
    """Whether the engine sleeps; None when it cannot say (no sleep mode, not answering)."""
    try:
        async with session.get(f"{url}/is_sleeping", allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    value = body.get("is_sleeping") if isinstance(body, dict) else None
    return value if isinstance(value, bool) else None


async def sleep(session: aiohttp.ClientSession, url: str, level: int, model: str) -> None:
    """Put the engine to sleep at ``level`` and return once it says it sleeps."""
    await _post(session, url, "/sleep", model, params={"level": str(level)}, what="sleep")
    await _confirm(session, url, model, asleep=True)


async def wake(session: aiohttp.ClientSession, url: str, level: int, model: str) -> None:
    """Wake the engine and return once it says it is awake; level 2 reloads the weights."""
    if level == 2:
        await _post(session, url, "/wake_up", model, params={"tags": "weights"}, what="wake")
        await _post(
            session,
            url,
            "/collective_rpc",
            model,
            json={"method": "reload_weights"},
            what="reload the weights",
        )
        await _post(session, url, "/wake_up", model, params={"tags": "kv_cache"}, what="wake")
    else:
        await _post(session, url, "/wake_up", model, what="wake")
    await _confirm(session, url, model, asleep=False)


async def warm_up(
    session: aiohttp.ClientSession, url: str, served_name: str, model: str, bound: float
) -> None:
    """One short generation, so that the first user's request does not pay for the first
    inference (kernels chosen and compiled, caches filled)."""
    body = {"model": served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    await _post(session, url, "/v1/completions", model, json=body, what="warm up", bound=bound)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    model: str,
    *,
    what: str,
    params: Mapping[str, str] | None = None,
    json: Any = None,
    bound: float | None = None,
) -> None:
    bound = bound or (SLEEP_TIMEOUT if what == "sleep" else WAKE_TIMEOUT)
    try:
        async with session.post(
            f"{url}{path}",
            params=params,
            json=json,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=bound),
        ) as response:
            text = await response.text(errors="replace")
            if response.status == 200:
                return
    except TimeoutError:
        raise SleepModeFailed(
            f"{model}: the engine did not {what} within {bound:g} s", model=model
        ) from None
    except (aiohttp.ClientError, OSError) as err:
        raise SleepModeFailed(
            f"{model}: could not ask the engine to {what}: {err}", model=model
        ) from None
    hint = (
        " (is VLLM_SERVER_DEV_MODE=1 set and --enable-sleep-mode given?)"
        if response.status == 404
        else ""
    )
    raise SleepModeFailed(
        f"{model}: the engine refused to {what}: HTTP {response.status}{hint}:"
        f" {text[:ERROR_TEXT].strip()}",
        model=model,
        engine_status=response.status,
    )


async def _confirm(session: aiohttp.ClientSession, url: str, model: str, *, asleep: bool) -> None:
    deadline = time.monotonic() + CONFIRM_TIMEOUT
    while True:
        said = await is_sleeping(session, url)
        if said is asleep:
            return
        if time.monotonic() >= deadline:
            wanted = "asleep" if asleep else "awake"
            raise SleepModeFailed(
                f"{model}: the engine did not confirm it is {wanted} within"
                f" {CONFIRM_TIMEOUT:g} s (is_sleeping: {said})",
                model=model,
            )
        await asyncio.sleep(CONFIRM_INTERVAL)
