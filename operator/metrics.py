"""The operator's Prometheus metrics (`slofleet_operator_*`): reconciles and the control loop.

One process-wide registry (`METRICS.registry`), because both users of the control loop — the
kopf operator and `slofleet up` — run exactly one operator per process. It is served on its own
port (`slofleet operator --metrics-port`; deploy/monitoring/ sets 8081): kopf's liveness endpoint
is kopf's own server and has no room for a /metrics route.

Every series carries `namespace` and `llmservice` (the LLMService, not the operator's own
namespace), so that the dashboards filter operator data the same way as gateway and sidecar data;
the ServiceMonitor scrapes with honorLabels so that these labels win over the target's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Outcome(Protocol):
    invalid: tuple[str, str] | None


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        scope = ["namespace", "llmservice"]
        self.reconciles = Counter(
            "slofleet_operator_reconciles",
            "Reconciles of an LLMService by outcome (ok, invalid: spec rejected, error: exception).",
            [*scope, "outcome"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "slofleet_operator_reconcile_duration_seconds",
            "Time to reconcile one LLMService (reads, writes and status).",
            scope,
            buckets=_SECONDS,
            registry=r,
        )
        self.loop_duration = Histogram(
            "slofleet_operator_control_loop_duration_seconds",
            "Time of one control-loop step (observe, decide, drain, act).",
            scope,
            buckets=_SECONDS,
            registry=r,
        )
        self.loop_errors = Counter(
            "slofleet_operator_control_loop_errors",
            "Control-loop steps that raised (the next step retries).",
            scope,
            registry=r,
        )
        self.desired_replicas = Gauge(
            "slofleet_operator_desired_replicas",
            "Replicas per pool that the autoscaler asked for in the last step.",
            [*scope, "pool"],
            registry=r,
        )
        self.instances = Gauge(
            "slofleet_operator_instances",
            "Instances per pool and phase (starting, ready, standby, draining, failed) in the last step.",
            [*scope, "pool", "phase"],
            registry=r,
        )
        self.scale_events = Counter(
            "slofleet_operator_scale_events",
            "Changes of a pool's replicas by the autoscaler, by direction (up, down).",
            [*scope, "pool", "direction"],
            registry=r,
        )
        self.drains = Counter(
            "slofleet_operator_drains",
            "Instances drained before scale-in, by result (drained, timed_out).",
            [*scope, "result"],
            registry=r,
        )
        self.migrations = Counter(
            "slofleet_operator_migrations",
            "Live request migrations the control loop started, by policy reason and outcome.",
            [*scope, "reason", "outcome"],
            registry=r,
        )
        self.replacements = Counter(
            "slofleet_operator_instance_replacements",
            "Failed instances that the control loop replaced.",
            scope,
            registry=r,
        )
        self.standby_instances = Gauge(
            "slofleet_operator_standby_instances",
            "Instances parked in warm standby (weights in host memory, no traffic) in the last step.",
            scope,
            registry=r,
        )
        self.standby_events = Counter(
            "slofleet_operator_standby_events",
            "Warm-standby transitions by event (parked, woken, wake_failed, removed).",
            [*scope, "event"],
            registry=r,
        )
        self.cold_start = Gauge(
            "slofleet_operator_cold_start_seconds",
            "Latest measured cold start (seen starting to seen ready); waking is weighed against it.",
            scope,
            registry=r,
        )

    def loop(self, namespace: str, service: str) -> LoopMetrics:
        return LoopMetrics(self, namespace, service)


class LoopMetrics:
    """The control loop's view: every series of one LLMService (namespace, name)."""

    def __init__(self, metrics: OperatorMetrics, namespace: str, service: str) -> None:
        self._m = metrics
        self._scope = (namespace, service)
        self.duration = metrics.loop_duration.labels(*self._scope)
        self.errors = metrics.loop_errors.labels(*self._scope)
        self.replacements = metrics.replacements.labels(*self._scope)
        metrics.standby_instances.labels(*self._scope).set(0)
        self._phases_seen: set[tuple[str, str]] = set()

    def observe_fleet(self, phases: Mapping[tuple[str, str], int]) -> None:
        """Set every (pool, phase) count; pairs seen before and absent now drop to 0, not stale."""
        self._phases_seen |= set(phases)
        for pool, phase in self._phases_seen:
            self._m.instances.labels(*self._scope, pool, phase).set(phases.get((pool, phase), 0))

    def observe_targets(self, before: Mapping[str, int], targets: Mapping[str, int]) -> None:
        for pool, target in targets.items():
            self._m.desired_replicas.labels(*self._scope, pool).set(target)
            previous = before.get(pool, 0)
            if target != previous:
                direction = "up" if target > previous else "down"
                self._m.scale_events.labels(*self._scope, pool, direction).inc()

    def drained(self, ok: bool) -> None:
        self._m.drains.labels(*self._scope, "drained" if ok else "timed_out").inc()

    def migrated(self, reason: str, outcome: str) -> None:
        self._m.migrations.labels(*self._scope, reason, outcome).inc()

    def observe_standby(self, parked: int, cold_start_s: float | None) -> None:
        self._m.standby_instances.labels(*self._scope).set(parked)
        if cold_start_s is not None:
            self._m.cold_start.labels(*self._scope).set(cold_start_s)

    def standby_event(self, event: str) -> None:
        self._m.standby_events.labels(*self._scope, event).inc()


METRICS = OperatorMetrics()


def observe_reconcile(
    fn: Callable[..., Awaitable[_Outcome]],
) -> Callable[..., Awaitable[_Outcome]]:
    """Count and time `reconcile(kube, namespace, name, ...)`: outcome invalid, error or ok."""

    @functools.wraps(fn)
    async def wrapper(kube: Any, namespace: str, name: str, *args: Any, **kwargs: Any) -> _Outcome:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await fn(kube, namespace, name, *args, **kwargs)
            outcome = "invalid" if result.invalid is not None else "ok"
            return result
        finally:
            METRICS.reconciles.labels(namespace, name, outcome).inc()
            METRICS.reconcile_duration.labels(namespace, name).observe(time.perf_counter() - started)

    return wrapper


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve METRICS on http://host:port/metrics from a daemon thread (lives as long as the process)."""
    start_http_server(port, addr=host, registry=METRICS.registry)
