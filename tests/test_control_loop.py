"""The control loop's pure parts: the cap on the pools' total replicas, and retiring the pools a
policy does not manage."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slofleet.instance import InstanceLoad, Pool
from slofleet.operator.control_loop import cap_total, retire_unused_pools
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.global_autoscaler import FleetObservation, ScaleDecision

POOLS = (Pool.INTERACTIVE, Pool.MIXED, Pool.BATCH)
counts = st.fixed_dictionaries({p: st.integers(0, 20) for p in POOLS})


@given(current=counts, targets=counts, cap=st.integers(0, 40))
def test_cap_total_trims_only_growth(current: dict[Pool, int], targets: dict[Pool, int], cap: int) -> None:
    decision = ScaleDecision(0.0, current, targets, {p: "why" for p in POOLS})
    capped = cap_total(decision, cap).targets
    for p in POOLS:
        # Never below both the current and the target count: a cap does not force a scale-in.
        assert min(current[p], targets[p]) <= capped[p] <= targets[p]
    if sum(min(current[p], targets[p]) for p in POOLS) <= cap:
        assert sum(capped.values()) <= cap


def test_cap_trims_the_largest_growth_and_says_so() -> None:
    d = ScaleDecision(
        0.0,
        {Pool.INTERACTIVE: 1, Pool.MIXED: 1},
        {Pool.INTERACTIVE: 3, Pool.MIXED: 2},
        {Pool.INTERACTIVE: "queue", Pool.MIXED: "queue"},
    )
    capped = cap_total(d, 3)
    assert capped.targets == {Pool.INTERACTIVE: 2, Pool.MIXED: 1}
    assert "capped at 3" in capped.reasons[Pool.INTERACTIVE]
    assert cap_total(d, None) is d


def load(iid: str, pool: Pool, running: int) -> InstanceLoad:
    return InstanceLoad(
        instance_id=iid, running_requests=running, waiting_requests=0, kv_usage_fraction=0.1,
        kv_total_blocks=100, kv_free_blocks=90, block_size_tokens=16, concurrency_limit=8, pool=pool,
    )  # fmt: skip


def test_pools_left_by_an_earlier_policy_are_drained_to_zero() -> None:
    """After a switch from chiron to static (mixed only), the interactive and batch Deployments
    still hold pods: they are retired, least loaded first, and the reason says why."""
    loads = (
        load("int-0", Pool.INTERACTIVE, 3), load("int-1", Pool.INTERACTIVE, 0),
        load("mix-0", Pool.MIXED, 1), load("batch-0", Pool.BATCH, 5),
    )  # fmt: skip
    desired = {Pool.INTERACTIVE: 2, Pool.MIXED: 1, Pool.BATCH: 1}
    static = StaticAutoscaler(2)
    obs = FleetObservation(now_s=0.0, replicas=desired, loads=loads, interactive_in_flight=4,
                           interactive_queued=0, interactive_attainment=1.0, batch_groups=())  # fmt: skip
    d = retire_unused_pools(static.decide(obs), desired, loads, static.name)
    assert d.targets == {Pool.MIXED: 2, Pool.INTERACTIVE: 0, Pool.BATCH: 0}
    assert d.scale_in == {Pool.INTERACTIVE: ("int-1", "int-0"), Pool.BATCH: ("batch-0",)}
    assert "not used by the static-peak policy" in d.reasons[Pool.INTERACTIVE]
    assert d.changed and "interactive 2->0" in d.summary()


def test_a_policy_that_manages_every_pool_retires_nothing() -> None:
    d = ScaleDecision(0.0, {Pool.MIXED: 1}, {Pool.MIXED: 1}, {Pool.MIXED: "ok"})
    assert retire_unused_pools(d, {Pool.MIXED: 1, Pool.BATCH: 0}, (), "x") is d
