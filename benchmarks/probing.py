"""What the benchmarks share: latency percentiles and /health probers in a process of
their own (so that their CPU is not the daemon's)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Deadline:
    """Set once ``seconds`` have passed since it was made: probers run for a fixed time."""

    def __init__(self, seconds: float) -> None:
        self.until = time.perf_counter() + seconds

    def is_set(self) -> bool:
        return time.perf_counter() >= self.until


def probe_for(url: str, probers: int, rate: float, seconds: float, out: Any) -> None:
    """Separate process: ``probe`` for ``seconds``."""
    probe(url, probers, rate, Deadline(seconds), out)


def probe(url: str, probers: int, rate: float | None, done: Any, out: Any) -> None:
    """Separate process: keep-alive probers on ``url`` until ``done`` is set; puts their
    latencies, status codes and span on ``out``.

    With no rate they go as fast as they can (the daemon's saturation). With a rate
    each prober keeps its share of it on a fixed schedule, and latency counts from
    the scheduled send, so a stall shows instead of being skipped over.
    """

    async def run() -> tuple[list[float], dict[int, int], float]:
        latencies: list[float] = []
        codes: dict[int, int] = {}
        connector = aiohttp.TCPConnector(limit=probers)
        began = time.perf_counter()
        async with aiohttp.ClientSession(connector=connector) as session:

            async def prober(number: int) -> None:
                interval = probers / rate if rate else 0.0
                scheduled = time.perf_counter() + interval * number / probers
                while not done.is_set():
                    if rate:
                        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                        began, scheduled = scheduled, scheduled + interval
                    else:
                        began = time.perf_counter()
                    async with session.get(url) as response:
                        await response.read()
                    latencies.append(time.perf_counter() - began)
                    codes[response.status] = codes.get(response.status, 0) + 1

            await asyncio.gather(*(prober(n) for n in range(probers)))
        return latencies, codes, time.perf_counter() - began

    out.put(asyncio.run(run()))
