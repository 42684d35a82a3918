"""Mixed-instance preemption: which batch requests make room for an interactive arrival.

Why: mixed instances run batch work in the gaps of interactive traffic, so their capacity is not
wasted, but an interactive request must never wait behind batch work that has hours of slack. When
an interactive request finds no room anywhere, the gateway evicts batch requests from a mixed
instance back to the batch queue. Nothing is lost or recomputed from scratch: the gateway knows the
tokens already generated and later resumes each evicted request with prompt + generated tokens and
the remaining `max_tokens` (its resume path), so the cost of an eviction is one prefill of the
request's context. Hence: evict requests not yet started first (free), then those with the least
context (cheapest to re-prefill), latest deadline first among equals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slofleet.instance import InstanceLoad, Pool, RequestClass, RequestInfo


def choose_preemption_instance(loads: Sequence[InstanceLoad]) -> str | None:
    """The mixed instance whose batch work is cheapest to push out: most batch requests (more
    choice), then least KV in use; None if no mixed instance carries batch work."""
    best: tuple[int, float, str] | None = None
    for ld in loads:
        if ld.pool != Pool.MIXED or ld.draining or not ld.healthy:
            continue
        n_batch = sum(1 for r in ld.requests if r.request_class == RequestClass.BATCH)
        if n_batch == 0:
            continue
        key = (-n_batch, ld.kv_usage_fraction, ld.instance_id)
        if best is None or key < best:
            best = key
    return best[2] if best else None


def select_batch_evictions(
    requests: Sequence[RequestInfo],
    slots_needed: int,
    started: Mapping[str, bool] | None = None,
    deadlines: Mapping[str, float] | None = None,
) -> tuple[str, ...]:
    """Ids of at most `slots_needed` batch requests to evict, cheapest first.

    `started` says whether a request has begun prefill on the engine (default: it has if it has
    generated tokens); `deadlines` (absolute seconds) breaks ties toward the latest deadline.
    """
    if slots_needed <= 0:
        return ()
    started = started or {}
    deadlines = deadlines or {}

    def cost(r: RequestInfo) -> tuple[int, int, float, str]:
        begun = started.get(r.request_id, r.generated_tokens > 0)
        context = r.prompt_tokens + r.generated_tokens if begun else 0
        return (int(begun), context, -deadlines.get(r.request_id, 0.0), r.request_id)

    batch = [r for r in requests if r.request_class == RequestClass.BATCH]
    batch.sort(key=cost)
    return tuple(r.request_id for r in batch[:slots_needed])
