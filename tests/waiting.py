"""Waiting in tests for something to become true, instead of sleeping and hoping.

``eventually`` looks at a condition until it holds, and fails the test, saying what it
waited for, when it does not hold in time. A test that needs another task to have run
waits for what that task does, never for a fixed time; a fixed sleep is only right where
the time itself is under test (a request that must still be waiting after it).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Condition = Callable[[], bool | Awaitable[bool]]

# Often enough that a test waits little longer than the thing it waits for; the loop of
# the code under test gets every other turn.
INTERVAL = 0.01


def _failure(
    condition: Callable[..., object],
    what: str | None,
    within: float,
    context: Callable[[], object] | None,
) -> AssertionError:
    name = getattr(condition, "__name__", "")
    what = what or ("the condition" if not name or name == "<lambda>" else name)
    message = f"{what} did not hold within {within:g} s"
    return AssertionError(message if context is None else f"{message}: {context()}")


async def eventually(
    condition: Condition,
    *,
    within: float = 5.0,
    interval: float = INTERVAL,
    what: str | None = None,
    context: Callable[[], object] | None = None,
) -> None:
    """Return as soon as ``condition()`` (sync, or a coroutine function) is true; raise
    AssertionError naming ``what`` if it is still false after ``within`` seconds, with
    what ``context()`` says then (a log, the last answer) when given."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise _failure(condition, what, within, context)
        await asyncio.sleep(interval)


def eventually_blocking(
    condition: Callable[[], bool],
    *,
    within: float = 5.0,
    interval: float = INTERVAL,
    what: str | None = None,
    context: Callable[[], object] | None = None,
) -> None:
    """``eventually`` for code that cannot await: the rig's process start, sync fixtures."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise _failure(condition, what, within, context)
        time.sleep(interval)
