"""KunServe's parameter-centric memory planner, and warm-standby decisions (DESIGN.md section 5).

Why drop parameters (KunServe, OSDI'25): when a burst exhausts KV memory, queued requests wait
for blocks that only finishing requests free, and TTFT explodes. Instances of one model hold
identical weights, so g of them can keep one contiguous 1/g of the layers each, serve as a
pipeline (issue 10), and turn the dropped weights' memory into KV blocks at once; no cold start,
no KV copy. When the burst passes, the layers come back from host memory and the group splits.

Triggers (per instance, then per group):
- an instance *votes to drop* when its KV usage >= `drop_usage` (95 %) and the KV demand of its
  queue >= its free blocks (it is out of memory, not just busy), for `vote_ticks` ticks in a row;
- a group forms when a majority of its members vote; its size g is the smallest that covers the
  group's queued demand (the greedy planner: fewer pipeline stages cost less per step), capped;
- a group *splits* (restore) when nothing is queued on any member, usage is below
  `restore_usage` (50 %) and falling on every member, for `vote_ticks` ticks, and it has lived
  `cooldown_s`; an instance that split stays out of new groups for `cooldown_s` (hysteresis).

Capacity arithmetic for g identical members with weights W bytes (decoder layers) and KV bytes
per block b (all layers): each member frees W(1 - 1/g) and each token's KV is spread over the g
members, so the group gains (g - 1) * W / b blocks of whole-model KV.

Warm standby (issue 9, item 4): scale-in may park an instance (weights in the host store, engine
memory released) instead of deleting it; scale-out wakes parked ones first when waking is faster
than a cold start. The helpers at the end make those choices for the global autoscaler.

Everything here is pure: `plan` maps (members, state, now, config) to (actions, new state); the
sidecar, the operator and the simulator call it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from slofleet.instance import InstanceLoad


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    drop_usage: float = 0.95
    restore_usage: float = 0.5
    vote_ticks: int = 2  # consecutive ticks a vote must hold before it counts
    cooldown_s: float = 30.0  # minimum group lifetime, and the pause before an instance regroups
    min_group_size: int = 2
    max_group_size: int = 4
    min_layers_per_member: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.restore_usage < self.drop_usage <= 1:
            raise ValueError(
                f"restore_usage, drop_usage: need 0 < restore_usage < drop_usage <= 1, got "
                f"{self.restore_usage}, {self.drop_usage}"
            )
        if not 2 <= self.min_group_size <= self.max_group_size:
            raise ValueError(
                f"min_group_size, max_group_size: need 2 <= min <= max, got {self.min_group_size}, "
                f"{self.max_group_size}"
            )
        if self.vote_ticks < 1 or self.cooldown_s < 0 or self.min_layers_per_member < 1:
            raise ValueError("vote_ticks >= 1, cooldown_s >= 0 and min_layers_per_member >= 1 are required")


@dataclass(frozen=True, slots=True)
class MemberView:
    """What the planner needs of one instance (built from its sidecar's load and Info)."""

    instance_id: str
    model: str
    kv_usage: float
    kv_free_blocks: int
    queued_demand_blocks: int  # KV blocks the waiting requests need to be admitted
    waiting_requests: int
    layers_total: int
    weight_bytes: int  # decoder-layer weights (what a drop can free)
    kv_bytes_per_block: int  # one block, all layers, K and V
    healthy: bool = True


def queued_demand_blocks(load: InstanceLoad) -> int:
    """KV blocks the queue needs: the waiting requests' prompts at the mean prompt length of the
    requests the instance reports (vLLM admits a request when its prompt's blocks fit)."""
    if load.waiting_requests <= 0:
        return 0
    prompts = [r.prompt_tokens + r.generated_tokens for r in load.requests]
    mean_tokens = sum(prompts) / len(prompts) if prompts else load.block_size_tokens
    return load.waiting_requests * max(1, math.ceil(mean_tokens / max(1, load.block_size_tokens)))


def member_from_load(
    load: InstanceLoad, model: str, weight_bytes: int, kv_bytes_per_block: int
) -> MemberView:
    return MemberView(
        instance_id=load.instance_id,
        model=model,
        kv_usage=load.kv_usage_fraction,
        kv_free_blocks=load.kv_free_blocks,
        queued_demand_blocks=queued_demand_blocks(load),
        waiting_requests=load.waiting_requests,
        layers_total=load.layers_total,
        weight_bytes=weight_bytes,
        kv_bytes_per_block=kv_bytes_per_block,
        healthy=load.healthy and not load.draining,
    )


def split_layers(layers_total: int, group_size: int) -> tuple[tuple[int, int], ...]:
    """Contiguous [lo, hi) layer ranges, one per member in pipeline order, sizes differing by at
    most one (the 1/g split; the first members take the remainder)."""
    if not 1 <= group_size <= layers_total:
        raise ValueError(f"group_size: must be in 1..{layers_total} (the layer count), got {group_size}")
    base, extra = divmod(layers_total, group_size)
    ranges = []
    lo = 0
    for i in range(group_size):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return tuple(ranges)


def extra_blocks(group_size: int, weight_bytes: int, kv_bytes_per_block: int) -> int:
    """Whole-model KV blocks a group of `group_size` identical members gains by dropping."""
    if kv_bytes_per_block <= 0:
        return 0
    return (group_size - 1) * weight_bytes // kv_bytes_per_block


def greedy_group_size(demand_blocks: int, free_blocks: int, weight_bytes: int, kv_bytes_per_block: int,
                      min_size: int, max_size: int) -> int:  # fmt: skip
    """The smallest group size whose gained blocks (plus the free ones) cover the demand; the
    largest allowed when none does."""
    for g in range(min_size, max_size + 1):
        if free_blocks + extra_blocks(g, weight_bytes, kv_bytes_per_block) >= demand_blocks:
            return g
    return max_size


@dataclass(frozen=True, slots=True)
class Group:
    group_id: str
    model: str
    members: tuple[str, ...]  # pipeline order
    keep: tuple[tuple[int, int], ...]  # [lo, hi) kept by each member, same order
    formed_s: float


@dataclass(frozen=True, slots=True)
class Action:
    """`drop`: form `group` (each member drops every layer outside its `keep` range);
    `restore`: restore every member's layers and dissolve `group`."""

    kind: str
    group: Group
    reason: str

    def dropped_layers(self, instance_id: str, layers_total: int) -> list[int]:
        lo, hi = self.group.keep[self.group.members.index(instance_id)]
        return [i for i in range(layers_total) if not lo <= i < hi]


@dataclass(frozen=True, slots=True)
class PlannerState:
    groups: tuple[Group, ...] = ()
    drop_votes: Mapping[str, int] = field(default_factory=dict)  # instance -> consecutive ticks
    restore_votes: Mapping[str, int] = field(default_factory=dict)  # group -> consecutive ticks
    last_usage: Mapping[str, float] = field(default_factory=dict)
    released_s: Mapping[str, float] = field(default_factory=dict)  # instance -> when its group split


def votes_to_drop(m: MemberView, config: PlannerConfig) -> bool:
    return (
        m.healthy
        and m.kv_usage >= config.drop_usage
        and m.queued_demand_blocks > 0
        and m.queued_demand_blocks >= m.kv_free_blocks
    )


def votes_to_restore(m: MemberView, previous_usage: float | None, config: PlannerConfig) -> bool:
    falling = previous_usage is not None and m.kv_usage < previous_usage
    return (
        m.waiting_requests == 0
        and m.queued_demand_blocks == 0
        and m.kv_usage < config.restore_usage
        and falling
    )


def plan(
    members: Sequence[MemberView], state: PlannerState, now_s: float, config: PlannerConfig = PlannerConfig()
) -> tuple[tuple[Action, ...], PlannerState]:
    """One planner tick. Returns the actions to carry out and the state for the next tick."""
    by_id = {m.instance_id: m for m in members}
    actions: list[Action] = []
    groups: list[Group] = []
    restore_votes: dict[str, int] = {}
    released = {k: v for k, v in state.released_s.items() if now_s - v < config.cooldown_s}

    for group in state.groups:
        views = [by_id.get(i) for i in group.members]
        if any(v is None for v in views):
            # A member vanished: its layers are gone with it; restore the rest at once.
            actions.append(Action("restore", group, "a member left the group"))
            released.update({i: now_s for i in group.members})
            continue
        votes = all(votes_to_restore(v, state.last_usage.get(v.instance_id), config) for v in views if v)
        ticks = state.restore_votes.get(group.group_id, 0) + 1 if votes else 0
        if ticks >= config.vote_ticks and now_s - group.formed_s >= config.cooldown_s:
            actions.append(
                Action("restore", group, "nothing queued, KV usage falling and below the restore mark")
            )
            released.update({i: now_s for i in group.members})
        else:
            groups.append(group)
            restore_votes[group.group_id] = ticks

    grouped = {i for g in groups for i in g.members} | {i for a in actions for i in a.group.members}
    drop_votes = {
        m.instance_id: state.drop_votes.get(m.instance_id, 0) + 1
        for m in members
        if m.instance_id not in grouped and votes_to_drop(m, config)
    }
    for model in sorted({m.model for m in members}):
        free = [
            m
            for m in members
            if m.model == model
            and m.healthy
            and m.instance_id not in grouped
            and m.instance_id not in released
        ]
        while True:
            group = _form_group(free, drop_votes, now_s, config)
            if group is None:
                break
            groups.append(group)
            actions.append(Action("drop", group, "majority out of KV memory with a queue"))
            free = [m for m in free if m.instance_id not in group.members]
            for i in group.members:
                drop_votes.pop(i, None)

    new_state = PlannerState(
        groups=tuple(groups),
        drop_votes=drop_votes,
        restore_votes=restore_votes,
        last_usage={m.instance_id: m.kv_usage for m in members},
        released_s=released,
    )
    return tuple(actions), new_state


def _form_group(
    free: Sequence[MemberView], drop_votes: Mapping[str, int], now_s: float, config: PlannerConfig
) -> Group | None:
    voters = sorted(
        (m for m in free if drop_votes.get(m.instance_id, 0) >= config.vote_ticks),
        key=lambda m: (-m.kv_usage, m.instance_id),
    )
    if not voters:
        return None
    others = sorted((m for m in free if m not in voters), key=lambda m: (m.kv_usage, m.instance_id))
    layers = min(m.layers_total for m in free)
    cap = min(config.max_group_size, len(free), layers // config.min_layers_per_member)
    if cap < config.min_group_size:
        return None
    demand = sum(m.queued_demand_blocks for m in voters)
    weight = min(m.weight_bytes for m in free)
    per_block = max(m.kv_bytes_per_block for m in free)
    free_blocks = sum(m.kv_free_blocks for m in voters)
    g = greedy_group_size(demand, free_blocks, weight, per_block, config.min_group_size, cap)
    # Majority: more than half of the members vote (v voters allow at most 2v - 1 members); the
    # seats left go to the least loaded others.
    chosen = voters[:g]
    size = min(g, 2 * len(chosen) - 1, len(chosen) + len(others)) if len(chosen) < g else g
    if size < config.min_group_size:
        return None
    chosen = chosen + others[: size - len(chosen)]
    members = tuple(sorted(m.instance_id for m in chosen))
    return Group(
        group_id=f"{chosen[0].model}/{'+'.join(members)}",
        model=chosen[0].model,
        members=members,
        keep=split_layers(layers, size),
        formed_s=now_s,
    )


# --- warm standby -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StandbyConfig:
    """What parking costs and buys. `cold_start_s` is the time from pod creation to serving;
    `wake_overhead_s` the fixed part of a wake (resume, first step); host bandwidth the rest."""

    cold_start_s: float = 60.0
    wake_overhead_s: float = 0.5
    host_to_device_bytes_per_s: float = 20e9
    host_memory_budget_bytes: int = 0  # per node, for parked weights; 0 = no standby
    max_standby: int = 2
    standby_ttl_s: float = 1800.0  # delete instances parked longer than this

    def __post_init__(self) -> None:
        if self.cold_start_s < 0 or self.wake_overhead_s < 0 or self.host_to_device_bytes_per_s <= 0:
            raise ValueError(
                "cold_start_s, wake_overhead_s >= 0 and host_to_device_bytes_per_s > 0 are required"
            )
        if self.max_standby < 0 or self.host_memory_budget_bytes < 0 or self.standby_ttl_s < 0:
            raise ValueError("max_standby, host_memory_budget_bytes and standby_ttl_s must be >= 0")


def wake_seconds(weight_bytes: int, config: StandbyConfig) -> float:
    """Expected wake time of a parked instance holding `weight_bytes` in the host store."""
    return config.wake_overhead_s + weight_bytes / config.host_to_device_bytes_per_s


@dataclass(frozen=True, slots=True)
class Parked:
    instance_id: str
    weight_bytes: int
    since_s: float
    wake_s: float | None = None  # measured (the sidecar's restore histogram) when known


@dataclass(frozen=True, slots=True)
class ScaleOutPlan:
    wake: tuple[str, ...]
    cold_starts: int
    ready_s: float  # when the last added instance serves, from now


def plan_scale_out(needed: int, parked: Sequence[Parked], config: StandbyConfig) -> ScaleOutPlan:
    """Serve `needed` more instances: wake parked ones that beat a cold start (fastest first),
    cold-start the rest."""
    if needed <= 0:
        return ScaleOutPlan((), 0, 0.0)
    timed = sorted(
        (p.wake_s if p.wake_s is not None else wake_seconds(p.weight_bytes, config), p.instance_id)
        for p in parked
    )
    wake = [(t, i) for t, i in timed if t < config.cold_start_s][:needed]
    cold = needed - len(wake)
    ready = max([t for t, _ in wake] + ([config.cold_start_s] if cold else []))
    return ScaleOutPlan(tuple(i for _, i in wake), cold, ready)


@dataclass(frozen=True, slots=True)
class ScaleInPlan:
    park: tuple[str, ...]
    delete: tuple[str, ...]


def plan_scale_in(
    removing: Sequence[tuple[str, int]], parked: Sequence[Parked], now_s: float, config: StandbyConfig
) -> ScaleInPlan:
    """`removing` = (instance, weight bytes) the autoscaler takes out of service. Park them while
    standby is worth it (waking beats a cold start) and fits the count and host-memory budget;
    delete the rest, and any parked instance older than `standby_ttl_s`."""
    expired = tuple(sorted(p.instance_id for p in parked if now_s - p.since_s >= config.standby_ttl_s))
    kept = [p for p in parked if p.instance_id not in expired]
    used = sum(p.weight_bytes for p in kept)
    park: list[str] = []
    delete: list[str] = list(expired)
    for instance_id, weight in removing:
        worth = wake_seconds(weight, config) < config.cold_start_s
        fits = len(kept) + len(park) < config.max_standby and used + weight <= config.host_memory_budget_bytes
        if worth and fits:
            park.append(instance_id)
            used += weight
        else:
            delete.append(instance_id)
    return ScaleInPlan(tuple(park), tuple(delete))


def with_measured_wake(parked: Parked, seconds: float) -> Parked:
    """Record a measured wake time (e.g. the last `slofleet_memory_restore_seconds{command=wake}`)."""
    return replace(parked, wake_s=seconds)
