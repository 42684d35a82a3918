"""The one interface through which the control loop changes a fleet.

The operator implements it with Kubernetes Deployments (one per pool), the local fleet with
processes on this machine. The control loop, its autoscaler and rescheduler only ever see this
interface, so there is one copy of the control logic for both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from slofleet.instance import Pool


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """Where an instance can be reached and what state its runtime reports."""

    instance_id: str
    pool: Pool
    phase: Phase
    engine_url: str
    sidecar_address: str
    metrics_url: str = ""


class FleetBackend(Protocol):
    """Replica control. Implementations must be idempotent: the loop may repeat any call."""

    async def instances(self) -> Sequence[InstanceRef]:
        """Every instance the fleet has, in any phase."""
        ...

    async def desired_replicas(self) -> dict[Pool, int]:
        """The replica count each pool is being driven to."""
        ...

    async def set_replicas(self, pool: Pool, replicas: int, remove_first: Sequence[str] = ()) -> None:
        """Drive a pool to `replicas`; on scale-in remove the instances in `remove_first` first
        (the control loop drains them before it calls this)."""
        ...
