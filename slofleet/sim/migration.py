"""What Llumnix's live migration costs in the simulator (the policy is `policies/migration.py`).

The simulator enacts each planned `Migration` as Llumnix's multi-stage live migration (OSDI '24,
section 4.3): the request keeps decoding on the source while its KV is copied to blocks the
destination reserved when the copy began; at cut-over it stops for a short, near-constant downtime
(the last blocks and the resume) and continues on the destination with its context, without a
re-prefill. Only the copy time grows with the request's length, so that is the one cost modelled
from sizes; the rest is a constant.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slofleet.calibration import EngineCalibration


class Outcome(enum.StrEnum):
    """How one planned migration ended (the keys of `SimResult.migrations_by_outcome`)."""

    MIGRATED = "migrated"
    # The request finished on the source while its KV was being copied.
    ABORTED_FINISHED = "aborted_finished"
    # The destination could no longer hold the request at cut-over (or left the fleet).
    ABORTED_NO_ROOM = "aborted_no_room"
    # The source's engine preempted the request (or the gateway evicted it) during the copy.
    ABORTED_PREEMPTED = "aborted_preempted"
    # The planned request was still prefilling or queued: only a decoding request can move.
    NOT_RUNNING = "not_running"


@dataclass(frozen=True, slots=True)
class MigrationCosts:
    """Costs outside the engine calibration, and the rescheduler's concurrency bound."""

    # Source to destination: 200 Gb/s RDMA between nodes, as `sim.kunserve.PipelineCosts`.
    link_bytes_per_s: float = 25e9
    # Stop-to-resume time of the final stage. Llumnix (OSDI '24, its evaluation of migration
    # efficiency) reports a downtime of about 20-30 ms that stays near-constant as the sequence
    # grows, where recompute takes seconds; the upper end is taken.
    downtime_s: float = 0.030
    # One token's KV over all layers when the calibration does not give it: Llama-3-8B in BF16
    # (32 layers x 8 KV heads x 128 dims x K,V x 2 B), the calibration the simulator defaults to.
    default_kv_bytes_per_token: int = 131_072
    # Migrations in flight across the fleet at once, the operator's `ReschedulerConfig`
    # default: every migration copies KV on two hosts.
    max_concurrent: int = 2

    def __post_init__(self) -> None:
        if self.link_bytes_per_s <= 0 or self.downtime_s < 0 or self.default_kv_bytes_per_token <= 0:
            raise ValueError(
                "link_bytes_per_s > 0, downtime_s >= 0 and default_kv_bytes_per_token > 0 are required"
            )
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1, got {self.max_concurrent}")

    def copy_seconds(self, cal: EngineCalibration, context_tokens: float) -> float:
        """The copy stages of a request with `context_tokens` of KV (it decodes meanwhile)."""
        per_token = cal.kv_bytes_per_token or self.default_kv_bytes_per_token
        return context_tokens * per_token / self.link_bytes_per_s
