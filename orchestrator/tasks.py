"""Background tasks: started by their owner, and ended by it whatever they raised."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until each has ended, whatever it raised."""
    for task in tasks:
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
