"""The KunServe memory planner and the warm-standby helpers (pure; property tests)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slofleet.instance import InstanceLoad, RequestClass, RequestInfo
from slofleet.policies.memory_planner import (
    MemberView,
    Parked,
    PlannerConfig,
    PlannerState,
    StandbyConfig,
    extra_blocks,
    greedy_group_size,
    member_from_load,
    plan,
    plan_scale_in,
    plan_scale_out,
    queued_demand_blocks,
    split_layers,
    votes_to_drop,
    wake_seconds,
    with_measured_wake,
)

CFG = PlannerConfig(vote_ticks=2, cooldown_s=30.0, max_group_size=4)
W = 12 * 12_600_000  # "base": 12 layers of ~12.6 MB
B = 12 * 2 * 128 * 256 * 2  # one 128-token block of KV, all layers


def member(
    i: int, usage: float, free: int, demand: int, model: str = "m", waiting: int | None = None
) -> MemberView:
    return MemberView(
        instance_id=f"i{i}",
        model=model,
        kv_usage=usage,
        kv_free_blocks=free,
        queued_demand_blocks=demand,
        waiting_requests=(1 if demand else 0) if waiting is None else waiting,
        layers_total=12,
        weight_bytes=W,
        kv_bytes_per_block=B,
    )


def hot(i: int, model: str = "m") -> MemberView:
    return member(i, 0.99, 10, 400, model)


def run(
    ticks: list[list[MemberView]], state: PlannerState | None = None, start: float = 0.0, step: float = 1.0
):
    state = state or PlannerState()
    out = []
    for n, members in enumerate(ticks):
        actions, state = plan(members, state, start + n * step, CFG)
        out.append(actions)
    return out, state


@given(st.integers(1, 96), st.integers(1, 96))
def test_split_layers_is_a_contiguous_partition_within_one_layer(layers: int, g: int) -> None:
    if g > layers:
        with pytest.raises(ValueError, match="group_size"):
            split_layers(layers, g)
        return
    ranges = split_layers(layers, g)
    assert len(ranges) == g and ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@given(st.integers(0, 10**6), st.integers(0, 10**5), st.integers(1, 10**10), st.integers(1, 10**8))
def test_greedy_group_size_is_the_smallest_that_covers_the_demand(demand, free, weight, per_block) -> None:
    g = greedy_group_size(demand, free, weight, per_block, 2, 8)
    assert 2 <= g <= 8
    covers = free + extra_blocks(g, weight, per_block) >= demand
    assert covers or g == 8
    if g > 2:
        assert free + extra_blocks(g - 1, weight, per_block) < demand


def test_extra_blocks_matches_the_capacity_arithmetic() -> None:
    # Two members: each frees half its weights; the group gains W / B whole-model blocks.
    assert extra_blocks(2, W, B) == W // B
    assert extra_blocks(4, W, B) == 3 * W // B
    assert extra_blocks(1, W, B) == 0


def test_a_vote_needs_both_full_kv_and_a_queue_that_does_not_fit() -> None:
    assert votes_to_drop(member(0, 0.96, 10, 10), CFG)
    assert not votes_to_drop(member(0, 0.94, 10, 400), CFG)  # not full
    assert not votes_to_drop(member(0, 0.99, 500, 400), CFG)  # queue fits in the free blocks
    assert not votes_to_drop(member(0, 0.99, 0, 0), CFG)  # full but nothing queued


def test_two_hot_instances_group_after_the_vote_holds_and_split_when_calm() -> None:
    (first, second), state = run([[hot(0), hot(1)], [hot(0), hot(1)]])
    assert first == ()  # one tick is not enough (hysteresis)
    (action,) = second
    assert action.kind == "drop" and action.group.members == ("i0", "i1")
    assert action.group.keep == ((0, 6), (6, 12))
    assert action.dropped_layers("i0", 12) == list(range(6, 12))
    assert action.dropped_layers("i1", 12) == list(range(0, 6))

    falling = [[member(0, 0.4 - 0.01 * k, 900, 0), member(1, 0.4 - 0.01 * k, 900, 0)] for k in range(5)]
    early, state = run(falling, state, start=2.0)
    assert all(a == () for a in early), "no split before the cooldown"
    late, state = run(falling[:3], state, start=40.0)
    kinds = [a.kind for actions in late for a in actions]
    assert kinds == ["restore"] and state.groups == ()
    again, _ = run([[hot(0), hot(1)]] * 3, state, start=45.0)
    assert all(a == () for a in again), "released instances wait out the cooldown before regrouping"


def test_restore_never_happens_while_anything_is_queued_or_usage_rises() -> None:
    (_, (_drop,)), state = run([[hot(0), hot(1)]] * 2)
    queued = [[member(0, 0.3, 900, 5), member(1, 0.2, 900, 0)] for _ in range(5)]
    out, state = run(queued, state, start=100.0)
    assert all(a == () for a in out)
    rising = [[member(0, 0.1 + 0.05 * k, 900, 0), member(1, 0.1, 900, 0)] for k in range(5)]
    out, _ = run(rising, state, start=200.0)
    assert all(a == () for a in out)


def test_a_lone_hot_instance_does_not_drag_an_idle_one_into_a_group() -> None:
    out, _ = run([[hot(0), member(1, 0.1, 9000, 0)]] * 4)
    assert all(a == () for a in out)  # 1 of 2 is no majority; migration is the tool here


def test_the_greedy_size_grows_with_demand_and_fills_with_the_least_loaded() -> None:
    per_member = W // B
    big = [member(i, 0.99, 10, 2 * per_member) for i in range(3)] + [member(3, 0.2, 5000, 0)]
    out, _ = run([big, big])
    (action,) = out[1]
    assert len(action.group.members) == 4  # 3 voters (majority) + the idle one; demand needs g=4
    small = [member(i, 0.99, 10, per_member // 4) for i in range(4)]
    out, _ = run([small, small])
    assert [len(a.group.members) for a in out[1]] == [2, 2]


def test_a_member_that_disappears_restores_its_group() -> None:
    (_, (_drop,)), state = run([[hot(0), hot(1)]] * 2)
    actions, state = plan([hot(0)], state, 5.0, CFG)
    assert [a.kind for a in actions] == ["restore"] and state.groups == ()


member_strategy = st.builds(
    lambda i, model, usage, free, demand: member(i, usage, free, demand, model),
    st.integers(0, 7),
    st.sampled_from(["a", "b"]),
    st.floats(0, 1),
    st.integers(0, 2000),
    st.integers(0, 2000),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(member_strategy, max_size=8), min_size=1, max_size=12))
def test_planner_invariants(ticks: list[list[MemberView]]) -> None:
    state = PlannerState()
    for n, raw in enumerate(ticks):
        members = list({m.instance_id: m for m in raw}.values())
        now = n * 7.0
        actions, new = plan(members, state, now, CFG)
        seen: set[str] = set()
        for g in new.groups:
            assert not seen & set(g.members), "an instance is in two groups"
            seen |= set(g.members)
            assert CFG.min_group_size <= len(g.members) <= CFG.max_group_size
            assert len({m.model for m in members if m.instance_id in g.members}) <= 1
        for a in actions:
            if a.kind == "drop":
                views = [m for m in members if m.instance_id in a.group.members]
                voting = [m for m in views if votes_to_drop(m, CFG)]
                assert len(voting) * 2 > len(views), "a group formed without a majority"
                assert not any(a.group.members[0] in g.members for g in state.groups)
            else:
                assert a.group in state.groups
                live = [m for m in members if m.instance_id in a.group.members]
                if len(live) == len(a.group.members):
                    assert all(m.queued_demand_blocks == 0 for m in live)
                    assert now - a.group.formed_s >= CFG.cooldown_s
        state = new


def test_queued_demand_from_an_instance_load() -> None:
    reqs = tuple(
        RequestInfo(f"r{i}", RequestClass.INTERACTIVE, 0, prompt_tokens=300, max_tokens=10) for i in range(4)
    )
    load = InstanceLoad("x", 2, 3, 0.97, 100, 1, 128, 64, requests=reqs, layers_total=12, layers_resident=12)
    assert queued_demand_blocks(load) == 3 * 3
    view = member_from_load(load, "m", W, B)
    assert view.queued_demand_blocks == 9 and votes_to_drop(view, CFG)
    idle = InstanceLoad("y", 0, 0, 0.1, 100, 90, 128, 64)
    assert queued_demand_blocks(idle) == 0


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="restore_usage"):
        PlannerConfig(drop_usage=0.4, restore_usage=0.5)
    with pytest.raises(ValueError, match="min_group_size"):
        PlannerConfig(min_group_size=1)
    with pytest.raises(ValueError, match="host_to_device"):
        StandbyConfig(host_to_device_bytes_per_s=0)


SB = StandbyConfig(cold_start_s=60.0, wake_overhead_s=0.5, host_to_device_bytes_per_s=20e9,
                   host_memory_budget_bytes=40 * 10**9, max_standby=2, standby_ttl_s=600.0)  # fmt: skip


def test_wake_time_is_overhead_plus_bytes_over_bandwidth() -> None:
    assert wake_seconds(16 * 10**9, SB) == pytest.approx(0.5 + 0.8)


def test_scale_out_wakes_parked_instances_first_then_cold_starts() -> None:
    parked = [Parked("slow", 16 * 10**9, 0.0, wake_s=5.0), Parked("fast", 16 * 10**9, 0.0)]
    out = plan_scale_out(3, parked, SB)
    assert out.wake == ("fast", "slow") and out.cold_starts == 1 and out.ready_s == 60.0
    out = plan_scale_out(1, parked, SB)
    assert out.wake == ("fast",) and out.cold_starts == 0 and out.ready_s == pytest.approx(1.3)
    useless = [with_measured_wake(Parked("p", 10, 0.0), 90.0)]
    assert plan_scale_out(1, useless, SB).wake == ()  # waking it is slower than a new pod
    assert plan_scale_out(0, parked, SB) == plan_scale_out(-1, parked, SB)


@given(
    st.lists(st.integers(1, 30 * 10**9), max_size=6),
    st.lists(st.tuples(st.integers(1, 30 * 10**9), st.floats(0, 2000)), max_size=4),
)
def test_scale_in_parks_within_budget_and_expires_old_standby(removing, parked_raw) -> None:
    now = 2000.0
    parked = [Parked(f"p{i}", b, now - age) for i, (b, age) in enumerate(parked_raw)]
    out = plan_scale_in([(f"r{i}", b) for i, b in enumerate(removing)], parked, now, SB)
    assert sorted(out.park + out.delete) == sorted([f"r{i}" for i in range(len(removing))] + [
        p.instance_id for p in parked if now - p.since_s >= SB.standby_ttl_s
    ])  # fmt: skip
    kept = [p for p in parked if p.instance_id not in out.delete]
    assert len(kept) + len(out.park) <= max(SB.max_standby, len(kept))
    parked_bytes = sum(b for i, b in enumerate(removing) if f"r{i}" in out.park)
    if out.park:
        assert sum(p.weight_bytes for p in kept) + parked_bytes <= SB.host_memory_budget_bytes


def test_no_standby_without_a_host_memory_budget() -> None:
    out = plan_scale_in([("a", 10)], [], 0.0, StandbyConfig())
    assert out == plan_scale_in([("a", 10)], [], 0.0, StandbyConfig(max_standby=5))
    assert out.park == () and out.delete == ("a",)
