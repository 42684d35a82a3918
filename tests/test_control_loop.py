"""The control loop's pure part: the cap on the pools' total replicas."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from slofleet.instance import Pool
from slofleet.operator.control_loop import cap_total
from slofleet.policies.global_autoscaler import ScaleDecision

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
