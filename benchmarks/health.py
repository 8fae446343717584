"""/health benchmark outside a switch: latency at a steady rate and the daemon's CPU per probe.

Runs the real daemon with one stand-in model ready on this machine's Docker engine and
prints figures; it asserts nothing. Needs the images from scripts/build-images.sh.

    python -m benchmarks.health [--rate 3000] [--seconds 10] [--probers 50] [--runs 3]

Keep-alive probers in a separate process each keep their share of the rate on a fixed
schedule, and latency counts from the scheduled send, as in benchmarks.switch. The
floor, the same probers against a bare asyncio server that answers with fixed bytes,
shows how much of the latency is the probers' own: what the daemon adds is above it.
The daemon's CPU comes from /proc over the same span, per request answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import docker

from benchmarks.cpu import CpuMeter
from benchmarks.probing import percentile, probe_for
from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig, free_port

COMPOSE = """
services:
  engine-alpha:
    image: {image}
    profiles: ["alpha"]
    ports: ["127.0.0.1::8000"]
    environment: {{STANDIN_LOAD_DELAY: "0.5"}}
    volumes: ["./models/hub:/root/.cache/huggingface/hub"]
    command: ["--model", "org/alpha"]
"""

TARGET_P50_MS = 0.8
_FIXED_BODY = b'{"status": "pass", "model": "alpha"}'
FIXED_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/health+json\r\n"
    + f"Content-Length: {len(_FIXED_BODY)}\r\n\r\n".encode()
    + _FIXED_BODY
)


def load(url: str, probers: int, rate: float, seconds: float, pid: int | None) -> dict[str, Any]:
    queue: Any = multiprocessing.Queue()
    worker = multiprocessing.Process(target=probe_for, args=(url, probers, rate, seconds, queue))
    meter = CpuMeter(pid) if pid is not None else None
    worker.start()
    if meter is not None:
        meter.start()
    latencies, codes, span = queue.get()
    reading = meter.stop() if meter is not None else None
    worker.join()
    figures: dict[str, Any] = {
        "requests": len(latencies),
        "rps": len(latencies) / span,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p90_ms": percentile(latencies, 0.9) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "codes": codes,
    }
    if reading is not None:
        figures["daemon_cpu_share"] = reading.share_of_core
        figures["daemon_us_per_request"] = reading.cpu_seconds / len(latencies) * 1e6
    return figures


class _Fixed(asyncio.Protocol):
    """Answers every request on the connection with FIXED_ANSWER, parsing nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._pending = b""

    def data_received(self, data: bytes) -> None:
        self._pending += data
        while b"\r\n\r\n" in self._pending:
            _, _, self._pending = self._pending.partition(b"\r\n\r\n")
            self._transport.write(FIXED_ANSWER)


def _serve_fixed(port: int, ready: Any) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Fixed, "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(run())


def floor(probers: int, rate: float, seconds: float) -> dict[str, Any]:
    port = free_port()
    ready: Any = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve_fixed, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the fixed-answer server did not start")
        return load(f"http://127.0.0.1:{port}/health", probers, rate, seconds, None)
    finally:
        server.terminate()
        server.join()


async def make_ready(rig: Rig) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{rig.url}/switch", json={"model": "alpha"}) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"switch to alpha failed: {await response.text()}")


def report(runs: list[dict[str, Any]], floors: list[dict[str, Any]], args: Any) -> None:
    print(
        f"/health outside a switch: {args.probers} probers at {args.rate:g} req/s, "
        f"{args.seconds:g} s a run, {len(runs)} run(s), alternating with the floor"
    )
    for number, (run, base) in enumerate(zip(runs, floors, strict=True), start=1):
        print(
            f"  run {number}: daemon p50 {run['p50_ms']:.3f} ms, p90 {run['p90_ms']:.2f}, "
            f"p99 {run['p99_ms']:.2f}, max {run['max_ms']:.1f} ({run['rps']:.0f} req/s, codes "
            f"{run['codes']}), CPU {100 * run['daemon_cpu_share']:.1f} % of a core = "
            f"{run['daemon_us_per_request']:.0f} us a request | floor p50 {base['p50_ms']:.3f} "
            f"ms, p99 {base['p99_ms']:.2f}"
        )
    p50 = statistics.median(run["p50_ms"] for run in runs)
    print(
        f"  median: daemon p50 {p50:.3f} ms, p99 "
        f"{statistics.median(run['p99_ms'] for run in runs):.2f} ms, "
        f"{statistics.median(run['daemon_us_per_request'] for run in runs):.0f} us of daemon "
        f"CPU a request; floor p50 {statistics.median(b['p50_ms'] for b in floors):.3f} ms"
    )
    met = p50 <= TARGET_P50_MS
    print(f"  target p50 <= {TARGET_P50_MS:g} ms: {p50:.3f} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--probers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env()
    runs: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    with TemporaryDirectory(prefix="mo-health-") as folder:
        root = Path(folder)
        make_snapshot(root / "models" / "hub", "org/alpha")
        (root / "docker-compose.yml").write_text(COMPOSE.format(image=STANDIN_IMAGE))
        rig = Rig(root=root, project=f"mo-health-{uuid.uuid4().hex[:6]}", docker=client)
        try:
            process = rig.start_daemon("--log-level", "warning")
            asyncio.run(make_ready(rig))
            for _ in range(args.runs):
                url = f"{rig.url}/health"
                runs.append(load(url, args.probers, args.rate, args.seconds, process.pid))
                floors.append(floor(args.probers, args.rate, args.seconds))
        finally:
            rig.clean()
    report(runs, floors, args)
    if args.json:
        args.json.write_text(json.dumps({"daemon": runs, "floor": floors}, indent=2))


if __name__ == "__main__":
    main()
