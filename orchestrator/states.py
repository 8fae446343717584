"""The switcher's states, the moves between them it may make, and its status snapshot."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class State(StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.IDLE: frozenset({State.STARTING, State.STOPPING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.IDLE, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.IDLE}),
}

# What no longer holds once no engine is up.
NO_ENGINE: Mapping[str, Any] = {"upstream": None, "engine_container": None, "healthy": False}


class IllegalTransition(RuntimeError):
    pass


class Residency(StrEnum):
    """Where a model is: awake on the GPU, asleep (vLLM's sleep mode) or not running."""

    AWAKE = "awake"
    ASLEEP = "asleep"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Sleeper:
    """A model whose engine sleeps in its running container, ready to wake."""

    model: str
    engine_container: str
    upstream: str
    level: int
    since: float = field(default_factory=time.time)  # when it fell asleep
    ram_bytes: int = 0  # host RAM its weights take while asleep, as estimated


@dataclass(frozen=True)
class Status:
    """A snapshot: readers get a consistent view without asking the worker."""

    state: State = State.IDLE
    active: str | None = None  # the model whose containers hold the GPU, as far as we know
    target: str | None = None  # the model being started, during a switch
    since: float = field(default_factory=time.time)
    reason: str | None = None
    upstream: str | None = None  # base URL of the ready model's engine
    engine_container: str | None = None
    healthy: bool = False  # the ready model's last probe answered 200
    # The warm pool, least recently used first: models asleep next to the active one.
    asleep: tuple[Sleeper, ...] = ()

    def holds(self, model_id: str | None) -> bool:
        """Whether the model is loaded and ready."""
        return self.state is State.READY and self.active == model_id

    def sleeper(self, model_id: str | None) -> Sleeper | None:
        return next((s for s in self.asleep if s.model == model_id), None)

    def without(self, model_id: str) -> tuple[Sleeper, ...]:
        """The warm pool without this model."""
        return tuple(s for s in self.asleep if s.model != model_id)

    def residency(self, model_id: str) -> Residency:
        if self.sleeper(model_id) is not None:
            return Residency.ASLEEP
        if self.active == model_id:  # holds the GPU, ready or on its way out
            return Residency.AWAKE
        return Residency.STOPPED
