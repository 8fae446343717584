"""Idle benchmark: what the daemon costs with one model ready and no traffic.

Runs the real daemon against the stand-in engine on this machine's Docker engine,
switches one model ready, lets it settle, then reads the daemon's CPU time (utime +
stime from /proc, every thread, children not counted) over a quiet span and prints it
with its target; it asserts nothing. Needs the images from scripts/build-images.sh.

    python -m benchmarks.idle [--seconds 60] [--settle 5] [--runs 1]

What is left running in the span is what an idle daemon always runs: the watcher's
probe of the ready engine and its docker event stream, the gateway's idle-unload check,
the store's and the event pump's threads. The context switches of its threads are
counted too: a loop that spins shows there before it shows in CPU time.
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

from benchmarks.cpu import CpuMeter, context_switches
from benchmarks.health import COMPOSE
from benchmarks.health import make_ready as switch_to_alpha
from tests.fakes import make_snapshot
from tests.rig import STANDIN_IMAGE, Rig

TARGET_SHARE = 0.005  # of one core


async def make_ready(rig: Rig) -> None:
    await switch_to_alpha(rig)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.get(f"{rig.url}/health") as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"alpha is not serving: {await response.text()}")


def measure(pid: int, seconds: float) -> dict[str, Any]:
    meter = CpuMeter(pid)
    switches_before = context_switches(pid)
    meter.start()
    time.sleep(seconds)
    reading = meter.stop()
    switches = context_switches(pid) - switches_before
    return {
        "cpu_s": reading.cpu_seconds,
        "wall_s": reading.wall_seconds,
        "share_of_core": reading.share_of_core,
        "context_switches_per_s": switches / reading.wall_seconds,
    }


def report(runs: list[dict[str, Any]]) -> None:
    print(f"idle benchmark: one model ready, no traffic, {len(runs)} run(s)")
    for number, run in enumerate(runs, start=1):
        print(
            f"  run {number}: {run['cpu_s']:.2f} s of CPU over {run['wall_s']:.1f} s = "
            f"{100 * run['share_of_core']:.3f} % of a core; "
            f"{run['context_switches_per_s']:.1f} context switches/s"
        )
    share = statistics.median(run["share_of_core"] for run in runs)
    met = share < TARGET_SHARE
    print(
        f"  target idle CPU < {100 * TARGET_SHARE:g} % of a core: "
        f"{100 * share:.3f} % (median) {'met' if met else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each quiet span")
    parser.add_argument("--settle", type=float, default=5.0, help="wait before measuring")
    parser.add_argument("--runs", type=int, default=1, help="quiet spans, one after another")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env()
    runs: list[dict[str, Any]] = []
    with TemporaryDirectory(prefix="mo-idle-") as folder:
        root = Path(folder)
        make_snapshot(root / "models" / "hub", "org/alpha")
        (root / "docker-compose.yml").write_text(COMPOSE.format(image=STANDIN_IMAGE))
        rig = Rig(root=root, project=f"mo-idle-{uuid.uuid4().hex[:6]}", docker=client)
        try:
            # The daemon's default log level: what an idle daemon writes is part of its cost.
            process = rig.start_daemon()
            asyncio.run(make_ready(rig))
            # The switch's last work (removals, the first probes) ends within this.
            time.sleep(args.settle)
            for _ in range(args.runs):
                runs.append(measure(process.pid, args.seconds))
        finally:
            rig.clean()
    report(runs)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
