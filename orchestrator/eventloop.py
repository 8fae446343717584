"""Which event loop the daemon runs on: uvloop where the platform has it, asyncio's otherwise.

The gateway spends most of its time in the loop itself (waking on a socket, reading,
writing the bytes on); uvloop does that work in C and so cuts the latency and CPU the
daemon adds to every request and streamed token. The daemon behaves the same on either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory() -> LoopFactory | None:
    """uvloop's loop, or None for asyncio's own (uvloop is not installed everywhere)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop there is."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
