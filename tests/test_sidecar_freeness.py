"""Llumnix freeness (slofleet.policies.freeness): worked examples and properties."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from slofleet.instance import RequestClass, RequestInfo
from slofleet.policies.freeness import (
    DRAINING_FREENESS,
    blocks_for_tokens,
    compute_freeness,
    split_running_queued,
)


def req(rid: str, prompt: int, max_tokens: int = 16, priority: int = 0, generated: int = 0) -> RequestInfo:
    return RequestInfo(rid, RequestClass.INTERACTIVE, priority, prompt, max_tokens, generated)


def test_blocks_for_tokens_rounds_partial_blocks_up():
    assert [blocks_for_tokens(n, 128) for n in (0, 1, 128, 129, 256)] == [0, 1, 1, 2, 2]


def test_idle_instance_is_all_free():
    f = compute_freeness(total_blocks=100, used_blocks=0, running_requests=0, block_size_tokens=16)
    assert f.freeness == 100.0 and f.virtual_usage_blocks == 0


def test_worked_example_head_of_line_and_headroom():
    # Two running (one high priority), two queued: only the head of the queue counts.
    requests = [
        req("a", prompt=32, priority=0, generated=8),  # running, 3 blocks of 16 now
        req("hi", prompt=16, max_tokens=64, priority=-1, generated=0),  # running, high priority
        req("q1", prompt=100),  # queued head: ceil(100/16) = 7 blocks
        req("q2", prompt=500),  # queued behind q1: not counted
    ]
    f = compute_freeness(
        total_blocks=100, used_blocks=10, running_requests=2, block_size_tokens=16, requests=requests
    )
    # headroom of "hi": ceil((16+64)/16) - ceil(16/16) = 5 - 1 = 4 blocks
    assert f.head_of_line_demand_blocks == 7
    assert f.priority_headroom_blocks == 4
    assert f.virtual_usage_blocks == 10 + 7 + 4
    assert f.freeness == (100 - 21) / 2


def test_queue_order_follows_priority_then_arrival():
    requests = [req("late-low", 10, priority=5), req("x", 10, priority=0), req("y", 10, priority=0)]
    running, queued = split_running_queued(requests, running_requests=2)
    assert [r.request_id for r in running] == ["x", "y"]
    assert [r.request_id for r in queued] == ["late-low"]


def test_overloaded_instance_has_negative_freeness():
    f = compute_freeness(
        total_blocks=10, used_blocks=9, running_requests=3, block_size_tokens=16, requests=[
            req("a", 16), req("b", 16), req("c", 16), req("queued", 16 * 5),
        ],
    )  # fmt: skip
    assert f.freeness < 0


def test_draining_is_fake_infinite_usage():
    f = compute_freeness(
        total_blocks=100, used_blocks=0, running_requests=0, block_size_tokens=16, draining=True
    )
    assert f.freeness == DRAINING_FREENESS == -math.inf
    assert f.virtual_usage_blocks == math.inf


load = st.fixed_dictionaries(
    {
        "total_blocks": st.integers(1, 100_000),
        "used_frac": st.floats(0, 1),
        "running": st.integers(0, 500),
        "block": st.sampled_from([1, 16, 128]),
        "requests": st.lists(
            st.builds(
                req,
                rid=st.uuids().map(str),
                prompt=st.integers(1, 4096),
                max_tokens=st.integers(0, 4096),
                priority=st.integers(-2, 2),
                generated=st.integers(0, 4096),
            ),
            max_size=20,
        ),
    }
)


def _freeness(d: dict, **over: object) -> float:
    args = {
        "total_blocks": d["total_blocks"],
        "used_blocks": round(d["total_blocks"] * d["used_frac"]),
        "running_requests": d["running"],
        "block_size_tokens": d["block"],
        "requests": d["requests"],
    }
    args.update(over)
    return compute_freeness(**args).freeness  # type: ignore[arg-type]


@given(load, st.integers(1, 1000))
def test_more_used_blocks_never_raise_freeness(d, extra):
    used = round(d["total_blocks"] * d["used_frac"])
    assert _freeness(d, used_blocks=used + extra) < _freeness(d, used_blocks=used)


@given(load, st.integers(1, 4096))
def test_a_queued_request_never_raises_freeness(d, prompt):
    # A newly queued request goes behind everything of equal or better priority.
    more = [*d["requests"], req("new", prompt, priority=10)]
    assert _freeness(d, requests=more) <= _freeness(d)


@given(load)
def test_draining_is_below_any_serving_instance(d):
    assert _freeness(d, draining=True) < _freeness(d)
    assert _freeness(d, draining=True) == -math.inf


@given(load)
def test_virtual_usage_is_at_least_physical_usage(d):
    used = round(d["total_blocks"] * d["used_frac"])
    f = compute_freeness(
        total_blocks=d["total_blocks"], used_blocks=used, running_requests=d["running"],
        block_size_tokens=d["block"], requests=d["requests"],
    )  # fmt: skip
    assert f.virtual_usage_blocks >= used
    assert f.freeness == (d["total_blocks"] - f.virtual_usage_blocks) / max(1, d["running"])
