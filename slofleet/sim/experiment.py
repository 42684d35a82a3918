"""One comparison run: the same workload through every selected policy.

Everything a run needs is in `Experiment` (plain values), so `slofleet simulate`, the benchmark
scripts and the tests build the same runs the same way, and a result can be reproduced from the
printed settings. Runs are deterministic: trace shaping, batch lengths and capacity probing are
seeded, and the simulator itself draws no random numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from slofleet.calibration import EngineCalibration
from slofleet.instance import Pool
from slofleet.policies.baselines import (
    FreenessAutoscaler,
    HpaConfig,
    QueueLengthAutoscaler,
    StaticAutoscaler,
    UtilizationAutoscaler,
)
from slofleet.policies.global_autoscaler import (
    Autoscaler,
    ChironAutoscaler,
    ChironConfig,
    PoolBounds,
)
from slofleet.policies.local_autoscaler import LocalAutoscalerConfig
from slofleet.policies.migration import MigrationConfig
from slofleet.sim.kunserve import KunServeConfig
from slofleet.sim.simulator import SimConfig, SimResult, Simulator, SloSpec
from slofleet.sim.sizing import PeakEstimate, instance_capacity, peak_instances
from slofleet.sim.traces import Trace
from slofleet.sim.workload import BatchJob

POLICIES = ("static-peak", "hpa-utilization", "keda-queue", "llumnix-freeness", "chiron")


@dataclass(frozen=True)
class Experiment:
    trace: Trace
    jobs: list[BatchJob]
    calibration: EngineCalibration
    slo: SloSpec = field(default_factory=SloSpec)
    capacity_rps: float = 0.0
    # requests in flight per instance at capacity (0: measured with the capacity)
    concurrency_at_capacity: float = 0.0
    static_replicas: int = 0
    max_replicas: int = 0
    hpa_metric: str = "running"
    # 0: 0.8 x the measured concurrency at capacity (running) or 0.7 (kv)
    hpa_target: float = 0.0
    keda_target: float = 10.0
    chiron: ChironConfig = field(default_factory=ChironConfig)
    local_autoscaler: LocalAutoscalerConfig | None = None
    local_window_s: float = 5.0
    # KunServe's parameter drop and pipeline mode for every policy (None: off)
    kunserve: KunServeConfig | None = None
    # Llumnix's live migration for every policy (None: off)
    migration: MigrationConfig | None = None


def size(exp: Experiment) -> PeakEstimate:
    """Capacity of one instance (probed unless given) and the peak instance count."""
    cap, conc = exp.capacity_rps, exp.concurrency_at_capacity
    if not cap or not conc:
        cap, conc = instance_capacity(exp.trace, exp.calibration, exp.slo)
    return peak_instances(exp.trace, exp.jobs, cap, conc)


def build_policy(name: str, exp: Experiment, peak: PeakEstimate) -> Autoscaler:
    static_n = exp.static_replicas or peak.instances
    cap = exp.max_replicas or 2 * static_n
    bounds = PoolBounds(1, cap)
    hpa = HpaConfig(bounds=bounds)
    if name == "static-peak":
        if exp.static_replicas:
            return StaticAutoscaler(exp.static_replicas)
        return StaticAutoscaler(peak.instances - peak.batch_instances, peak.batch_instances)
    if name == "hpa-utilization":
        target = exp.hpa_target or (
            0.8 * peak.concurrency_at_capacity if exp.hpa_metric == "running" else 0.7
        )
        return UtilizationAutoscaler(exp.hpa_metric, max(target, 1e-3), hpa)
    if name == "keda-queue":
        return QueueLengthAutoscaler(exp.keda_target, hpa)
    if name == "llumnix-freeness":
        return FreenessAutoscaler(bounds=bounds)
    if name == "chiron":
        c = exp.chiron
        chiron_bounds = {
            Pool.INTERACTIVE: PoolBounds(c.bounds[Pool.INTERACTIVE].min, cap),
            Pool.MIXED: PoolBounds(c.bounds[Pool.MIXED].min, cap),
            Pool.BATCH: PoolBounds(c.bounds[Pool.BATCH].min, cap),
        }
        return ChironAutoscaler(replace(c, bounds=chiron_bounds))
    raise ValueError(f"policy {name!r}: choose from {', '.join(POLICIES)} or 'all'")


def initial_replicas(policy: Autoscaler, exp: Experiment, peak: PeakEstimate) -> dict[Pool, int]:
    """Every autoscaled policy starts warm, sized by the static rule (`sizing.peak_instances`:
    busiest `peak.window_s` at the probed capacity) for the first three minutes: a trace's first
    minute under-counts (requests already in flight when recording began are not in it), while the
    fleet it was recorded on had been running. Static starts at its fixed size."""
    if isinstance(policy, StaticAutoscaler):
        return policy.initial()
    windows = exp.trace.rate_per_window(peak.window_s)
    rate = float(windows[: max(1, int(180.0 // peak.window_s))].max()) if len(windows) else 0.0
    n0 = max(2, math.ceil(rate / peak.capacity_rps)) if peak.capacity_rps > 0 else 2
    if Pool.INTERACTIVE in policy.pools:
        mixed = max(1, math.ceil(exp.chiron.mixed_fraction * n0))
        return {Pool.INTERACTIVE: max(1, n0 - mixed), Pool.MIXED: mixed}
    return {Pool.MIXED: n0}


def run(
    exp: Experiment,
    names: list[str],
    progress: Callable[[str], None] = lambda _: None,
    peak: PeakEstimate | None = None,
) -> tuple[PeakEstimate, list[SimResult]]:
    peak = peak or size(exp)
    progress(f"sizing: {peak.describe()}")
    results = []
    for name in names:
        policy = build_policy(name, exp, peak)
        cfg = SimConfig(
            calibration=exp.calibration,
            slo=exp.slo,
            initial_replicas=initial_replicas(policy, exp, peak),
            local_autoscaler=exp.local_autoscaler,
            local_window_s=exp.local_window_s,
            kunserve=exp.kunserve,
            migration=exp.migration,
        )
        t0 = time.perf_counter()
        result = Simulator(exp.trace, exp.jobs, policy, cfg).run()
        result.wall_s = time.perf_counter() - t0
        progress(f"{name}: done in {result.wall_s:.1f} s")
        results.append(result)
    return peak, results
