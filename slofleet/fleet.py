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
    # Parked in warm standby: weights in the host store, engine memory released, drained. It keeps
    # its place in the replica count (the pod or process stays) but serves nothing.
    STANDBY = "standby"


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """Where an instance can be reached and what state its runtime reports."""

    instance_id: str
    pool: Pool
    phase: Phase
    engine_url: str
    sidecar_address: str
    metrics_url: str = ""
    # When the instance was parked (unix seconds; the standby TTL counts from it); None unless
    # the phase is STANDBY.
    standby_since_s: float | None = None


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
        (the control loop drains them before it calls this). `replicas` counts parked
        instances too: the backend keeps them, the autoscaler does not count them as capacity."""
        ...

    async def set_standby(self, instance_id: str, since_s: float | None) -> None:
        """Record that an instance was parked at `since_s` (its phase reads STANDBY from then on),
        or woken (None: it reads READY again). The engine side (the sidecar's Standby/Wake) is
        the caller's; this only keeps the fleet's view, durably where the backend can."""
        ...
