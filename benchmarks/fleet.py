"""Fleet benchmark: two daemons behind HAProxy against one daemon alone.

Runs real daemons with stand-in engines on this machine's Docker engine (each daemon its
own simulated GPU) and a real HAProxy from ``haproxy-config``; prints figures and
asserts nothing. Needs the images from scripts/build-images.sh and Debian's haproxy.

    python -m benchmarks.fleet [--requests 40] [--load-delay 1.0]

  alternating  two clients, each sending --requests chat completions (one token) that
               alternate between models alpha and beta, one at a time: swaps performed,
               requests per second, p50 and p99 latency; once against one daemon alone
               (which swaps its GPU between the two), once against HAProxy in front of
               two daemons (which end up holding one model each)
  added        with both models loaded, one request at a time straight to the daemon
               holding alpha and through HAProxy, alternating: the latency HAProxy adds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import docker

from benchmarks.probing import percentile
from tests.fleet import Fleet, running_fleet
from tests.rig import Rig

MODELS = ("alpha", "beta")


async def one_request(session: aiohttp.ClientSession, base: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    began = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{base}: HTTP {response.status} for {model}")
    return time.perf_counter() - began


async def swaps(rigs: list[Rig]) -> int:
    """Switches and stops recorded by the daemons (a switch per model change)."""
    total = 0
    async with aiohttp.ClientSession() as session:
        for rig in rigs:
            if rig.processes:
                async with session.get(f"{rig.url}/switches") as answer:
                    total += len((await answer.json())["switches"])
    return total


async def alternating(base: str, rigs: list[Rig], requests: int) -> dict[str, float]:
    """Two clients, each alternating alpha and beta, ``requests`` each."""
    before = await swaps(rigs)
    latencies: list[float] = []

    async def client(first: int) -> None:
        async with aiohttp.ClientSession() as session:
            for number in range(requests):
                model = MODELS[(first + number) % 2]
                latencies.append(await one_request(session, base, model))

    began = time.perf_counter()
    await asyncio.gather(client(0), client(1))
    wall = time.perf_counter() - began
    return {
        "swaps": await swaps(rigs) - before,
        "requests_per_s": 2 * requests / wall,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


async def added_latency(fleet: Fleet, requests: int) -> dict[str, float]:
    """Straight to alpha's daemon against through HAProxy, alternating, one at a time."""
    async with aiohttp.ClientSession() as session:
        holder = None
        for rig in fleet.rigs:
            async with session.get(f"{rig.url}/status") as answer:
                if (await answer.json())["active"] == "alpha":
                    holder = rig
        assert holder is not None, "alpha is loaded nowhere"
        direct: list[float] = []
        through: list[float] = []
        for _ in range(requests):
            direct.append(await one_request(session, holder.url, "alpha"))
            through.append(await one_request(session, fleet.url, "alpha"))
    return {
        "direct_p50_ms": 1000 * statistics.median(direct),
        "haproxy_p50_ms": 1000 * statistics.median(through),
        "added_p50_ms": 1000 * (statistics.median(through) - statistics.median(direct)),
        "added_p99_ms": 1000 * (percentile(through, 0.99) - percentile(direct, 0.99)),
    }


async def measure_fleet(fleet: Fleet, requests: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        # Both models asked for at once, as the clients would: one lands on each daemon.
        await asyncio.gather(*(one_request(session, fleet.url, m) for m in MODELS))
    figures: dict[str, Any] = await alternating(fleet.url, fleet.rigs, requests)
    figures["added"] = await added_latency(fleet, 5 * requests)
    return figures


async def measure_single(rig: Rig, requests: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        await one_request(session, rig.url, "alpha")
    return await alternating(rig.url, [rig], requests)


def report(single: dict[str, Any], fleet: dict[str, Any], requests: int, delay: float) -> None:
    print(
        f"fleet benchmark: stand-in engines ({delay:g} s load), two clients alternating"
        f" alpha and beta, {requests} requests each"
    )
    for name, figures in (("one daemon", single), ("two daemons + HAProxy", fleet)):
        print(
            f"  {name:22}: {figures['swaps']:3} swaps, {figures['requests_per_s']:8.1f} req/s,"
            f" p50 {figures['p50_ms']:8.1f} ms, p99 {figures['p99_ms']:8.1f} ms"
        )
    added = fleet["added"]
    print(
        f"  HAProxy's hop          : p50 {added['direct_p50_ms']:.2f} ms direct,"
        f" {added['haproxy_p50_ms']:.2f} ms through HAProxy: adds {added['added_p50_ms']:.2f} ms"
        f" (p99 {added['added_p99_ms']:.2f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--load-delay", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env()
    delays = {"delay": args.load_delay, "slow_delay": args.load_delay}
    quiet = ("--log-level", "warning")
    with TemporaryDirectory(prefix="mo-bench-") as folder:
        with running_fleet(
            Path(folder) / "one", client, daemons=1, daemon_args=quiet, **delays
        ) as one:
            single = asyncio.run(measure_single(one.rigs[0], args.requests))
        with running_fleet(Path(folder) / "two", client, daemon_args=quiet, **delays) as two:
            fleet = asyncio.run(measure_fleet(two, args.requests))
    report(single, fleet, args.requests, args.load_delay)
    if args.json:
        args.json.write_text(json.dumps({"single": single, "fleet": fleet}, indent=2))


if __name__ == "__main__":
    main()
