"""Fixtures shared by the unit tests; and the gateway's client and relay run on uvloop in
the daemon, so their tests run on it too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest

from orchestrator.eventloop import loop_factory
from orchestrator.store import Store
from tests.fakes import FakeRuntime
from tests.unit.test_standin import Engines

# uvloop's transports are not asyncio's classes; code that touches them is tested on both.
BOTH_LOOPS = {
    "tests.unit.test_upstream",
    "tests.unit.test_gateway",
    "tests.unit.test_probes",
    "tests.unit.test_docker",
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    faster = loop_factory()
    if module is None or module.__name__ not in BOTH_LOOPS or faster is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": faster}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "state" / "db.sqlite")
    yield opened
    await opened.close()


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    """Stand-in engines as processes, killed after the test."""
    made = Engines(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()
