"""The pure migration policy (slofleet/policies/migration.py): examples and hypothesis properties."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from slofleet.instance import InstanceLoad, RequestClass, RequestInfo
from slofleet.policies.freeness import compute_freeness, split_running_queued
from slofleet.policies.migration import (
    Migration,
    MigrationConfig,
    Reason,
    Strategy,
    _working,
    plan_migrations,
)

BLOCK = 16
TOTAL = 1000


def req(rid: str, prompt: int, generated: int = 0, priority: int = 0, max_tokens: int = 64) -> RequestInfo:
    return RequestInfo(rid, RequestClass.INTERACTIVE, priority, prompt, max_tokens, generated)


def inst(
    iid: str,
    requests: list[RequestInfo],
    *,
    running: int | None = None,
    draining: bool = False,
    healthy: bool = True,
    total: int = TOTAL,
    high_priority_below: int = 0,
) -> InstanceLoad:
    """An instance whose engine numbers agree with its requests, freeness as the sidecar computes it."""
    n_run = len(requests) if running is None else running
    run = requests[:n_run]
    used = sum(-(-(r.prompt_tokens + r.generated_tokens) // BLOCK) for r in run)
    f = compute_freeness(
        total_blocks=total,
        used_blocks=used,
        running_requests=n_run,
        block_size_tokens=BLOCK,
        requests=requests,
        draining=draining,
        high_priority_below=high_priority_below,
    )
    return InstanceLoad(
        instance_id=iid,
        running_requests=n_run,
        waiting_requests=len(requests) - n_run,
        kv_usage_fraction=used / total,
        kv_total_blocks=total,
        kv_free_blocks=total - used,
        block_size_tokens=BLOCK,
        concurrency_limit=256,
        draining=draining,
        healthy=healthy,
        freeness=f.freeness,
        requests=tuple(requests),
    )


CFG = MigrationConfig(out_threshold=40.0, in_threshold=60.0)


def test_overloaded_instance_sends_its_shortest_request_to_the_freest() -> None:
    busy = inst("a", [req(f"a{i}", 800 + 160 * i) for i in range(10)])  # ~ (1000-955)/10 = 4.5
    light = inst("b", [req("b0", 100)])
    lighter = inst("c", [])
    plan = plan_migrations([light, busy, lighter], CFG)
    assert plan == [Migration("a0", "a", "c", Reason.LOAD_BALANCE, 50)]


def test_strategies_pick_longest_and_last_come() -> None:
    reqs = [req("x", 900), req("y", 2000), req("z", 300)]
    busy = inst("a", reqs, total=300)
    free = inst("b", [])
    longest = plan_migrations([busy, free], MigrationConfig(40, 60, Strategy.LONGEST))
    last = plan_migrations([busy, free], MigrationConfig(40, 60, Strategy.LAST_COME))
    shortest = plan_migrations([busy, free], MigrationConfig(40, 60, Strategy.SHORTEST))
    assert [m.request_id for m in longest] == ["y"]
    assert [m.request_id for m in last] == ["z"]
    assert [m.request_id for m in shortest] == ["z"]


def test_drain_moves_every_running_request_and_spreads_them() -> None:
    draining = inst("a", [req(f"a{i}", 1000) for i in range(6)], draining=True)
    plan = plan_migrations([draining, inst("b", []), inst("c", [])], MigrationConfig(max_migrations=10))
    assert sorted(m.request_id for m in plan) == [f"a{i}" for i in range(6)]
    assert {m.reason for m in plan} == {Reason.DRAIN}
    assert {m.destination for m in plan} == {"b", "c"}


def test_head_of_line_demand_triggers_defragmentation() -> None:
    # Three running requests leave room, but the queued head needs 50 blocks more than is left.
    reqs = [req("r0", 4000), req("r1", 4000), req("r2", 4000), req("q", 6400)]
    src = inst("a", reqs, running=3)
    assert src.freeness < CFG.out_threshold
    plan = plan_migrations([src, inst("b", [])], CFG)
    assert [(m.request_id, m.reason) for m in plan] == [("r0", Reason.DEFRAGMENT)]


def test_priority_headroom_moves_low_priority_requests_only() -> None:
    reqs = [req("hi", 1000, priority=-1, max_tokens=13000), req("lo", 1200, priority=5)]
    src = inst("a", reqs, high_priority_below=0)
    plan = plan_migrations([src, inst("b", [])], CFG)
    assert [(m.request_id, m.reason) for m in plan] == [("lo", Reason.PRIORITY)]


def test_nothing_moves_when_everyone_is_free_enough_or_no_destination_fits() -> None:
    assert plan_migrations([inst("a", [req("a0", 100)]), inst("b", [])], CFG) == []
    full = inst("a", [req(f"a{i}", 1500) for i in range(10)])
    also_full = inst("b", [req(f"b{i}", 1500) for i in range(10)])
    assert plan_migrations([full, also_full], CFG) == []


def test_in_flight_requests_are_not_planned_again() -> None:
    busy = inst("a", [req(f"a{i}", 800 + 160 * i) for i in range(10)])
    plan = plan_migrations([busy, inst("b", [])], CFG, in_flight={"a0"})
    assert [m.request_id for m in plan] == ["a1"]


@st.composite
def fleets(draw: st.DrawFn) -> list[InstanceLoad]:
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        k = draw(st.integers(0, 8))
        reqs = [
            req(
                f"i{i}r{j}",
                draw(st.integers(1, 3000)),
                draw(st.integers(0, 500)),
                draw(st.sampled_from([-1, 0, 3])),
                draw(st.integers(1, 2000)),
            )
            for j in range(k)
        ]
        running = draw(st.integers(0, k))
        total = draw(st.integers(50, 2000))
        used = sum(-(-(r.prompt_tokens + r.generated_tokens) // BLOCK) for r in reqs[:running])
        if used > total:
            total = used + draw(st.integers(0, 50))
        out.append(
            inst(
                f"i{i}",
                reqs,
                running=running,
                draining=draw(st.booleans()) and i > 0,
                healthy=draw(st.integers(0, 9)) > 0,
                total=total,
            )
        )
    return out


configs = st.builds(
    MigrationConfig,
    out_threshold=st.floats(-50, 200),
    in_threshold=st.floats(-50, 300),
    strategy=st.sampled_from(list(Strategy)),
    max_migrations=st.integers(0, 8),
    high_priority_below=st.sampled_from([0, 1]),
)


@settings(max_examples=300, deadline=None)
@given(fleets(), configs, st.randoms(use_true_random=False))
def test_properties(loads: list[InstanceLoad], cfg: MigrationConfig, rnd: object) -> None:
    plan = plan_migrations(loads, cfg)
    shuffled = list(loads)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert plan_migrations(shuffled, cfg) == plan, "input order must not matter"
    assert len(plan) <= cfg.max_migrations
    by_id = {x.instance_id: x for x in loads}
    assert len({m.request_id for m in plan}) == len(plan), "a request moves at most once a round"
    placed: dict[str, int] = {}
    for m in plan:
        src, dst = by_id[m.source], by_id[m.destination]
        assert m.source != m.destination
        assert dst.healthy and not dst.draining and dst.freeness > cfg.in_threshold
        assert src.draining or src.freeness < cfg.out_threshold
        running = {r.request_id: r for r in split_running_queued(src.requests, src.running_requests)[0]}
        assert m.request_id in running, "only running requests migrate"
        if not src.draining:
            assert running[m.request_id].priority >= cfg.high_priority_below
            assert m.reason is not Reason.DRAIN
        else:
            assert m.reason is Reason.DRAIN
        placed[m.destination] = placed.get(m.destination, 0) + m.blocks
        assert placed[m.destination] <= dst.kv_free_blocks, "destination has room for what it receives"
    non_drain = [m for m in plan if m.reason is not Reason.DRAIN]
    assert len({m.source for m in non_drain}) == len(non_drain), "one request per busy source per round"


@settings(max_examples=200, deadline=None)
@given(fleets(), configs)
def test_load_balancing_moves_shrink_the_gap(loads: list[InstanceLoad], cfg: MigrationConfig) -> None:
    touched: set[str] = set()
    for m in plan_migrations(loads, cfg):
        fresh = not ({m.source, m.destination} & touched)
        touched |= {m.source, m.destination}
        if m.reason is Reason.DRAIN or not fresh:  # later moves see the round's earlier ones
            continue
        s, d = (
            _working(next(x for x in loads if x.instance_id == m.source)),
            _working(next(x for x in loads if x.instance_id == m.destination)),
        )
        before = d.freeness() - s.freeness()
        after = d.freeness_after(m.blocks, 1) - s.freeness_after(-m.blocks, -1)
        assert math.isfinite(before) and abs(after) < before
