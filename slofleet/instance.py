"""Observed state of one engine instance and of the requests on it.

These are the inputs of every policy (dispatch, local/global autoscaling, migration, memory
planning). They are plain frozen dataclasses so that the operator, the gateway, the local fleet and
the simulator build the same values from their own sources (gRPC `Load`, simulated engines) and
feed them to the same functions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestClass(enum.StrEnum):
    """SLO class of a request: interactive has TTFT/ITL targets, batch has a deadline."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class Pool(enum.StrEnum):
    """Which kind of traffic an instance takes (Chiron's instance pools)."""

    INTERACTIVE = "interactive"
    MIXED = "mixed"
    BATCH = "batch"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as the gateway sent it to an instance.

    Freeness counts a request's *future* KV demand (prompt + expected output), which the engine's
    own metrics cannot know; the gateway reports it to the sidecar.
    """

    request_id: str
    request_class: RequestClass
    priority: int
    prompt_tokens: int
    max_tokens: int
    generated_tokens: int = 0


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One snapshot of an instance's load, in engine units (tokens, blocks, seconds)."""

    instance_id: str
    running_requests: int
    waiting_requests: int
    kv_usage_fraction: float
    kv_total_blocks: int
    kv_free_blocks: int
    block_size_tokens: int
    concurrency_limit: int
    draining: bool = False
    healthy: bool = True
    pool: Pool = Pool.MIXED
    prompt_tokens_per_second: float = 0.0
    generation_tokens_per_second: float = 0.0
    preemptions_total: int = 0
    ttft_p50_seconds: float = 0.0
    ttft_p99_seconds: float = 0.0
    itl_p50_seconds: float = 0.0
    itl_p99_seconds: float = 0.0
    freeness: float = 0.0
    layers_resident: int = 0
    layers_total: int = 0
    requests: tuple[RequestInfo, ...] = field(default=())

    @property
    def in_flight(self) -> int:
        return self.running_requests + self.waiting_requests

    @property
    def has_room(self) -> bool:
        """Whether the gateway may send one more request here (local limit honoured)."""
        return self.healthy and not self.draining and self.in_flight < self.concurrency_limit
