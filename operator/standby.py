"""Warm standby in the control loop: scale-in parks, scale-out wakes (issue 9, item 4).

Why: a cold start loads the model (minutes for a large one on a GPU node); a parked instance keeps
its weights in its pod's host store with the engine's memory released, and wakes in about the
time of one host-to-device copy of the weights. So scale-in may park the instances it takes out of
service instead of deleting them (up to `spec.memory.standby`, for at most `standbyTtlSeconds`),
and scale-out wakes parked ones before it creates pods, when waking beats a cold start.

The decisions are the pure `plan_scale_in` / `plan_scale_out` of the memory planner; this module
is the wiring around them. The autoscaler keeps thinking in *serving* instances: the loop gives it
replicas without the parked ones (they are not capacity, and not "starting" either), and this
module turns its serving targets back into the counts the backend keeps (targets plus what stays
parked, so a Deployment never deletes a parked pod by accident). A parked instance stays drained
(the gateway sends it nothing: it is draining to the sidecar's Load and not READY to the fleet)
until a wake re-opens it.

Cold start is measured here (first seen starting to first seen ready, at the loop's resolution),
wake time from the sidecar's Wake answer; until measured, `spec.autoscaling.coldStartSeconds` and
the planner's bandwidth estimate stand in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from slofleet.api.v1 import memory_pb2, memory_pb2_grpc, sidecar_pb2, sidecar_pb2_grpc
from slofleet.fleet import FleetBackend, InstanceRef, Phase
from slofleet.instance import Pool
from slofleet.operator.metrics import LoopMetrics
from slofleet.policies.memory_planner import Parked, StandbyConfig, plan_scale_in, plan_scale_out
from slofleet.spec import LLMServiceSpec

log = logging.getLogger("slofleet.operator.standby")

# Parked weights live in each pod's own /dev/shm (memory the pod's limit already bounds), not in a
# budget shared between pods, so only the count (spec.memory.standby) limits parking.
_UNBOUNDED_HOST_BYTES = 1 << 62


def standby_config(spec: LLMServiceSpec) -> StandbyConfig:
    return StandbyConfig(
        cold_start_s=float(spec.autoscaling.cold_start_seconds),
        host_memory_budget_bytes=_UNBOUNDED_HOST_BYTES if spec.memory.standby > 0 else 0,
        max_standby=spec.memory.standby,
        standby_ttl_s=float(spec.memory.standby_ttl_seconds),
    )


class Channels(Protocol):
    """What this module needs of the control loop's SidecarClient: its authenticated channels."""

    def channel(self, address: str) -> grpc.aio.Channel: ...

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...] | None: ...


class MemoryCommands(Protocol):
    """The sidecar commands standby needs; one implementation over gRPC, fakes in tests."""

    async def weight_bytes(self, address: str) -> int | None: ...

    async def standby(self, address: str) -> bool: ...

    async def wake(self, address: str) -> float | None: ...

    async def hold(self, address: str) -> None: ...


class SidecarMemory:
    """MemoryCommands over the sidecars' Memory service (same port and token as `Load`)."""

    def __init__(self, channels: Channels, timeout_seconds: float = 120.0) -> None:
        self.channels = channels
        self.timeout = timeout_seconds

    def _memory(self, address: str) -> memory_pb2_grpc.MemoryStub:
        return memory_pb2_grpc.MemoryStub(self.channels.channel(address))

    async def weight_bytes(self, address: str) -> int | None:
        try:
            status = await self._memory(address).Status(
                memory_pb2.MemoryStatusRequest(), metadata=self.channels.call_metadata, timeout=10.0
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("sidecar=%s event=memory_status_failed code=%s", address, exc.code())
            return None
        return int(status.resident_weight_bytes + status.dropped_weight_bytes)

    async def _serving(self, address: str) -> bool:
        """Whether every weight is resident and the engine runs (what a wake must achieve)."""
        try:
            status = await self._memory(address).Status(
                memory_pb2.MemoryStatusRequest(), metadata=self.channels.call_metadata, timeout=10.0
            )
        except grpc.aio.AioRpcError:
            return False
        return not (status.standby or status.paused or status.dropped_weight_bytes)

    async def standby(self, address: str) -> bool:
        try:
            await self._memory(address).Standby(
                memory_pb2.StandbyRequest(), metadata=self.channels.call_metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("sidecar=%s event=standby_failed code=%s %s", address, exc.code(), exc.details())
            return False
        return True

    async def hold(self, address: str) -> None:
        """Re-assert the drain of a parked instance: a restarted sidecar forgets it, and its Load
        would invite requests into a paused engine. Idempotent; the instance is empty."""
        try:
            await sidecar_pb2_grpc.SidecarStub(self.channels.channel(address)).Drain(
                sidecar_pb2.DrainRequest(timeout_seconds=0.5),
                metadata=self.channels.call_metadata,
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("sidecar=%s event=hold_failed code=%s", address, exc.code())

    async def wake(self, address: str) -> float | None:
        """Wake and re-open for requests (undo the scale-in drain); the wake's seconds, or None
        when the instance cannot serve again. An instance refused as "not in standby" whose
        weights are all resident (its engine restarted) only needs re-opening; one whose weights
        cannot come back (the store lost them) is not re-opened into a paused engine."""
        seconds = 0.0
        try:
            status = await self._memory(address).Wake(
                memory_pb2.WakeRequest(), metadata=self.channels.call_metadata, timeout=self.timeout
            )
            seconds = status.last_operation_seconds
        except grpc.aio.AioRpcError as exc:
            log.warning("sidecar=%s event=wake_refused code=%s %s", address, exc.code(), exc.details())
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or not await self._serving(address):
                return None
        try:
            await sidecar_pb2_grpc.SidecarStub(self.channels.channel(address)).Drain(
                sidecar_pb2.DrainRequest(cancel=True), metadata=self.channels.call_metadata, timeout=10.0
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("sidecar=%s event=reopen_failed code=%s", address, exc.code())
            return None
        return seconds


# (kind "park" | "wake" | "unpark", reason, message): the loop turns them into LoopEvents.
EventSink = Callable[[str, str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PoolAction:
    """What the backend gets for one pool: replicas (serving target + parked kept) and the
    instances to remove first."""

    replicas: int
    remove_first: tuple[str, ...]


def parked_by_pool(refs: Sequence[InstanceRef]) -> dict[Pool, list[InstanceRef]]:
    out: dict[Pool, list[InstanceRef]] = {}
    for ref in refs:
        if ref.phase == Phase.STANDBY:
            out.setdefault(ref.pool, []).append(ref)
    return out


def serving_replicas(desired: Mapping[Pool, int], refs: Sequence[InstanceRef]) -> dict[Pool, int]:
    """The backend's replicas less the parked instances: what the autoscaler may count on."""
    parked = parked_by_pool(refs)
    return {pool: max(0, n - len(parked.get(pool, []))) for pool, n in desired.items()}


def excess_parked(parked: Sequence[Parked], now_s: float, config: StandbyConfig) -> tuple[str, ...]:
    """Parked instances to remove: past the TTL, and the oldest beyond `max_standby` (a spec
    that lowered the count, or standby switched off)."""
    expired = plan_scale_in((), parked, now_s, config).delete
    kept = sorted(
        (p for p in parked if p.instance_id not in expired), key=lambda p: (-p.since_s, p.instance_id)
    )
    return tuple(expired) + tuple(sorted(p.instance_id for p in kept[config.max_standby :]))


class StandbyManager:
    """Turns the autoscaler's serving targets into park, wake and replica actions per pool."""

    def __init__(
        self,
        config: StandbyConfig,
        commands: MemoryCommands,
        backend: FleetBackend,
        metrics: LoopMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.commands = commands
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.cold_start_s: float | None = None  # measured, the latest
        self.wake_s: float | None = None  # measured, the latest
        self._first_starting: dict[str, float] = {}
        self._seen: set[str] = set()
        self._weights: dict[str, int] = {}
        # The parked instances as of the latest observation and the actions since: the pools are
        # settled one after another, and each must see what the others parked or woke.
        self._standby: dict[str, InstanceRef] = {}

    @property
    def parked(self) -> dict[Pool, int]:
        return {pool: len(members) for pool, members in parked_by_pool(list(self._standby.values())).items()}

    @property
    def parked_total(self) -> int:
        return len(self._standby)

    # --- observation -------------------------------------------------------------------------
    def observe(self, refs: Sequence[InstanceRef]) -> None:
        """Measure cold starts: an instance first seen starting that is now ready took (about)
        the time in between. Instances already ready when first seen tell nothing."""
        now = self.clock()
        for ref in refs:
            if ref.instance_id not in self._seen and ref.phase == Phase.STARTING:
                self._first_starting[ref.instance_id] = now
            elif ref.phase in (Phase.READY, Phase.STANDBY) and ref.instance_id in self._first_starting:
                self.cold_start_s = now - self._first_starting.pop(ref.instance_id)
            self._seen.add(ref.instance_id)
        live = {r.instance_id for r in refs}
        self._seen &= live
        self._first_starting = {i: t for i, t in self._first_starting.items() if i in live}
        self._weights = {i: b for i, b in self._weights.items() if i in live}
        self._standby = {r.instance_id: r for r in refs if r.phase == Phase.STANDBY}
        self.metrics.observe_standby(self.parked_total, self.cold_start_s)

    def effective_config(self) -> StandbyConfig:
        """The configured costs, with the measured cold start where there is one."""
        if self.cold_start_s is None:
            return self.config
        return replace(self.config, cold_start_s=self.cold_start_s)

    def _parked(self, refs: Sequence[InstanceRef], now_s: float) -> list[Parked]:
        known = list(self._weights.values())
        typical = max(known) if known else 0
        return [
            Parked(
                r.instance_id,
                self._weights.get(r.instance_id, typical),
                r.standby_since_s if r.standby_since_s is not None else now_s,
                self.wake_s,
            )
            for r in refs
        ]

    # --- actions -------------------------------------------------------------------------------
    async def settle(
        self,
        pool: Pool,
        current: int,
        target: int,
        victims: Sequence[str],
        drained: Mapping[str, bool],
        refs: Sequence[InstanceRef],
        on_event: EventSink,
    ) -> PoolAction:
        """Carry out one pool's decision (`current` and `target` count serving instances; the
        victims were drained already) and say what the backend should keep and remove."""
        now = self.clock()
        config = self.effective_config()
        by_id = {r.instance_id: r for r in refs}
        excess = set(excess_parked(self._parked(list(self._standby.values()), now), now, config))
        remove = sorted(i for i, r in self._standby.items() if r.pool == pool and i in excess)
        for instance_id in remove:
            del self._standby[instance_id]
            self.metrics.standby_event("removed")
            await on_event("unpark", "StandbyRemoved", f"parked {instance_id} removed (standby TTL or count)")
        kept = [r for r in self._standby.values() if r.pool == pool]
        await asyncio.gather(*(self.commands.hold(r.sidecar_address) for r in kept))
        if target > current and kept:
            plan = plan_scale_out(target - current, self._parked(kept, now), config)
            woken = await asyncio.gather(
                *(self.commands.wake(self._standby[i].sidecar_address) for i in plan.wake)
            )
            for instance_id, seconds in zip(plan.wake, woken, strict=True):
                del self._standby[instance_id]
                if seconds is None:
                    remove.append(instance_id)  # cannot serve again: a cold start replaces it
                    self.metrics.standby_event("wake_failed")
                    await on_event("unpark", "WakeFailed", f"{instance_id} did not wake; replaced")
                    continue
                self.wake_s = seconds
                await self.backend.set_standby(instance_id, None)
                self.metrics.standby_event("woken")
                await on_event(
                    "wake",
                    "WokeFromStandby",
                    f"woke {instance_id} in {seconds:.2f} s (cold start {config.cold_start_s:.0f} s); "
                    f"{plan.cold_starts} cold start(s) for the rest",
                )
            return self._settled(pool, target, remove)
        parked = await self._park(victims, drained, by_id, now, config)
        for instance_id in parked:
            await self.backend.set_standby(instance_id, now)
            self._standby[instance_id] = replace(by_id[instance_id], phase=Phase.STANDBY, standby_since_s=now)
            self.metrics.standby_event("parked")
            await on_event("park", "ScaleInToStandby", f"parked {instance_id} in warm standby")
        remove += [v for v in victims if v not in parked]
        return self._settled(pool, target, remove)

    def _settled(self, pool: Pool, target: int, remove: Sequence[str]) -> PoolAction:
        """The backend keeps the serving target plus what stays parked in the pool."""
        self.metrics.observe_standby(self.parked_total, self.cold_start_s)
        return PoolAction(target + self.parked.get(pool, 0), tuple(remove))

    async def _park(
        self,
        victims: Sequence[str],
        drained: Mapping[str, bool],
        by_id: Mapping[str, InstanceRef],
        now_s: float,
        config: StandbyConfig,
    ) -> list[str]:
        """Park the drained victims the planner keeps; returns those now in standby. A victim
        that did not drain is never parked: its requests would freeze in a paused engine."""
        if config.max_standby <= 0:
            return []
        empty = [v for v in victims if drained.get(v) and v in by_id]
        weights = await asyncio.gather(*(self.commands.weight_bytes(by_id[v].sidecar_address) for v in empty))
        removing = []
        for instance_id, nbytes in zip(empty, weights, strict=True):
            if nbytes is not None:
                self._weights[instance_id] = nbytes
                removing.append((instance_id, nbytes))
        plan = plan_scale_in(removing, self._parked(list(self._standby.values()), now_s), now_s, config)
        done = await asyncio.gather(*(self.commands.standby(by_id[i].sidecar_address) for i in plan.park))
        return [i for i, ok in zip(plan.park, done, strict=True) if ok]
