"""Which running requests to migrate, from where, to where (Llumnix's rescheduling, OSDI '24 s4.4).

One pure function, `plan_migrations`, over the fleet's observed loads (each with Llumnix freeness,
see `policies/freeness.py`, which already counts head-of-line queue demand and high-priority
headroom, and is -inf on a draining instance):

- **sources**: instances whose freeness fell below `out_threshold`, and every draining instance;
- **destinations**: healthy, non-draining instances with freeness above `in_threshold`;
- **pairing**: the least free source with the freest destination, the next with the next, as
  Llumnix pairs them, and a pair is used only if moving the chosen request *shrinks* the freeness
  gap between the two (no ping-pong: the destination never ends up less free than the source);
- **why** (for metrics and Events): DRAIN (scale-in: every running request leaves, the operator
  then lowers replicas with pod-deletion-cost set), DEFRAGMENT (a queued head-of-line request
  cannot fit: room is made for it), PRIORITY (high-priority requests lack headroom: low-priority
  ones leave), LOAD_BALANCE otherwise;
- **which request**: `SHORTEST` (least KV to copy), `LONGEST` (frees the most blocks), or
  `LAST_COME` (the latest arrival, which has waited least), Llumnix's strategies. High-priority
  requests are not moved to make room for others.

Deterministic: ties break on ids, and the input's order does not matter. The operator, the local
control loop and the simulator call this same function.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from slofleet.instance import InstanceLoad, RequestInfo
from slofleet.policies.freeness import blocks_for_tokens, split_running_queued


class Reason(enum.StrEnum):
    LOAD_BALANCE = "load_balance"
    DEFRAGMENT = "defragment"
    PRIORITY = "priority"
    DRAIN = "drain"


class Strategy(enum.StrEnum):
    SHORTEST = "shortest"
    LONGEST = "longest"
    LAST_COME = "last_come"


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    # Llumnix's migrate-out / migrate-in load thresholds, in freeness units (blocks per request).
    out_threshold: float = 16.0
    in_threshold: float = 64.0
    strategy: Strategy = Strategy.SHORTEST
    # The most new migrations one round starts (each costs a copy on both hosts).
    max_migrations: int = 4
    # Requests with priority below this are high priority (vLLM: lower is served first).
    high_priority_below: int = 0
    # Extra blocks a destination must keep free beyond the moved request's (it keeps growing).
    dest_reserve_blocks: int = 1


@dataclass(frozen=True, slots=True)
class Migration:
    request_id: str
    source: str
    destination: str
    reason: Reason
    blocks: int


def _tokens(r: RequestInfo) -> int:
    return r.prompt_tokens + r.generated_tokens


@dataclass(slots=True)
class _Inst:
    """Mutable working copy of one instance while a round is planned."""

    load: InstanceLoad
    virtual: float
    running: int
    free_blocks: int

    @property
    def id(self) -> str:
        return self.load.instance_id

    def freeness(self) -> float:
        if self.load.draining:
            return -math.inf
        return (self.load.kv_total_blocks - self.virtual) / max(1, self.running)

    def freeness_after(self, delta_blocks: int, delta_running: int) -> float:
        if self.load.draining:
            return -math.inf
        return (self.load.kv_total_blocks - (self.virtual + delta_blocks)) / max(
            1, self.running + delta_running
        )


def _working(load: InstanceLoad) -> _Inst:
    # The sidecar's freeness is (total - virtual) / max(1, running); recover the virtual usage so
    # that moves within the round can be accounted for.
    finite = math.isfinite(load.freeness)
    virtual = load.kv_total_blocks - load.freeness * max(1, load.running_requests) if finite else math.inf
    return _Inst(load, virtual, load.running_requests, load.kv_free_blocks)


def _reason(src: InstanceLoad, high_priority_below: int) -> Reason:
    if src.draining:
        return Reason.DRAIN
    if src.waiting_requests > 0:
        return Reason.DEFRAGMENT
    running, _ = split_running_queued(src.requests, src.running_requests)
    if any(r.priority < high_priority_below for r in running):
        return Reason.PRIORITY
    return Reason.LOAD_BALANCE


def _candidates(src: InstanceLoad, cfg: MigrationConfig, busy: Collection[str]) -> list[RequestInfo]:
    running, _ = split_running_queued(src.requests, src.running_requests)
    arrival = {r.request_id: i for i, r in enumerate(src.requests)}
    pool = [r for r in running if r.request_id not in busy]
    if not src.draining:
        pool = [r for r in pool if r.priority >= cfg.high_priority_below]
    if cfg.strategy is Strategy.SHORTEST:
        pool.sort(key=lambda r: (_tokens(r), r.request_id))
    elif cfg.strategy is Strategy.LONGEST:
        pool.sort(key=lambda r: (-_tokens(r), r.request_id))
    else:
        pool.sort(key=lambda r: (-arrival[r.request_id], r.request_id))
    return pool


def plan_migrations(
    loads: Sequence[InstanceLoad],
    config: MigrationConfig | None = None,
    in_flight: Collection[str] = (),
) -> list[Migration]:
    """The migrations to start this round. `in_flight`: request ids already migrating (skipped)."""
    cfg = config or MigrationConfig()
    insts = {x.instance_id: _working(x) for x in sorted(loads, key=lambda x: x.instance_id)}
    sources = sorted(
        (
            i
            for i in insts.values()
            if i.load.healthy and i.load.requests and (i.load.draining or i.freeness() < cfg.out_threshold)
        ),
        key=lambda i: (i.freeness(), i.id),
    )
    busy = set(in_flight)
    plan: list[Migration] = []
    for src in sources:
        reason = _reason(src.load, cfg.high_priority_below)
        # A draining instance empties completely; others give one request per round (Llumnix).
        for req in _candidates(src.load, cfg, busy):
            if len(plan) >= cfg.max_migrations:
                return plan
            blocks = blocks_for_tokens(_tokens(req), src.load.block_size_tokens)
            dest = _pick_destination(insts, src, blocks, cfg)
            if dest is None:
                continue
            plan.append(Migration(req.request_id, src.id, dest.id, reason, blocks))
            busy.add(req.request_id)
            if math.isfinite(src.virtual):
                src.virtual -= blocks
            src.running -= 1
            src.free_blocks += blocks
            dest.virtual += blocks
            dest.running += 1
            dest.free_blocks -= blocks
            if reason is not Reason.DRAIN:
                break
    return plan


def _pick_destination(insts: dict[str, _Inst], src: _Inst, blocks: int, cfg: MigrationConfig) -> _Inst | None:
    """The freest destination that has room and for which the move shrinks the gap with `src`."""
    dests = sorted(
        (
            d
            for d in insts.values()
            if d.id != src.id
            and d.load.healthy
            and not d.load.draining
            and d.freeness() > cfg.in_threshold
            and d.free_blocks >= blocks + cfg.dest_reserve_blocks
        ),
        key=lambda d: (-d.freeness(), d.id),
    )
    for d in dests:
        if src.load.draining:
            return d
        gap_before = d.freeness() - src.freeness()
        gap_after = d.freeness_after(blocks, 1) - src.freeness_after(-blocks, -1)
        if gap_before > 0 and abs(gap_after) < gap_before and d.freeness_after(blocks, 1) >= src.freeness():
            return d
    return None
