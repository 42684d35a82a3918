"""What KunServe's pipeline mode costs and gains, for the simulator (issue 10, item 5).

When the memory planner (`slofleet.policies.memory_planner.plan`, the same function the sidecars
run) forms a group of g instances, each member keeps 1/g of the decoder layers and the group runs
every request through the members in layer order. The simulator keeps each member as its own
dispatch target and gives it a *member calibration* instead of running g engines in lockstep:

- **capacity**: a member's KV memory grows by the weights it dropped, W (1 - 1/g), and each token's
  KV is spread over g members, so every member holds kv_capacity + (g - 1) W / (g b) tokens (b: one
  token's KV over all layers). The group's gain is (g - 1) W / b, the planner's `extra_blocks`.
- **step time**: a member's micro-batch passes g stages in turn. Each stage does 1/g of the layer
  work, so the compute of one round equals one whole-model step of that batch, plus, at each of the
  g - 1 stage boundaries, one more per-iteration overhead (scheduling, launch) and a hop (hidden
  states to the next member). With every member's micro-batch in flight at once the stages stay
  busy, so the group's throughput is the sum of its members' at the longer step.
- **transitions**: the drop re-shards the in-flight KV (each member sends the (g - 1)/g of its KV
  that belongs to layers it no longer keeps) over the link between members; the capacity is there
  when that copy ends, and the members serve as before meanwhile. The restore reloads the dropped
  layers from host memory and moves the KV back before the member serves alone again.

The costs are first-order on purpose: they are what the global policy needs to weigh the mode
against adding instances and migrating, and each is measured elsewhere (restore bandwidth:
`bench/gpu_copy.py`; the capacity gain on the CPU engine: issue 10's engine benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slofleet.calibration import EngineCalibration
from slofleet.policies.memory_planner import PlannerConfig


@dataclass(frozen=True, slots=True)
class PipelineCosts:
    """Costs outside the engine calibration (the links between members, the host copy)."""

    # Per stage boundary per iteration: the hidden states of a micro-batch (tokens x hidden x 2 B,
    # ~1 MiB for 128 decode tokens of an 8B model) to the next member, latency dominated.
    hop_s: float = 1e-4
    # Member to member (KV re-shard): 200 Gb/s RDMA between nodes; NVLink within one is faster.
    link_bytes_per_s: float = 25e9
    # Host memory to the device for the dropped layers: 55.0 GB/s measured on an H100 (pinned, the
    # layer restore of bench/gpu_copy.py).
    restore_bytes_per_s: float = 55e9

    def __post_init__(self) -> None:
        if self.hop_s < 0 or self.link_bytes_per_s <= 0 or self.restore_bytes_per_s <= 0:
            raise ValueError("hop_s >= 0, link_bytes_per_s > 0 and restore_bytes_per_s > 0 are required")


@dataclass(frozen=True, slots=True)
class KunServeConfig:
    """Turns the mode on in `SimConfig` (the planner's thresholds and the costs above)."""

    planner: PlannerConfig = field(default_factory=PlannerConfig)
    costs: PipelineCosts = field(default_factory=PipelineCosts)


def check_calibration(cal: EngineCalibration) -> None:
    """Raise unless `cal` gives the sizes the mode's arithmetic needs."""
    if cal.layer_weight_bytes <= 0 or cal.kv_bytes_per_token <= 0 or cal.num_layers < 2:
        raise ValueError(
            f"calibration {cal.name!r}: KunServe mode needs layer_weight_bytes, kv_bytes_per_token and "
            f"num_layers >= 2 (got {cal.layer_weight_bytes}, {cal.kv_bytes_per_token}, {cal.num_layers}); "
            "add them to the calibration"
        )


def gained_tokens(cal: EngineCalibration, group_size: int) -> int:
    """Tokens of whole-model KV one member gains in a group of `group_size`."""
    if group_size <= 1:
        return 0
    return (group_size - 1) * cal.layer_weight_bytes // (group_size * cal.kv_bytes_per_token)


def member_calibration(cal: EngineCalibration, group_size: int, costs: PipelineCosts) -> EngineCalibration:
    """The calibration of one member of a group of `group_size` (the instance's own for 1)."""
    if group_size <= 1:
        return cal
    boundaries = group_size - 1
    return replace(
        cal,
        name=f"{cal.name} (pipeline member of {group_size})",
        overhead_s=cal.overhead_s + boundaries * (cal.overhead_s + costs.hop_s),
        kv_capacity_tokens=cal.kv_capacity_tokens + gained_tokens(cal, group_size),
    )


def drop_seconds(cal: EngineCalibration, group_size: int, kv_tokens: float, costs: PipelineCosts) -> float:
    """Until a member's gained capacity is usable: its share of the in-flight KV re-shard."""
    moved = kv_tokens * cal.kv_bytes_per_token * (group_size - 1) / group_size
    return moved / costs.link_bytes_per_s


def restore_seconds(cal: EngineCalibration, group_size: int, kv_tokens: float, costs: PipelineCosts) -> float:
    """Until a member serves alone again: its dropped layers back from host memory, then the KV of
    the layers it takes back from the other members."""
    weights = cal.layer_weight_bytes * (group_size - 1) / group_size / costs.restore_bytes_per_s
    return weights + drop_seconds(cal, group_size, kv_tokens, costs)
