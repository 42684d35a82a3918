"""Llumnix's *freeness* of an instance: how many KV blocks each of its running requests could still
grow into once queued and high-priority demand is counted (Llumnix, OSDI '24, section 4.4.1).

    virtual usage = KV blocks held by running requests            (physical, from the engine)
                  + demand of the head-of-line queued request     (blocks its prompt needs)
                  + headroom reserved for high-priority requests  (blocks they may still grow into)
    freeness      = (total blocks - virtual usage) / max(1, running requests)

Dispatch sends to the freest instance, the local autoscaler and the rescheduler read the same
number. Freeness can be negative: an instance whose queue head cannot fit is *over*-loaded, and
the magnitude says by how much. Only the head-of-line request counts among the queued ones, as in
Llumnix: requests behind it cannot start before it does, so the head is what blocks the queue.

A draining (or terminating) instance gets Llumnix's "fake" infinite virtual usage, so its
freeness is -inf: lower than any real instance and never chosen, whatever its load.

This is a pure function of observed state: the sidecar computes it for `Load`, and the simulator
and the gateway can recompute it from an `InstanceLoad` the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from slofleet.instance import RequestInfo

DRAINING_FREENESS = -math.inf


@dataclass(frozen=True, slots=True)
class Freeness:
    """The result and its parts, so that metrics and logs can say *why* an instance looks full."""

    freeness: float
    virtual_usage_blocks: float
    used_blocks: int
    head_of_line_demand_blocks: int
    priority_headroom_blocks: int


def blocks_for_tokens(tokens: int, block_size_tokens: int) -> int:
    """KV blocks that `tokens` tokens occupy (a partial block takes a whole one)."""
    if block_size_tokens < 1:
        raise ValueError(f"block_size_tokens: must be >= 1, got {block_size_tokens}")
    return -(-max(0, tokens) // block_size_tokens)


def split_running_queued(
    requests: Sequence[RequestInfo], running_requests: int
) -> tuple[list[RequestInfo], list[RequestInfo]]:
    """Split the gateway-reported requests into (running, queued) in the engine's schedule order.

    The engine only reports counts. Its scheduler serves by (priority, arrival) (FCFS is the
    special case of equal priorities), so the first `running_requests` of the reported requests in
    that order are the running ones and the rest wait. `requests` must be in arrival order.
    """
    order = sorted(range(len(requests)), key=lambda i: (requests[i].priority, i))
    ordered = [requests[i] for i in order]
    n = max(0, min(running_requests, len(ordered)))
    return ordered[:n], ordered[n:]


def compute_freeness(
    *,
    total_blocks: int,
    used_blocks: int,
    running_requests: int,
    block_size_tokens: int,
    requests: Sequence[RequestInfo] = (),
    draining: bool = False,
    high_priority_below: int = 0,
) -> Freeness:
    """Llumnix freeness of one instance (see the module docstring for the definition).

    - `used_blocks`: KV blocks in use now (engine's usage x total).
    - `requests`: what the gateway reported in flight here, in arrival order (may be empty: then
      only physical usage counts).
    - `high_priority_below`: requests with `priority` below this are high priority (vLLM: lower
      is served first). Each running high-priority request reserves the blocks it may still grow
      into (prompt + max_tokens, minus what it holds now), so that a low-priority arrival never
      takes the memory that would preempt it.
    """
    if draining:
        return Freeness(DRAINING_FREENESS, math.inf, used_blocks, 0, 0)
    running, queued = split_running_queued(requests, running_requests)
    hol = 0
    if queued:
        head = queued[0]
        hol = blocks_for_tokens(head.prompt_tokens + head.generated_tokens, block_size_tokens)
    headroom = 0
    for r in running:
        if r.priority < high_priority_below:
            final = blocks_for_tokens(r.prompt_tokens + r.max_tokens, block_size_tokens)
            now = blocks_for_tokens(r.prompt_tokens + r.generated_tokens, block_size_tokens)
            headroom += max(0, final - now)
    virtual = float(max(0, used_blocks) + hol + headroom)
    value = (total_blocks - virtual) / max(1, running_requests)
    return Freeness(value, virtual, used_blocks, hol, headroom)
