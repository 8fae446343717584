"""Prometheus metrics: switches, state, the active model, gateway traffic, health age.

One registry of the daemon's own, so tests and a second daemon in one process never
share counters. Counters move from the switcher's events; gauges that describe the
present are read from the switcher when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .states import Residency, State, Status
from .switcher import Switcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Switches take seconds to many minutes (a 30B model loads for two).
SWITCH_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _PresentState(Collector):
    """The gauges that describe now, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        switcher = self._metrics.switcher
        status = switcher.status
        state = GaugeMetricFamily(
            "orchestrator_state", "The switcher's state: 1 for the current one", labels=["state"]
        )
        for candidate in State:
            state.add_metric([str(candidate)], 1.0 if candidate is status.state else 0.0)
        yield state
        active = GaugeMetricFamily(
            "orchestrator_active_model",
            "1 for the model holding the GPU, 0 for the others",
            labels=["model"],
        )
        for model_id in switcher.models:
            active.add_metric([model_id], 1.0 if model_id == status.active else 0.0)
        yield active
        residency = GaugeMetricFamily(
            "orchestrator_model_residency",
            "1 for where each model is: awake on the GPU, asleep in its container, or stopped",
            labels=["model", "residency"],
        )
        for model_id in switcher.models:
            where = status.residency(model_id)
            for place in Residency:
                residency.add_metric([model_id, str(place)], float(place is where))
        yield residency
        yield GaugeMetricFamily(
            "orchestrator_warm_pool_models",
            "Models asleep, ready to wake",
            value=len(status.asleep),
        )
        yield GaugeMetricFamily(
            "orchestrator_warm_pool_ram_bytes",
            "Host RAM the sleeping models' weights take, as estimated from their files",
            value=sum(s.ram_bytes for s in status.asleep),
        )
        yield GaugeMetricFamily(
            "orchestrator_serving",
            "1 while /health passes: a model ready and no switch under way",
            value=1.0 if switcher.serving else 0.0,
        )
        yield GaugeMetricFamily(
            "orchestrator_seconds_since_health_pass",
            "Seconds since /health last passed (0 while it passes; since start if never)",
            value=self._metrics.seconds_since_pass(),
        )


class Metrics:
    def __init__(self, switcher: Switcher) -> None:
        self.switcher = switcher
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.monotonic()
        self._last_pass: float | None = None
        self._was_serving = False
        self.switches = Counter(
            "orchestrator_switches",
            "Finished switches and stops by outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.switch_seconds = Histogram(
            "orchestrator_switch_duration_seconds",
            "Wall time of finished switches, from the start of work to the answer",
            ["operation", "outcome"],
            buckets=SWITCH_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter(
            "orchestrator_swaps",
            "Switches that brought a model up, by path: warm (woken) or cold (started)",
            ["path"],
            registry=self.registry,
        )
        self.requests = Counter(
            "orchestrator_gateway_requests",
            "Requests forwarded by the /v1 gateway, by model and status code",
            ["model", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "orchestrator_gateway_request_duration_seconds",
            "Time from a /v1 request's arrival to the end of its answer, waits included",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PresentState(self))
        self._observe_serving()

    # -- as the switcher's observer --------------------------------------------------

    def happened(self, event: str, data: Mapping[str, Any]) -> None:
        self._observe_serving()
        if event != "switch_finished":
            return
        labels = (str(data.get("operation")), str(data.get("outcome")))
        self.switches.labels(*labels).inc()
        if data.get("path") is not None:
            self.swaps.labels(str(data["path"])).inc()
        if data.get("duration") is not None:
            self.switch_seconds.labels(*labels).observe(float(data["duration"]))

    def status_changed(self, status: Status) -> None:
        self._observe_serving()

    def released(self) -> None:
        pass

    def _observe_serving(self) -> None:
        """Called at every change: if /health passed until now, it last passed now."""
        if self._was_serving:
            self._last_pass = time.monotonic()
        self._was_serving = self.switcher.serving

    def seconds_since_pass(self) -> float:
        if self.switcher.serving:
            self._last_pass = time.monotonic()
            return 0.0
        since = self._last_pass if self._last_pass is not None else self.started
        return time.monotonic() - since

    def observe_request(self, model: str, code: int, seconds: float) -> None:
        self.requests.labels(model, str(code)).inc()
        self.request_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
