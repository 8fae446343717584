"""Gateway benchmark: /v1 through the daemon against the same stand-in engine reached directly.

Runs the real daemon and one stand-in model on this machine's Docker engine and prints
figures; it asserts nothing. Needs the images from scripts/build-images.sh.

    python -m benchmarks.proxy [--requests 300] [--seconds 5] [--token-delay 0.01]

In one run, against one loaded model, alternating direct and gateway so that drift on
the machine hits both alike:
  latency  non-streaming chat completions (one token), one at a time: p50 and p99 of
           each path, and the gateway's added latency (the difference)
  ttft     time to the first streamed token, one stream at a time
  tokens/s streamed tokens per second over all clients at 1, 16 and 64 concurrent
           clients, each looping 100-token streams for --seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import docker

from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig

COMPOSE = """
services:
  engine-alpha:
    image: {image}
    profiles: ["alpha"]
    ports: ["127.0.0.1::8000"]
    environment: {{STANDIN_LOAD_DELAY: "0.5", STANDIN_TOKEN_DELAY: "{token_delay}"}}
    volumes: ["./models/hub:/root/.cache/huggingface/hub"]
    command: ["--model", "org/alpha"]
"""

CONCURRENCY = (1, 16, 64)
STREAM_TOKENS = 100
TARGETS = {"added_p50_ms": ("<=", 2.0), "throughput_ratio_64": (">=", 0.9)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def one_request(session: aiohttp.ClientSession, base: str) -> float:
    began = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=chat(1, False)) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{base}: HTTP {response.status}")
    return time.perf_counter() - began


async def one_stream(session: aiohttp.ClientSession, base: str, tokens: int) -> tuple[float, int]:
    """Time to the first token, and how many tokens came."""
    began = time.perf_counter()
    first: float | None = None
    count = 0
    async with session.post(f"{base}/v1/chat/completions", json=chat(tokens, True)) as response:
        if response.status != 200:
            raise RuntimeError(f"{base}: HTTP {response.status}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                count += 1
                if first is None:
                    first = time.perf_counter() - began
    return first or 0.0, count


async def throughput(base: str, clients: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds
        began = time.perf_counter()

        async def client() -> int:
            tokens = 0
            while time.perf_counter() < deadline:
                tokens += (await one_stream(session, base, STREAM_TOKENS))[1]
            return tokens

        total = sum(await asyncio.gather(*(client() for _ in range(clients))))
        return total / (time.perf_counter() - began)


async def measure(rig: Rig, requests: int, seconds: float) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{rig.url}/switch", json={"model": "alpha"}) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"switch failed: {body}")
        direct, gateway = body["status"]["upstream"], rig.url
        paths = {"direct": direct, "gateway": gateway}
        for base in paths.values():  # warm both paths' connections
            for _ in range(20):
                await one_request(session, base)
        latency: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(requests):
            for name, base in paths.items():
                latency[name].append(await one_request(session, base))
        ttft: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(max(10, requests // 6)):
            for name, base in paths.items():
                ttft[name].append((await one_stream(session, base, 4))[0])
    rates: dict[str, dict[int, float]] = {name: {} for name in paths}
    for clients in CONCURRENCY:
        for name, base in paths.items():
            rates[name][clients] = await throughput(base, clients, seconds)
    figures: dict[str, Any] = {
        "requests": requests,
        "latency_ms": {
            name: {
                "p50": statistics.median(values) * 1000,
                "p99": percentile(values, 0.99) * 1000,
            }
            for name, values in latency.items()
        },
        "ttft_ms": {name: statistics.median(values) * 1000 for name, values in ttft.items()},
        "tokens_per_s": rates,
    }
    figures["added_p50_ms"] = (
        figures["latency_ms"]["gateway"]["p50"] - figures["latency_ms"]["direct"]["p50"]
    )
    figures["added_p99_ms"] = (
        figures["latency_ms"]["gateway"]["p99"] - figures["latency_ms"]["direct"]["p99"]
    )
    figures["throughput_ratio_64"] = rates["gateway"][64] / rates["direct"][64]
    return figures


def report(figures: dict[str, Any], token_delay: float) -> None:
    lat, ttft = figures["latency_ms"], figures["ttft_ms"]
    print(f"gateway benchmark: stand-in engine, {token_delay * 1000:g} ms between streamed tokens")
    print(
        f"  non-streaming latency ({figures['requests']} each): direct p50 "
        f"{lat['direct']['p50']:.2f} ms p99 {lat['direct']['p99']:.2f} ms; gateway p50 "
        f"{lat['gateway']['p50']:.2f} ms p99 {lat['gateway']['p99']:.2f} ms"
    )
    print(
        f"  added by the gateway : p50 {figures['added_p50_ms']:.2f} ms, "
        f"p99 {figures['added_p99_ms']:.2f} ms"
    )
    print(
        f"  time to first token  : direct {ttft['direct']:.2f} ms, gateway {ttft['gateway']:.2f} ms"
    )
    for clients in CONCURRENCY:
        direct = figures["tokens_per_s"]["direct"][clients]
        gateway = figures["tokens_per_s"]["gateway"][clients]
        print(
            f"  tokens/s, {clients:2} clients : direct {direct:7.0f}, gateway {gateway:7.0f}"
            f" ({gateway / direct:.0%})"
        )
    for key, (sign, target) in TARGETS.items():
        value = figures[key]
        met = value <= target if sign == "<=" else value >= target
        print(f"  target {key} {sign} {target:g}: {value:.3f} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env()
    with TemporaryDirectory(prefix="mo-bench-") as folder:
        root = Path(folder)
        make_snapshot(root / "models" / "hub", "org/alpha")
        (root / "docker-compose.yml").write_text(
            COMPOSE.format(image=STANDIN_IMAGE, token_delay=args.token_delay)
        )
        rig = Rig(root=root, project=f"mo-bench-{uuid.uuid4().hex[:6]}", docker=client)
        try:
            rig.start_daemon("--log-level", "warning")
            figures = asyncio.run(measure(rig, args.requests, args.seconds))
        finally:
            rig.clean()
    report(figures, args.token_delay)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
