"""Stall check: which callbacks hold the daemon's event loop during a switch under /health load.

Runs the real daemon against the stand-in engine on this machine's Docker engine, with
asyncio's debug mode and a slow-callback threshold of 1 ms, switches once while paced
probers ask /health, and prints the slow callbacks asyncio logged during the switch,
grouped by what ran. It asserts nothing. Needs the images from scripts/build-images.sh.

    python -m benchmarks.stalls [--rate 1000] [--threshold-ms 1] [--no-debug]

Debug mode makes every task, future and handle record where it was made, so everything
runs several times slower than in service: the probe rate here is lower than the
switch benchmark's. On a machine shared with other work a callback also "takes" the
time the kernel kept the daemon off the CPU; so each callback is timed a second way,
in CPU time of the loop's thread, which only work done counts. Collector pauses are
timed too: they land inside whatever callback allocated. The daemon runs on the loop it
runs on in service: on uvloop, asyncio's slow-callback log is uvloop's own, and the
second timing (which wraps asyncio's handles) sees only what runs on asyncio's loop.

The daemon's command line has no debug switch, and debug mode's own threshold is
100 ms: both are set by a sitecustomize module that this script writes to a temporary
folder and puts on the daemon's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import docker

from benchmarks.probing import percentile, probe_for
from benchmarks.switch import project
from tests.rig import Rig

# Loaded by the daemon's interpreter at start. Lines it writes start with STALL or GC.
HOOK = """
import asyncio.base_events
import asyncio.events
import gc
import logging
import os
import sys
import time

threshold = float(os.environ["STALL_THRESHOLD"])
init = asyncio.base_events.BaseEventLoop.__init__


def init_with_threshold(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.slow_callback_duration = threshold


asyncio.base_events.BaseEventLoop.__init__ = init_with_threshold
try:
    import uvloop
except ImportError:
    uvloop = None
if uvloop is not None:
    # The daemon's loop where uvloop is installed: its debug mode logs slow callbacks too.
    new_loop = uvloop.new_event_loop

    def new_loop_with_threshold():
        loop = new_loop()
        loop.slow_callback_duration = threshold
        return loop

    uvloop.new_event_loop = new_loop_with_threshold
logging.basicConfig(format="%(created).6f %(name)s %(message)s")
run = asyncio.events.Handle._run
clock, cpu_clock = time.perf_counter, time.thread_time


def describe(callback):
    owner = getattr(callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):
        coro = owner.get_coro()
        name = getattr(coro, "__qualname__", repr(coro))
        frame = getattr(coro, "cr_frame", None)
        if frame is None:
            return f"task {name}"
        return f"task {name} @{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    name = getattr(callback, "__qualname__", repr(callback))
    return name if owner is None else f"{type(owner).__name__}.{name}"


def timed_run(self):
    began, began_cpu = clock(), cpu_clock()
    run(self)
    took = clock() - began
    if took > threshold:
        cpu = cpu_clock() - began_cpu
        what = describe(self._callback)
        sys.stderr.write(f"STALL {time.time():.6f} {took * 1000:.3f} {cpu * 1000:.3f} {what}\\n")


asyncio.events.Handle._run = timed_run
collecting = [0.0]


def on_collection(phase, info):
    if phase == "start":
        collecting[0] = clock()
    elif clock() - collecting[0] > threshold / 2:
        took = (clock() - collecting[0]) * 1000
        sys.stderr.write(f"GC {time.time():.6f} {info['generation']} {took:.3f}\\n")


gc.callbacks.append(on_collection)
"""

_ASYNCIO_SLOW = re.compile(r"^([\d.]+) asyncio Executing (.*) took ([\d.]+) seconds$")
_TIMED = re.compile(r"^STALL ([\d.]+) ([\d.]+) ([\d.]+) (.*)$")
_GC = re.compile(r"^GC ([\d.]+) (\d) ([\d.]+)$")


def _kind(handle: str) -> str:
    """What asyncio's repr of a handle or task says ran, without ids and addresses."""
    task = re.search(r"coro=<([\w.<>]+)\(\) (?:running|done)(?: at ([^>]*?:\d+))?", handle)
    if task:
        where = os.path.basename(task.group(2) or "")
        return f"task {task.group(1)}" + (f" @{where}" if where else "")
    callback = re.match(r"<(?:Timer)?Handle ([\w.<>]+)", handle)
    return callback.group(1) if callback else handle[:100]


async def _switch(session: aiohttp.ClientSession, rig: Rig, model: str) -> None:
    async with session.post(f"{rig.url}/switch", json={"model": model}) as response:
        if response.status != 200:
            raise RuntimeError(f"switch to {model} failed: {await response.text()}")


async def run_switch(rig: Rig, rate: float, probers: int) -> tuple[float, float, dict[str, Any]]:
    """Alpha ready, then a switch to beta under paced /health load; its span and latencies."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _switch(session, rig, "alpha")
        queue: Any = multiprocessing.Queue()
        # The probers stop by themselves; long enough for any switch this rig makes.
        worker = multiprocessing.Process(
            target=probe_for, args=(f"{rig.url}/health", probers, rate, 12.0, queue)
        )
        worker.start()
        await asyncio.sleep(1.0)
        began = time.time()
        await _switch(session, rig, "beta")
        ended = time.time()
        latencies, codes, _span = await asyncio.to_thread(queue.get)
        worker.join()
    load = {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "codes": codes,
    }
    return began, ended, load


def analyse(log: str, began: float, ended: float) -> dict[str, Any]:
    slow: dict[str, list[float]] = defaultdict(list)
    timed: dict[str, list[tuple[float, float]]] = defaultdict(list)
    collections: list[tuple[int, float]] = []
    for line in log.splitlines():
        if match := _ASYNCIO_SLOW.match(line):
            if began <= float(match.group(1)) <= ended:
                slow[_kind(match.group(2))].append(float(match.group(3)) * 1000)
        elif match := _TIMED.match(line):
            if began <= float(match.group(1)) <= ended:
                kind = re.sub(r"Task-\d+", "Task-N", match.group(4))
                timed[kind].append((float(match.group(2)), float(match.group(3))))
        elif (match := _GC.match(line)) and began <= float(match.group(1)) <= ended:
            collections.append((int(match.group(2)), float(match.group(3))))
    return {"asyncio_slow": slow, "timed": timed, "collections": collections}


def report(found: dict[str, Any], load: dict[str, Any], args: Any, seconds: float) -> None:
    mode = "debug mode" if args.debug else "no debug mode"
    print(
        f"stall check ({mode}, threshold {args.threshold_ms:g} ms): one switch of "
        f"{seconds:.2f} s under /health at {args.rate:g} req/s (p50 {load['p50_ms']:.2f} ms, "
        f"p99 {load['p99_ms']:.2f} ms, codes {load['codes']})"
    )
    slow = found["asyncio_slow"]
    if args.debug:
        total = sum(len(v) for v in slow.values())
        print(f"  asyncio's slow-callback log: {total} callbacks over the threshold")
        for kind, took in sorted(slow.items(), key=lambda item: -len(item[1])):
            print(
                f"    {len(took):5d}x  max {max(took):6.1f} ms  median "
                f"{statistics.median(took):5.1f} ms  {kind}"
            )
    timed = found["timed"]
    worked = {
        kind: [cpu for _wall, cpu in runs if cpu > args.threshold_ms]
        for kind, runs in timed.items()
    }
    worked = {kind: cpus for kind, cpus in worked.items() if cpus}
    over = sum(len(runs) for runs in timed.values())
    print(
        f"  timed by the loop's thread CPU: {over} callbacks over the threshold in wall "
        f"time, {sum(len(v) for v in worked.values())} of them in CPU time"
    )
    for kind, cpus in sorted(worked.items(), key=lambda item: -max(item[1])):
        print(f"    {len(cpus):5d}x  CPU max {max(cpus):6.2f} ms  {kind}")
    collections = found["collections"]
    print(
        f"  collector pauses over {args.threshold_ms / 2:g} ms: "
        + (", ".join(f"gen {g} {ms:.1f} ms" for g, ms in collections) or "none")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="/health requests a second")
    parser.add_argument("--probers", type=int, default=50)
    parser.add_argument("--threshold-ms", type=float, default=1.0)
    parser.add_argument(
        "--no-debug", dest="debug", action="store_false", help="time callbacks without debug mode"
    )
    parser.add_argument("--json", type=Path, help="also write the findings here")
    args = parser.parse_args()
    client = docker.from_env()
    with TemporaryDirectory(prefix="mo-stalls-") as hook:
        (Path(hook) / "sitecustomize.py").write_text(HOOK)
        path = os.pathsep.join(p for p in (hook, os.environ.get("PYTHONPATH")) if p)
        env = {"PYTHONPATH": path, "STALL_THRESHOLD": str(args.threshold_ms / 1000)}
        if args.debug:
            env["PYTHONASYNCIODEBUG"] = "1"
        times = {"delay": 2, "sleep_time": 0.3, "wake_time": 0.3, "exit_time": 0}
        with project(client, (), env, sleep="false", **times) as rig:
            began, ended, load = asyncio.run(run_switch(rig, args.rate, args.probers))
            log = "".join(p.read_text() for p in sorted(rig.root.glob("daemon-*.log")))
    found = analyse(log, began, ended)
    report(found, load, args, ended - began)
    if args.json:
        args.json.write_text(json.dumps({"load": load, **found}, indent=2))


if __name__ == "__main__":
    main()
