"""The warm pool's limits: how many models may sleep at once, and in how much host RAM.

A model asleep at level 1 keeps its weights in host RAM; too many of them and the host
swaps or the kernel's OOM killer picks a victim. The switcher asks ``to_evict`` before a
model falls asleep and stops the sleepers it names, least recently used first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .states import Sleeper

GIB = 1024**3


@dataclass(frozen=True)
class PoolLimits:
    max_asleep: int = 2
    ram_budget: int | None = None  # bytes of host RAM for level-1 sleepers; None: no cap
    sleep_ttl: float = 0.0  # seconds a model may sleep before it is stopped; 0: forever

    def to_json(self) -> dict[str, int | float | None]:
        return {
            "max_asleep": self.max_asleep,
            "ram_budget_bytes": self.ram_budget,
            "sleep_ttl": self.sleep_ttl,
        }


def to_evict(
    pool: Sequence[Sleeper], newcomer_bytes: int, limits: PoolLimits
) -> list[Sleeper] | None:
    """The sleepers to stop, least recently used first, so that one more of
    ``newcomer_bytes`` fits; None when it cannot fit even in an empty pool."""
    if limits.max_asleep < 1:
        return None
    budget = limits.ram_budget
    if budget is not None and newcomer_bytes > budget:
        return None
    evicted: list[Sleeper] = []
    kept = list(pool)  # the pool is kept least recently used first
    while kept and (
        len(kept) + 1 > limits.max_asleep
        or (budget is not None and sum(s.ram_bytes for s in kept) + newcomer_bytes > budget)
    ):
        evicted.append(kept.pop(0))
    return evicted


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's available memory in bytes, as the kernel estimates it; None if unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_budget(setting_gib: float | None, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The RAM budget: the setting's GiB, else half of what the host has available now."""
    if setting_gib is not None:
        return int(setting_gib * GIB)
    available = available_memory(meminfo)
    return None if available is None else available // 2
