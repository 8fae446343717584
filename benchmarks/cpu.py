"""A process's CPU time as the kernel counts it, for benchmarks that measure what a daemon costs.

``/proc/<pid>/stat`` has utime and stime (fields 14 and 15) in clock ticks: every
thread of the process, user and kernel time, and nothing of its children. Reading it
costs the reader almost nothing and the process being measured nothing at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The process's user plus system CPU time so far, in seconds (children not counted)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may itself hold spaces or ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS_PER_SECOND


@dataclass(frozen=True)
class CpuReading:
    cpu_seconds: float
    wall_seconds: float

    @property
    def share_of_core(self) -> float:
        """CPU used as a fraction of one core over the span (0.005 is 0.5 %)."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


class CpuMeter:
    """CPU a process spends between ``start`` and ``stop``, against the wall clock."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._cpu, self._wall = cpu_seconds(self.pid), time.monotonic()

    def stop(self) -> CpuReading:
        return CpuReading(cpu_seconds(self.pid) - self._cpu, time.monotonic() - self._wall)


def measure_cpu(pid: int, seconds: float) -> CpuReading:
    """Sleep ``seconds`` and return what the process spent meanwhile."""
    meter = CpuMeter(pid)
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every live thread of the process.

    Each wake-up of a thread counts one: a loop or a thread that polls shows here even
    when it costs too little CPU to show in the tick-grained CPU time.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:
            continue  # the thread ended between the listing and the read
        for line in lines:
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total
