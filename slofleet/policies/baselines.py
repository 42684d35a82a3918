"""Baseline fleet autoscalers that Chiron is compared against, in their usual configurations.

Each runs the whole fleet as one mixed pool with the engine's fixed concurrency limit
(`max_num_seqs`), no batch preemption and no deadline awareness: that is how these autoscalers are
deployed in practice. They implement the same `Autoscaler` protocol as `ChironAutoscaler`, so the
simulator (and, if wanted, the operator) runs them through the same loop:

- `StaticAutoscaler`: a fixed count, provisioned for the peak (the cost reference); optionally
  partitioned into interactive and batch instances.
- `UtilizationAutoscaler`: the Kubernetes HPA algorithm on a utilization metric (mean KV usage or
  mean running requests per instance), with its default 10 % tolerance, 300 s scale-down
  stabilization and scale-up limit of max(4 pods, 100 %) per period.
- `QueueLengthAutoscaler`: KEDA-style, replicas = ceil(total waiting requests / target per
  replica) over the same HPA machinery (KEDA drives an HPA with an AverageValue target).
- `FreenessAutoscaler`: Llumnix's rule, one instance out when the mean freeness falls below 10,
  one in when it rises above 60.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slofleet.instance import InstanceLoad, Pool
from slofleet.policies.global_autoscaler import (
    FleetObservation,
    PoolBounds,
    ScaleDecision,
    choose_scale_in,
)

_POOLS: tuple[Pool, ...] = (Pool.MIXED,)


def _decision(obs: FleetObservation, target: int, reason: str) -> ScaleDecision:
    cur = int(obs.replicas.get(Pool.MIXED, 0))
    scale_in = {Pool.MIXED: choose_scale_in(obs.loads, Pool.MIXED, cur - target)} if target < cur else {}
    return ScaleDecision(obs.now_s, {Pool.MIXED: cur}, {Pool.MIXED: target}, {Pool.MIXED: reason}, scale_in)


def _serving(obs: FleetObservation) -> list[InstanceLoad]:
    return [ld for ld in obs.loads if not ld.draining and ld.healthy]


class StaticAutoscaler:
    """Always `replicas` instances: peak provisioning.

    With `batch_replicas`, the fleet is partitioned as a capacity planner with a batch workload
    provisions it: `replicas` interactive-only instances sized for the interactive peak and
    `batch_replicas` batch-only ones sized for the batch throughput. Without a partition, batch
    work (which has no preemption here) fills every instance and an interactive SLO cannot be held
    at any size: on the azure-conv target run, 67 mixed instances reach 96 % attainment with
    batch and 99.96 % without it."""

    name = "static-peak"
    preempts_batch = False
    uses_local_autoscaler = False

    def __init__(self, replicas: int, batch_replicas: int = 0) -> None:
        if replicas < 1 or batch_replicas < 0:
            raise ValueError(
                f"replicas={replicas}, batch_replicas={batch_replicas}: static provisioning needs at "
                "least 1 instance and no negative batch partition"
            )
        self.replicas = replicas
        self.batch_replicas = batch_replicas
        self.pools: tuple[Pool, ...] = (Pool.INTERACTIVE, Pool.BATCH) if batch_replicas else _POOLS

    def initial(self) -> dict[Pool, int]:
        """The fleet it holds, for a caller that starts it warm."""
        if self.batch_replicas:
            return {Pool.INTERACTIVE: self.replicas, Pool.BATCH: self.batch_replicas}
        return {Pool.MIXED: self.replicas}

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        if not self.batch_replicas:
            return _decision(obs, self.replicas, f"static provisioning at {self.replicas}")
        targets = self.initial()
        cur = {p: int(obs.replicas.get(p, 0)) for p in targets}
        scale_in = {p: choose_scale_in(obs.loads, p, cur[p] - n) for p, n in targets.items() if n < cur[p]}
        reasons = {p: f"static provisioning at {n} {p.value}" for p, n in targets.items()}
        return ScaleDecision(obs.now_s, cur, targets, reasons, scale_in)


@dataclass(frozen=True, slots=True)
class HpaConfig:
    bounds: PoolBounds = field(default_factory=lambda: PoolBounds(1, 1000))
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0
    min_step_up: int = 4
    max_step_up_fraction: float = 1.0


class _Hpa:
    """The HPA's replica calculation and behaviour (tolerance, stabilization, rate limit)."""

    def __init__(self, config: HpaConfig) -> None:
        self.config = config
        self.history: list[tuple[float, int]] = []

    def target(self, now_s: float, current: int, desired: int) -> int:
        c = self.config
        self.history = [(t, n) for t, n in self.history if t > now_s - c.scale_down_stabilization_s]
        self.history.append((now_s, desired))
        if desired < current:
            desired = max(n for _, n in self.history)
        if desired > current:
            desired = min(desired, current + max(c.min_step_up, math.ceil(c.max_step_up_fraction * current)))
        return c.bounds.clamp(desired)


class UtilizationAutoscaler:
    """HPA on mean KV usage (`metric="kv"`, target a fraction) or mean running requests per
    instance (`metric="running"`, target a count)."""

    name = "hpa-utilization"
    pools = _POOLS
    preempts_batch = False
    uses_local_autoscaler = False

    def __init__(self, metric: str = "kv", target: float = 0.7, config: HpaConfig | None = None) -> None:
        if metric not in ("kv", "running"):
            raise ValueError(f"metric={metric!r}: use 'kv' or 'running'")
        if target <= 0:
            raise ValueError(f"target={target}: must be > 0")
        self.metric, self.target_value = metric, target
        self.hpa = _Hpa(config or HpaConfig())

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        cur = int(obs.replicas.get(Pool.MIXED, 0))
        loads = _serving(obs)
        if not loads:
            return _decision(obs, self.hpa.config.bounds.clamp(max(cur, 1)), "no ready instance reports load")
        if self.metric == "kv":
            value = sum(ld.kv_usage_fraction for ld in loads) / len(loads)
        else:
            value = sum(ld.running_requests for ld in loads) / len(loads)
        ratio = value / self.target_value
        desired = cur if abs(ratio - 1.0) <= self.hpa.config.tolerance else math.ceil(len(loads) * ratio)
        target = self.hpa.target(obs.now_s, cur, desired)
        return _decision(obs, target, f"mean {self.metric} {value:.2f} vs target {self.target_value}")


class QueueLengthAutoscaler:
    """KEDA-style: replicas = ceil(waiting requests (gateway + engines) / target per replica)."""

    name = "keda-queue"
    pools = _POOLS
    preempts_batch = False
    uses_local_autoscaler = False

    def __init__(self, target_per_replica: float = 10.0, config: HpaConfig | None = None) -> None:
        if target_per_replica <= 0:
            raise ValueError(f"target_per_replica={target_per_replica}: must be > 0")
        self.target_per_replica = target_per_replica
        self.hpa = _Hpa(config or HpaConfig())

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        cur = int(obs.replicas.get(Pool.MIXED, 0))
        waiting = obs.interactive_queued + obs.batch_queued + sum(ld.waiting_requests for ld in obs.loads)
        desired = math.ceil(waiting / self.target_per_replica)
        target = self.hpa.target(obs.now_s, cur, desired)
        return _decision(obs, target, f"{waiting} waiting, target {self.target_per_replica}/replica")


class FreenessAutoscaler:
    """Llumnix: +1 instance if mean freeness < `scale_up_below`, -1 if > `scale_down_above`."""

    name = "llumnix-freeness"
    pools = _POOLS
    preempts_batch = False
    uses_local_autoscaler = False

    def __init__(
        self, scale_up_below: float = 10.0, scale_down_above: float = 60.0, bounds: PoolBounds | None = None
    ) -> None:
        if scale_up_below >= scale_down_above:
            raise ValueError(f"scale_up_below={scale_up_below} must be < scale_down_above={scale_down_above}")
        self.up, self.down = scale_up_below, scale_down_above
        self.bounds = bounds or PoolBounds(1, 1000)

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        cur = int(obs.replicas.get(Pool.MIXED, 0))
        loads = _serving(obs)
        if not loads:
            return _decision(obs, self.bounds.clamp(max(cur, 1)), "no ready instance reports load")
        mean = sum(ld.freeness for ld in loads) / len(loads)
        if mean < self.up:
            return _decision(obs, self.bounds.clamp(cur + 1), f"mean freeness {mean:.1f} < {self.up}")
        if mean > self.down:
            return _decision(obs, self.bounds.clamp(cur - 1), f"mean freeness {mean:.1f} > {self.down}")
        return _decision(
            obs, self.bounds.clamp(cur), f"mean freeness {mean:.1f} within [{self.up}, {self.down}]"
        )
