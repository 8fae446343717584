"""The gateway's client and relay run on uvloop in the daemon: their tests run on it too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from orchestrator.eventloop import loop_factory

# uvloop's transports are not asyncio's classes; code that touches them is tested on both.
BOTH_LOOPS = {"tests.unit.test_upstream", "tests.unit.test_gateway"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    faster = loop_factory()
    if module is None or module.__name__ not in BOTH_LOOPS or faster is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": faster}
