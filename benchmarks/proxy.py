"""Gateway benchmark: /v1 through the daemon against the same stand-in engine reached directly.

Runs the real daemon and three stand-in models on this machine's Docker engine and
prints figures next to their targets; it asserts nothing. Needs the images from
scripts/build-images.sh.

    python -m benchmarks.proxy [--requests 1000] [--seconds 5] [--token-delay 0.01]
                               [--stream-seconds 20]

Direct and gateway requests alternate, so that drift on the machine hits both alike.
  latency    non-streaming chat completions (one token), one at a time, on "alpha"
             (--token-delay between tokens): p50 and p99 of each path, and what the
             gateway adds
  ttft       time to the first streamed token, one stream at a time, on "alpha" and on
             "beta", whose engine sends its tokens with no delay, so that the figure is
             the gateway's own
  tokens/s   streamed tokens per second over all clients at 1, 16 and 64 concurrent
             clients on "alpha", each looping 100-token streams for --seconds, and at 64
             on "beta"; at 64 clients also the daemon's CPU time per 1,000 tokens
             through the gateway, on each
  one stream the daemon's CPU, in % of one core, while one stream of ~95 tokens/s
             ("gamma", 10.5 ms between tokens) runs through it for --stream-seconds and
             nothing else does; and its CPU idle, for comparison
CPU is the daemon process's user + system time from /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

import aiohttp
import docker

from benchmarks.probing import percentile
from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig

T = TypeVar("T")

ENGINE = """
  engine-{name}:
    image: {image}
    profiles: ["{name}"]
    ports: ["127.0.0.1::8000"]
    environment: {{STANDIN_LOAD_DELAY: "0.5", STANDIN_TOKEN_DELAY: "{token_delay}"}}
    volumes: ["./models/hub:/root/.cache/huggingface/hub"]
    command: ["--model", "org/{name}"]
"""
# alpha: latency and throughput; beta: first-token time with nothing between tokens;
# gamma: one stream at about 95 tokens/s.
NO_DELAY_MODEL, ONE_STREAM_MODEL = "beta", "gamma"
ONE_STREAM_DELAY = 0.0105

CONCURRENCY = (1, 16, 64)
STREAM_TOKENS = 100
IDLE_SECONDS = 10.0
# (figure, comparison, target): what the issue asks of the gateway.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("added_p50_ms", "<=", 2.0),
    ("added_p99_ms", "<=", 1.0),
    ("added_ttft_ms", "<=", 0.3),
    ("one_stream_cpu_percent", "<=", 1.4),
    ("throughput_ratio_64", ">=", 0.9),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def compose(token_delay: float) -> str:
    engines = [
        ("alpha", token_delay),
        (NO_DELAY_MODEL, 0.0),
        (ONE_STREAM_MODEL, ONE_STREAM_DELAY),
    ]
    return "services:" + "".join(
        ENGINE.format(name=name, image=STANDIN_IMAGE, token_delay=delay) for name, delay in engines
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def with_cpu(pid: int, work: Awaitable[T]) -> tuple[T, float, float]:
    """``work``'s result, the CPU seconds ``pid`` used meanwhile, and the wall seconds."""
    cpu, began = cpu_seconds(pid), time.perf_counter()
    result = await work
    return result, cpu_seconds(pid) - cpu, time.perf_counter() - began


def chat(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def one_request(session: aiohttp.ClientSession, base: str, model: str = "alpha") -> float:
    began = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=chat(model, 1, False)) as answer:
        await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{base}: HTTP {answer.status}")
    return time.perf_counter() - began


async def one_stream(
    session: aiohttp.ClientSession, base: str, tokens: int, model: str = "alpha"
) -> tuple[float, int]:
    """Time to the first token, and how many tokens came."""
    began = time.perf_counter()
    first: float | None = None
    count = 0
    async with session.post(
        f"{base}/v1/chat/completions", json=chat(model, tokens, True)
    ) as answer:
        if answer.status != 200:
            raise RuntimeError(f"{base}: HTTP {answer.status}")
        async for line in answer.content:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                count += 1
                if first is None:
                    first = time.perf_counter() - began
    return first or 0.0, count


async def throughput(base: str, clients: int, seconds: float, model: str = "alpha") -> int:
    """Tokens streamed by ``clients`` looping streams for ``seconds``."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> int:
            tokens = 0
            while time.perf_counter() < deadline:
                tokens += (await one_stream(session, base, STREAM_TOKENS, model))[1]
            return tokens

        return sum(await asyncio.gather(*(client() for _ in range(clients))))


async def switch(session: aiohttp.ClientSession, rig: Rig, model: str) -> str:
    """Load ``model``; its engine's own URL."""
    async with session.post(f"{rig.url}/switch", json={"model": model}) as answer:
        body = await answer.json()
        if answer.status != 200:
            raise RuntimeError(f"switch to {model} failed: {body}")
    return str(body["status"]["upstream"])


async def alternate(
    paths: dict[str, str], rounds: int, measure: Callable[[str], Awaitable[float]]
) -> dict[str, list[float]]:
    """``measure`` of each path in turn, ``rounds`` times."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, base in paths.items():
            samples[name].append(await measure(base))
    return samples


async def measure(rig: Rig, requests: int, seconds: float, stream_seconds: float) -> dict[str, Any]:
    pid = rig.processes[0].pid
    timeout = aiohttp.ClientTimeout(total=300)
    figures: dict[str, Any] = {"requests": requests}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        paths = {"direct": await switch(session, rig, "alpha"), "gateway": rig.url}
        await alternate(paths, 50, lambda base: one_request(session, base))  # warm both
        latency = await alternate(paths, requests, lambda base: one_request(session, base))
        ttft_delayed = await alternate(
            paths, max(10, requests // 6), lambda base: first_token(session, base, "alpha")
        )
    tokens: dict[str, dict[int, float]] = {name: {} for name in paths}
    for clients in CONCURRENCY:
        for name, base in paths.items():
            count, cpu, wall = await with_cpu(pid, throughput(base, clients, seconds))
            tokens[name][clients] = count / wall
            if name == "gateway" and clients == CONCURRENCY[-1]:
                figures["cpu_per_1000_tokens_ms"] = cpu / count * 1000 * 1000
                figures["cpu_tokens_64"] = count
    async with aiohttp.ClientSession(timeout=timeout) as session:
        paths["direct"] = await switch(session, rig, NO_DELAY_MODEL)
        await alternate(paths, 20, lambda base: first_token(session, base, NO_DELAY_MODEL))
        ttft = await alternate(
            paths, requests // 2, lambda base: first_token(session, base, NO_DELAY_MODEL)
        )
    # The same 64 clients on the engine with no delay: the gateway's CPU per token when
    # tokens come as fast as the machine can make them.
    no_delay: dict[str, float] = {}
    for name, base in paths.items():
        count, cpu, wall = await with_cpu(
            pid, throughput(base, CONCURRENCY[-1], seconds, NO_DELAY_MODEL)
        )
        no_delay[name] = count / wall
        if name == "gateway":
            figures["cpu_per_1000_tokens_no_delay_ms"] = cpu / count * 1000 * 1000
            figures["cpu_tokens_no_delay"] = count
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await switch(session, rig, ONE_STREAM_MODEL)
        await one_stream(session, rig.url, 10, ONE_STREAM_MODEL)  # warm the connection
        _, idle_cpu, idle_wall = await with_cpu(pid, asyncio.sleep(IDLE_SECONDS))
        want = round(stream_seconds / ONE_STREAM_DELAY)
        (_, streamed), stream_cpu, stream_wall = await with_cpu(
            pid, one_stream(session, rig.url, want, ONE_STREAM_MODEL)
        )
    lat = {
        name: {"p50": statistics.median(v) * 1000, "p99": percentile(v, 0.99) * 1000}
        for name, v in latency.items()
    }
    first = {
        name: {"p50": statistics.median(v) * 1000, "p99": percentile(v, 0.99) * 1000}
        for name, v in ttft.items()
    }
    figures.update(
        latency_ms=lat,
        added_p50_ms=lat["gateway"]["p50"] - lat["direct"]["p50"],
        added_p99_ms=lat["gateway"]["p99"] - lat["direct"]["p99"],
        ttft_delayed_ms={name: statistics.median(v) * 1000 for name, v in ttft_delayed.items()},
        ttft_samples=len(ttft["gateway"]),
        ttft_ms=first,
        added_ttft_ms=first["gateway"]["p50"] - first["direct"]["p50"],
        tokens_per_s=tokens,
        tokens_per_s_no_delay_64=no_delay,
        throughput_ratio_64=tokens["gateway"][64] / tokens["direct"][64],
        idle_cpu_percent=idle_cpu / idle_wall * 100,
        one_stream_tokens_per_s=streamed / stream_wall,
        one_stream_seconds=stream_wall,
        one_stream_cpu_percent=stream_cpu / stream_wall * 100,
    )
    return figures


async def first_token(session: aiohttp.ClientSession, base: str, model: str) -> float:
    return (await one_stream(session, base, 4, model))[0]


def report(figures: dict[str, Any], token_delay: float) -> None:
    lat, ttft = figures["latency_ms"], figures["ttft_ms"]
    print(
        f"gateway benchmark: stand-in engines; alpha has {token_delay * 1000:g} ms between tokens"
    )
    print(
        f"  non-streaming latency ({figures['requests']} each): direct p50 "
        f"{lat['direct']['p50']:.2f} ms p99 {lat['direct']['p99']:.2f} ms; gateway p50 "
        f"{lat['gateway']['p50']:.2f} ms p99 {lat['gateway']['p99']:.2f} ms"
    )
    print(
        f"  added by the gateway : p50 {figures['added_p50_ms']:.2f} ms, "
        f"p99 {figures['added_p99_ms']:.2f} ms"
    )
    delayed = figures["ttft_delayed_ms"]
    print(
        f"  time to first token, {token_delay * 1000:g} ms between tokens: "
        f"direct {delayed['direct']:.2f} ms, gateway {delayed['gateway']:.2f} ms"
    )
    print(
        f"  time to first token, no delay ({figures['ttft_samples']} each): direct p50 "
        f"{ttft['direct']['p50']:.2f} ms p99 {ttft['direct']['p99']:.2f} ms; gateway p50 "
        f"{ttft['gateway']['p50']:.2f} ms p99 {ttft['gateway']['p99']:.2f} ms; "
        f"added p50 {figures['added_ttft_ms']:.2f} ms"
    )
    for clients in CONCURRENCY:
        direct = figures["tokens_per_s"]["direct"][clients]
        gateway = figures["tokens_per_s"]["gateway"][clients]
        print(
            f"  tokens/s, {clients:2} clients : direct {direct:7.0f}, gateway {gateway:7.0f}"
            f" ({gateway / direct:.0%})"
        )
    direct, gateway = (figures["tokens_per_s_no_delay_64"][name] for name in ("direct", "gateway"))
    print(
        f"  tokens/s, 64 clients, no delay: direct {direct:7.0f}, gateway {gateway:7.0f}"
        f" ({gateway / direct:.0%})"
    )
    print(
        f"  daemon CPU per 1,000 tokens, 64 clients: {figures['cpu_per_1000_tokens_ms']:.2f} ms"
        f" with {token_delay * 1000:g} ms between tokens ({figures['cpu_tokens_64']} tokens),"
        f" {figures['cpu_per_1000_tokens_no_delay_ms']:.2f} ms with none"
        f" ({figures['cpu_tokens_no_delay']} tokens)"
    )
    print(
        f"  daemon CPU, one stream of {figures['one_stream_tokens_per_s']:.1f} tokens/s for "
        f"{figures['one_stream_seconds']:.0f} s: {figures['one_stream_cpu_percent']:.2f} % of a"
        f" core (idle: {figures['idle_cpu_percent']:.2f} %)"
    )
    for key, sign, target in TARGETS:
        value = figures[key]
        met = value <= target if sign == "<=" else value >= target
        print(f"  target {key} {sign} {target:g}: {value:.3f} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--stream-seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env()
    with TemporaryDirectory(prefix="mo-bench-") as folder:
        root = Path(folder)
        for name in ("alpha", NO_DELAY_MODEL, ONE_STREAM_MODEL):
            make_snapshot(root / "models" / "hub", f"org/{name}")
        (root / "docker-compose.yml").write_text(compose(args.token_delay))
        rig = Rig(root=root, project=f"mo-bench-{uuid.uuid4().hex[:6]}", docker=client)
        try:
            rig.start_daemon("--log-level", "warning")
            figures = asyncio.run(measure(rig, args.requests, args.seconds, args.stream_seconds))
        finally:
            rig.clean()
    report(figures, args.token_delay)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
