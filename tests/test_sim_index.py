"""The simulator's dispatch index returns exactly what `dispatch.choose` (freeness) returns."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from slofleet.calibration import load_calibration
from slofleet.instance import InstanceLoad, Pool
from slofleet.policies import dispatch
from slofleet.policies.global_autoscaler import ChironAutoscaler
from slofleet.sim.dispatch_index import FreenessIndex
from slofleet.sim.simulator import SimConfig, Simulator
from slofleet.sim.traces import load_trace, shape
from slofleet.sim.workload import make_batch_jobs

TOTAL = 64
BS = 16

instance_state = st.tuples(
    st.integers(0, TOTAL),  # used blocks
    st.integers(0, 12),  # in flight
    st.integers(1, 12),  # concurrency limit
    st.booleans(),  # draining
)


def _loads(states: dict[int, tuple[int, int, int, bool]]) -> list[InstanceLoad]:
    return [
        InstanceLoad(
            instance_id=f"mixed-{k}",
            running_requests=n,
            waiting_requests=0,
            kv_usage_fraction=used / TOTAL,
            kv_total_blocks=TOTAL,
            kv_free_blocks=TOTAL - used,
            block_size_tokens=BS,
            concurrency_limit=limit,
            draining=draining,
            pool=Pool.MIXED,
        )
        for k, (used, n, limit, draining) in states.items()
    ]


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(st.tuples(st.integers(0, 11), instance_state), min_size=1, max_size=60),
    demands=st.lists(st.integers(1, 3 * TOTAL), min_size=1, max_size=5),
)
def test_index_matches_choose_after_any_sequence_of_updates(
    history: list[tuple[int, tuple[int, int, int, bool]]], demands: list[int]
) -> None:
    """Any interleaving of updates (stale entries, rebuilds, instances leaving) and any demand:
    the index's pick is `choose`'s pick over the latest state of every instance, within limits
    (the interactive overflow past them is the simulator's `_burst`, checked by the whole-run test
    below)."""
    index = FreenessIndex()
    state: dict[int, tuple[int, int, int, bool]] = {}
    for slot, s in history:
        state[slot] = s
        used, n, limit, draining = s
        index.update(slot, f"mixed-{slot}", TOTAL - used, n, not draining and n < limit)
    loads = _loads(state)
    for demand in demands:
        req = dispatch.DispatchRequest(prompt_tokens=demand * BS, max_tokens=0)
        expected = dispatch.choose(loads, req, dispatch.DispatchParams(burst_factor=1.0)).instance_id
        got = index.best(demand)
        assert (None if got is None else f"mixed-{got}") == expected


def test_whole_run_with_preemption_drains_and_batch_is_identical_with_and_without_the_index() -> None:
    """Chiron (local limits, mixed pool, scale events) over a busy slice with batch jobs: every
    latency and count is the same whether dispatch uses the index or scores
    the whole fleet through `dispatch.choose`."""
    cal = load_calibration("llama3-8b-h100")
    trace = shape(load_trace("azure-conv"), start_s=600, duration_s=180, load_scale=12, seed=5)
    jobs = make_batch_jobs(
        jobs=2, requests_per_job=1500, deadline_s=300.0, first_submit_s=10.0, last_submit_s=120.0,
        lengths_from=load_trace("azure-code"), seed=5,
    )  # fmt: skip
    results = []
    for indexed in (True, False):
        cfg = SimConfig(
            calibration=cal,
            initial_replicas={Pool.MIXED: 4},
            horizon_s=600.0,
            dispatch_index=indexed,
        )
        results.append(Simulator(trace, jobs, ChironAutoscaler(), cfg).run())
    a, b = results
    assert len(a.ttft) > 1000 and a.scale_events and a.batch_on_time > 0
    assert np.array_equal(a.ttft, b.ttft) and np.array_equal(a.itl, b.itl)
    assert (a.batch_on_time, a.evictions, a.preemptions, a.gpu_hours) == (
        b.batch_on_time,
        b.evictions,
        b.preemptions,
        b.gpu_hours,
    )
    assert a.scale_events == b.scale_events
