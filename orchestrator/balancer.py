"""What a load balancer in front of several daemons is told, answered from memory.

Two questions, asked many times a second by HAProxy: would this daemon take a switch to
model X now (``/health?model=X&can_switch=true``), and how much new work should it get
(the agent check, ``agent.py``)? Both are answered from the switcher's status, the
gateway's traffic and cache verdicts kept here, never by a Docker call or a walk of the
disk on the probe's path: verdicts are looked at again in a worker thread, behind the
answer, when they are older than ``VERDICT_REFRESH`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .cache import SnapshotVerdict
from .history import Kind
from .states import State
from .switcher import Switcher
from .traffic import Traffic

log = structlog.get_logger(__name__)

# Seconds a remembered weights verdict is trusted before it is looked at again: a pull
# that finishes shows within this, without a stat call on every probe.
VERDICT_REFRESH = 5.0
# How much one finished request moves a model's running mean duration.
DURATION_SMOOTHING = 0.2
# The weight's floor, in percent: 0% would drain the server, which is the switch's to say.
MIN_WEIGHT = 1


@dataclass(frozen=True)
class AgentAnswer:
    """One reply of HAProxy's agent check: an administrative state, an operational state
    and a weight. ``line`` is what goes on the wire."""

    state: str  # ready, drain
    operational: str  # up, down
    weight: int  # percent of the server's configured weight
    reason: str

    @property
    def line(self) -> bytes:
        if self.state == "drain":
            return b"drain\n"
        if self.operational == "down":
            return b"down\n"
        return f"ready up {self.weight}%\n".encode()


class Balancer:
    def __init__(
        self,
        switcher: Switcher,
        traffic: Traffic,
        *,
        drain_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.switcher, self.traffic = switcher, traffic
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._verdicts: dict[str, SnapshotVerdict | None] = {}
        self._checked_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None
        # Running mean of how long each model's gateway requests took, in seconds.
        self._durations: dict[str, float] = {}

    # -- told by the gateway -------------------------------------------------------------

    def observe_request(self, model: str, code: int, seconds: float) -> None:
        known = self._durations.get(model)
        self._durations[model] = (
            seconds if known is None else known + DURATION_SMOOTHING * (seconds - known)
        )

    # -- /health?model=X&can_switch=true ---------------------------------------------------

    def refusal(self, model_id: str) -> str | None:
        """Why this daemon would not take a switch to the model now; None when it would.

        Call after checking that the model exists. A switch already on its way to the model
        counts as taken: a request for it joins that switch.
        """
        switcher = self.switcher
        spec = switcher.models[model_id]
        if model_id in switcher.disabled:
            return f"{model_id} is disabled on this daemon"
        if spec.unusable:
            return f"{model_id} cannot be run: {spec.unusable}"
        if not self.traffic.auto_switch:
            return "auto_switch is off: /v1 requests do not switch this daemon"
        weights = self._verdict(model_id)
        if isinstance(weights, str):
            return weights
        status = switcher.status
        if switcher.switch_under_way:
            queued = switcher.queued()
            last = queued[-1] if queued else None
            if last is not None and last.kind is Kind.SWITCH and last.model == model_id:
                return None
            return f"a switch is under way ({status.state}, target {status.target or 'none'})"
        if status.holds(model_id) and not status.healthy:
            return f"{model_id} is loaded but not answering its health check"
        busy = self._busy_elsewhere(model_id)
        if busy:
            return busy
        return None

    def _verdict(self, model_id: str) -> str | None:
        """None when the model's weights are on disk as last seen, else why not."""
        self._refresh_if_stale()
        if model_id not in self._verdicts:
            return f"the weights of {model_id} have not been checked yet; ask again shortly"
        verdict = self._verdicts[model_id]
        if verdict is None or verdict.status == "present":
            return None
        return verdict.reason

    def _busy_elsewhere(self, model_id: str) -> str | None:
        traffic = self.traffic
        in_flight = {m: n for m, n in traffic.inflight.items() if n > 0 and m != model_id}
        if in_flight:
            model, count = max(in_flight.items(), key=lambda item: item[1])
            return f"{count} request(s) in flight on {model}; a switch would wait for them"
        waiting = {w.model for w in traffic.waiting if w.model != model_id}
        if waiting:
            return f"requests are waiting for {', '.join(sorted(waiting))}"
        return None

    # -- the agent check -------------------------------------------------------------------

    def agent_answer(self) -> AgentAnswer:
        """drain while a switch is under way, down when nothing could be served, else ready
        with a weight that falls as requests are in flight or waiting and as the loaded
        model's drain would take longer."""
        switcher = self.switcher
        status = switcher.status
        if switcher.switch_under_way or status.state in {State.STARTING, State.STOPPING}:
            target = status.target or "none"
            return AgentAnswer("drain", "up", 0, f"a switch is under way (target {target})")
        if not any(self.refusal_of_weights(m) is None for m in switcher.models):
            return AgentAnswer("ready", "down", 0, "no model here can be started")
        traffic = self.traffic
        busy = sum(traffic.inflight.values()) + len(traffic.waiting)
        drain = self.expected_drain()
        share = 1.0 / (1 + busy)
        if self.drain_timeout > 0:
            share *= 1.0 - 0.5 * min(drain, self.drain_timeout) / self.drain_timeout
        weight = max(MIN_WEIGHT, round(100 * share))
        return AgentAnswer("ready", "up", weight, f"{busy} busy, drain about {drain:.1f} s")

    def refusal_of_weights(self, model_id: str) -> str | None:
        """Whether the model could ever start here: enabled, runnable, weights on disk."""
        spec = self.switcher.models[model_id]
        if model_id in self.switcher.disabled or spec.unusable:
            return "not runnable"
        if model_id not in self._verdicts:
            return None  # not checked yet: give it the benefit of the doubt
        return self._verdict(model_id)

    def expected_drain(self) -> float:
        """Seconds a switch away from the loaded model would wait for its requests."""
        active = self.switcher.status.active
        if active is None or not self.traffic.inflight.get(active):
            return 0.0
        return min(self._durations.get(active, 0.0), self.drain_timeout)

    # -- verdicts, kept fresh behind the answers -----------------------------------------

    def start(self) -> None:
        self._refresh_if_stale()

    async def close(self) -> None:
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _refresh_if_stale(self) -> None:
        if self._refreshing is not None:
            return
        checked = self._checked_at
        if checked is not None and self._clock() - checked < VERDICT_REFRESH:
            return
        self._refreshing = asyncio.get_running_loop().create_task(
            self._refresh(), name="balancer-verdicts"
        )

    async def _refresh(self) -> None:
        switcher = self.switcher

        def judge() -> dict[str, SnapshotVerdict | None]:
            return {spec.id: switcher.verdicts.of(spec) for spec in switcher.models.values()}

        try:
            self._verdicts = await asyncio.to_thread(judge)
            self._checked_at = self._clock()
        except OSError as err:
            log.warning("cannot check the weights for the balancer", error=str(err))
            self._checked_at = self._clock()
        finally:
            self._refreshing = None
