"""KunServe's pipeline mode in the simulator (issue 10, item 5): its arithmetic agrees with the
memory planner's, and a KV-exhausting burst is served better with the mode than without it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slofleet.calibration import load_calibration
from slofleet.instance import Pool
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.memory_planner import extra_blocks
from slofleet.sim.kunserve import (
    KunServeConfig,
    PipelineCosts,
    drop_seconds,
    gained_tokens,
    member_calibration,
    restore_seconds,
)
from slofleet.sim.simulator import SimConfig, Simulator
from slofleet.sim.traces import Trace, load_trace, shape

H100 = load_calibration("llama3-8b-h100")
# The KV an 8B keeps at a GPU memory share of ~0.3: the memory-bound regime the mode is for.
TIGHT = replace(H100, kv_capacity_tokens=45_000)


@given(
    g=st.integers(2, 8),
    weights=st.integers(10**6, 10**12),
    per_token=st.integers(1, 10**6),
)
def test_group_gain_is_the_planners(g: int, weights: int, per_token: int) -> None:
    """g members together gain what the planner counted on when it chose g (within rounding)."""
    cal = replace(H100, layer_weight_bytes=weights, kv_bytes_per_token=per_token)
    block = cal.block_size_tokens
    planned_tokens = extra_blocks(g, weights, per_token * block) * block
    got = g * gained_tokens(cal, g)
    assert planned_tokens - block - g <= got <= planned_tokens + block + g


def test_member_costs() -> None:
    costs = PipelineCosts(hop_s=2e-4)
    assert member_calibration(H100, 1, costs) is H100
    m = member_calibration(H100, 3, costs)
    assert m.kv_capacity_tokens == H100.kv_capacity_tokens + gained_tokens(H100, 3) > H100.kv_capacity_tokens
    # Two stage boundaries: two more iteration overheads and two hops per step, same compute.
    slower = m.step_s(64, 10_000, 64) - H100.step_s(64, 10_000, 64)
    assert slower == pytest.approx(2 * (H100.overhead_s + 2e-4))
    # Restoring moves the weights back as well as the KV, so it is never shorter than the drop.
    assert restore_seconds(H100, 2, 40_000, costs) > drop_seconds(H100, 2, 40_000, costs) > 0
    assert drop_seconds(H100, 2, 0, costs) == 0


def test_mode_needs_model_sizes() -> None:
    cal = load_calibration("tiny-cpu")
    trace = Trace("t", np.array([0.0]), np.array([16]), np.array([4]))
    cfg = SimConfig(calibration=cal, kunserve=KunServeConfig())
    with pytest.raises(ValueError, match="layer_weight_bytes"):
        Simulator(trace, (), StaticAutoscaler(1), cfg)


def _burst() -> Trace:
    t = shape(load_trace("azure-conv"), start_s=600, duration_s=120, load_scale=8)
    out = np.minimum(t.output_tokens, 4096)
    return Trace(t.name, t.arrival_s, np.minimum(t.prompt_tokens, 32768 - out), out)


def _run(trace: Trace, kunserve: KunServeConfig | None):
    cfg = SimConfig(
        calibration=TIGHT, initial_replicas={Pool.MIXED: 4}, kunserve=kunserve, sample_interval_s=5.0
    )
    return Simulator(trace, (), StaticAutoscaler(4), cfg).run()


def test_burst_that_exhausts_kv_is_served_by_pipeline_groups() -> None:
    trace = _burst()
    plain = _run(trace, None)
    mode = _run(trace, KunServeConfig())
    assert plain.groups_formed == 0 and plain.preemptions > 0  # the burst does exhaust KV
    # Every request completes in both; with the mode, groups form during the burst and all split
    # again once it has passed (no member is left serving as a pipeline).
    assert len(plain.ttft) == len(mode.ttft) == len(trace)
    assert mode.groups_formed >= 1 and mode.groups_split == mode.groups_formed
    assert max(mode.samples["grouped"]) >= 2 and mode.samples["grouped"][-1] == 0
    assert mode.preemptions < plain.preemptions
    assert np.percentile(mode.ttft, 99) * 5 < np.percentile(plain.ttft, 99)
