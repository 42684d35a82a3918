"""Dispatch scoring and the prefix index: pure functions, checked with properties."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slofleet.instance import InstanceLoad, RequestClass, RequestInfo
from slofleet.policies.dispatch import (
    DispatchParams,
    DispatchPolicy,
    DispatchRequest,
    choose,
    freeness_after,
    virtual_usage_blocks,
)
from slofleet.prefix_index import PrefixIndex, block_hashes

BS = 16


def load(iid: str, n: int = 0, limit: int = 8, total: int = 1000, **kw: object) -> InstanceLoad:
    reqs = tuple(RequestInfo(f"{iid}-{i}", RequestClass.INTERACTIVE, 0, 32, 32) for i in range(n))
    used = n * 2
    return InstanceLoad(
        instance_id=iid,
        running_requests=n,
        waiting_requests=0,
        kv_usage_fraction=used / total,
        kv_total_blocks=total,
        kv_free_blocks=total - used,
        block_size_tokens=BS,
        concurrency_limit=limit,
        requests=reqs,
        **kw,  # type: ignore[arg-type]
    )


request_infos = st.builds(
    RequestInfo,
    request_id=st.uuids().map(str),
    request_class=st.sampled_from(list(RequestClass)),
    priority=st.integers(-5, 20),
    prompt_tokens=st.integers(1, 2000),
    max_tokens=st.integers(1, 2000),
    generated_tokens=st.integers(0, 200),
)


@st.composite
def loads(draw: st.DrawFn) -> list[InstanceLoad]:
    n = draw(st.integers(0, 6))
    out = []
    for i in range(n):
        reqs = tuple(draw(st.lists(request_infos, max_size=8)))
        total = draw(st.integers(0, 5000))
        free = draw(st.integers(0, total))
        out.append(
            InstanceLoad(
                instance_id=f"i{i}",
                running_requests=len(reqs),
                waiting_requests=draw(st.integers(0, 3)),
                kv_usage_fraction=0.0,
                kv_total_blocks=total,
                kv_free_blocks=free,
                block_size_tokens=draw(st.sampled_from([16, 128])),
                concurrency_limit=draw(st.integers(1, 12)),
                draining=draw(st.booleans()),
                healthy=draw(st.booleans()),
                requests=reqs,
            )
        )
    return out


dispatch_requests = st.builds(
    DispatchRequest,
    prompt_tokens=st.integers(0, 4000),
    max_tokens=st.integers(0, 4000),
    priority=st.integers(-5, 20),
    request_class=st.sampled_from(list(RequestClass)),
    prefix_hit_blocks=st.dictionaries(st.sampled_from([f"i{i}" for i in range(6)]), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None)
@given(
    loads(), dispatch_requests, st.sampled_from(list(DispatchPolicy)), st.integers(0, 100),
    st.sampled_from([1.0, 1.5, 2.0]),
)  # fmt: skip
def test_choice_always_respects_limits_and_is_order_independent(
    ls: list[InstanceLoad], req: DispatchRequest, policy: DispatchPolicy, rr: int, burst: float
) -> None:
    params = DispatchParams(policy=policy, burst_factor=burst)
    d = choose(ls, req, params, rr)
    interactive = req.request_class is RequestClass.INTERACTIVE

    def burst_room(x: InstanceLoad) -> bool:
        return x.healthy and not x.draining and x.in_flight < math.ceil(x.concurrency_limit * burst)

    if d.instance_id is None:
        # Nobody chosen only when nobody was eligible, within limits or (interactive) the burst bound.
        assert all(
            not x.has_room
            or (req.request_class is RequestClass.BATCH and x.in_flight >= x.concurrency_limit - 1)
            for x in ls
        )
        if interactive:
            assert not any(burst_room(x) for x in ls)
    else:
        chosen = next(x for x in ls if x.instance_id == d.instance_id)
        if d.burst:
            # Over its limit only for interactive work, only when no instance had room, and the
            # one least loaded relative to its limit.
            assert interactive and burst > 1.0 and burst_room(chosen)
            assert not any(x.has_room for x in ls)
            ratio = chosen.in_flight / chosen.concurrency_limit
            assert all(x.in_flight / x.concurrency_limit >= ratio for x in ls if burst_room(x))
        else:
            assert chosen.healthy and not chosen.draining and chosen.in_flight < chosen.concurrency_limit
        if req.request_class is RequestClass.BATCH:
            assert chosen.in_flight < chosen.concurrency_limit - params.batch_reserve_slots
    # Same inputs in another order: same answer (deterministic, shared with the simulator).
    assert choose(list(reversed(ls)), req, params, rr) == d


def test_interactive_overflow_goes_to_the_least_loaded_and_stops_at_the_burst_bound() -> None:
    """Every instance at its limit: an interactive request goes to the one least over it, a batch
    request gets none; at limit x burst_factor everywhere the interactive one queues too."""
    a, b = load("a", n=8, limit=8), load("b", n=5, limit=4)
    params = DispatchParams(burst_factor=1.5)
    d = choose([a, b], DispatchRequest(32, 32), params)
    assert (d.instance_id, d.burst, d.reason) == ("a", True, "burst")
    batch = DispatchRequest(32, 32, request_class=RequestClass.BATCH)
    assert choose([a, b], batch, params).instance_id is None
    assert choose([a, b], DispatchRequest(32, 32), DispatchParams(burst_factor=1.0)).instance_id is None
    full = [load("a", n=12, limit=8), load("b", n=6, limit=4)]
    assert choose(full, DispatchRequest(32, 32), params).reason == "no_capacity"


def test_burst_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="burst_factor"):
        DispatchParams(burst_factor=0.5)


@settings(max_examples=200, deadline=None)
@given(loads(), dispatch_requests)
def test_freeness_picks_the_highest_score(ls: list[InstanceLoad], req: DispatchRequest) -> None:
    d = choose(ls, req, DispatchParams())
    if d.instance_id is not None:
        scores = dict(d.scores)
        assert scores[d.instance_id] == max(scores.values())


@given(st.lists(request_infos, max_size=10), st.integers(-5, 20))
def test_more_demand_means_less_freeness(reqs: list[RequestInfo], prio: int) -> None:
    base = dataclasses.replace(
        load("a", total=100000), requests=tuple(reqs), running_requests=len(reqs), kv_free_blocks=100000
    )
    extra = RequestInfo("x", RequestClass.INTERACTIVE, prio, 500, 500)
    more = dataclasses.replace(base, requests=(*base.requests, extra), running_requests=len(reqs) + 1)
    req = DispatchRequest(100, 100, priority=prio)
    assert virtual_usage_blocks(more, prio, DispatchParams()) > virtual_usage_blocks(
        base, prio, DispatchParams()
    )
    assert freeness_after(more, req, DispatchParams()) < freeness_after(base, req, DispatchParams())


def test_freeness_prefers_the_instance_with_less_future_demand() -> None:
    # Same request count, but b's requests will still grow by far more KV (long max_tokens).
    a = load("a", n=2)
    long = tuple(RequestInfo(f"b-{i}", RequestClass.INTERACTIVE, 0, 32, 10000) for i in range(2))
    b = dataclasses.replace(load("b", n=2, total=1000), requests=long)
    assert choose([a, b], DispatchRequest(32, 32)).instance_id == "a"
    assert (
        choose(
            [a, b], DispatchRequest(32, 32), DispatchParams(policy=DispatchPolicy.LEAST_REQUESTS)
        ).instance_id
        == "a"
    )


def test_high_priority_headroom_steers_normal_work_away() -> None:
    urgent = tuple(RequestInfo("u", RequestClass.INTERACTIVE, -1, 32, 32) for _ in range(1))
    a = dataclasses.replace(load("a", n=1, total=200), requests=urgent)
    b = load("b", n=1, total=200)
    params = DispatchParams(high_priority_headroom_blocks=150)
    assert choose([a, b], DispatchRequest(32, 32, priority=0), params).instance_id == "b"
    # A request at least as urgent does not see the headroom.
    assert freeness_after(a, DispatchRequest(32, 32, priority=-1), params) == freeness_after(
        b, DispatchRequest(32, 32, priority=-1), params
    )


def test_prefix_locality_wins_between_equal_loads_but_not_over_a_full_instance() -> None:
    a, b = load("a", n=1), load("b", n=1)
    req = DispatchRequest(512, 16, prefix_hit_blocks={"b": 10})
    assert choose([a, b], req).instance_id == "b"
    full = load("b", n=8, limit=8)
    assert choose([a, full], req).instance_id == "a"
    busy = load("b", n=6, total=1000)
    assert choose([a, busy], DispatchRequest(512, 16, prefix_hit_blocks={"b": 1})).instance_id == "a"


def test_round_robin_rotates_and_skips_full_instances() -> None:
    ls = [load("a"), load("b"), load("c")]
    rr = DispatchParams(policy=DispatchPolicy.ROUND_ROBIN)
    assert [choose(ls, DispatchRequest(1, 1), rr, i).instance_id for i in range(4)] == ["a", "b", "c", "a"]
    ls[1] = load("b", n=8, limit=8)
    assert choose(ls, DispatchRequest(1, 1), rr, 1).instance_id == "c"


def test_batch_keeps_a_slot_free_for_interactive() -> None:
    ls = [load("a", n=7, limit=8)]
    assert choose(ls, DispatchRequest(1, 1, request_class=RequestClass.BATCH)).instance_id is None
    assert choose(ls, DispatchRequest(1, 1)).instance_id == "a"


@given(st.text(max_size=300), st.text(max_size=300), st.integers(1, 40))
def test_block_hashes_share_exactly_the_common_full_blocks(p: str, q: str, bs: int) -> None:
    hp, hq = block_hashes(p, bs), block_hashes(q, bs)
    assert len(hp) == len(p) // bs
    common = 0
    while common < min(len(p), len(q)) and p[common] == q[common]:
        common += 1
    shared = 0
    while shared < min(len(hp), len(hq)) and hp[shared] == hq[shared]:
        shared += 1
    assert shared == min(common // bs, len(hp), len(hq))


def test_prefix_index_counts_leading_blocks_and_evicts_oldest() -> None:
    idx = PrefixIndex(capacity_blocks=4)
    doc = block_hashes(list(range(64)), BS)  # 4 blocks of token ids
    idx.record("a", doc[:3])
    assert idx.hits(doc) == {"a": 3}
    assert idx.hits(block_hashes(list(range(1, 65)), BS)) == {}
    idx.record("a", block_hashes(list(range(100, 132)), BS))  # 2 newer blocks push out the oldest
    assert idx.size("a") == 4 and idx.hits(doc) == {}
    idx.forget("a")
    assert idx.size("a") == 0
