"""The global control loop: observe every instance, decide, act through a FleetBackend.

One copy serves both runtimes: the operator runs it per LLMService on a kopf timer with the
Kubernetes backend, `slofleet up` runs it with the local process backend. Each step:
  1. pulls `Load` from every ready instance's sidecar (gRPC) and the gateway's queue status;
  2. asks the autoscaler policy (pure, slofleet.policies) for replicas per pool;
  3. drains the instances chosen for scale-in (their sidecars stop taking requests and report
     when empty) before lowering replicas, so scale-in never cuts a request;
  4. re-asserts every pool's target, which also replaces instances that died.
With warm standby (operator/standby.py) step 3 parks drained instances instead of removing them
and scale-out wakes parked ones first; the autoscaler never counts parked ones as capacity.
Decisions are reported through `on_event` (the operator turns them into status.lastScale and
Kubernetes Events; the local fleet logs them and the replay report counts them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import aiohttp
import grpc

from slofleet.api.convert import load_from_pb
from slofleet.api.v1 import sidecar_pb2, sidecar_pb2_grpc
from slofleet.fleet import FleetBackend, InstanceRef, Phase
from slofleet.instance import InstanceLoad, Pool, RequestClass
from slofleet.operator.metrics import METRICS
from slofleet.operator.standby import SidecarMemory, StandbyManager, serving_replicas
from slofleet.policies.baselines import QueueLengthAutoscaler, StaticAutoscaler, UtilizationAutoscaler
from slofleet.policies.global_autoscaler import (
    Autoscaler,
    BatchGroup,
    ChironAutoscaler,
    ChironConfig,
    FleetObservation,
    PoolBounds,
    ScaleDecision,
    choose_scale_in,
)
from slofleet.policies.memory_planner import StandbyConfig
from slofleet.spec import LLMServiceSpec

if TYPE_CHECKING:
    from slofleet.operator.rescheduler import Rescheduler

log = logging.getLogger("slofleet.operator.control_loop")


@dataclass(frozen=True, slots=True)
class LoopEvent:
    """Something the loop did that a person watching the service should see."""

    kind: str  # "scale" | "replace" | "drain" | "migrate" | "park" | "wake" | "unpark"
    reason: str
    message: str
    decision: ScaleDecision | None = None


EventSink = Callable[[LoopEvent], Awaitable[None]]


def pool_bounds(spec: LLMServiceSpec) -> dict[Pool, PoolBounds]:
    """Per-pool bounds from the spec; the mixed pool inherits spec.replicas when not set."""
    p, cap = spec.pools, spec.replicas.max

    def bounds(b: object) -> PoolBounds:
        return PoolBounds(b.min, b.max if b.max is not None else cap)  # type: ignore[attr-defined]

    return {Pool.INTERACTIVE: bounds(p.interactive), Pool.MIXED: bounds(p.mixed), Pool.BATCH: bounds(p.batch)}


def autoscaler_from_spec(spec: LLMServiceSpec) -> Autoscaler:
    a = spec.autoscaling
    bounds = pool_bounds(spec)
    single = PoolBounds(spec.replicas.min, spec.replicas.max)
    if a.policy == "chiron":
        config = ChironConfig(
            bounds=bounds,
            stabilization_s=float(a.scale_down_stabilization_seconds),
            min_step_up=a.max_scale_step,
            cold_start_s=float(a.cold_start_seconds),
            min_serving=spec.replicas.min,
        )
        return ChironAutoscaler(config)
    from slofleet.policies.baselines import HpaConfig

    hpa = HpaConfig(bounds=single, scale_down_stabilization_s=float(a.scale_down_stabilization_seconds),
                    min_step_up=a.max_scale_step)  # fmt: skip
    if a.policy == "utilization":
        return UtilizationAutoscaler("kv", 0.7, hpa)
    if a.policy == "queue":
        return QueueLengthAutoscaler(4.0, hpa)
    return StaticAutoscaler(spec.replicas.initial or spec.replicas.min or 1)


def initial_replicas(spec: LLMServiceSpec, autoscaler: Autoscaler) -> dict[Pool, int]:
    """Where a fresh fleet starts: replicas.initial (or min) spread over the policy's pools."""
    total = spec.replicas.initial if spec.replicas.initial is not None else spec.replicas.min
    bounds = pool_bounds(spec)
    if Pool.INTERACTIVE not in autoscaler.pools:
        return {Pool.MIXED: max(total, bounds[Pool.MIXED].min)}
    mixed = max(bounds[Pool.MIXED].min, 1 if total > 1 else 0)
    interactive = max(bounds[Pool.INTERACTIVE].min, total - mixed)
    return {Pool.INTERACTIVE: interactive, Pool.MIXED: mixed, Pool.BATCH: bounds[Pool.BATCH].min}


class SidecarClient:
    """Long-lived authenticated channels to the sidecars, one per address."""

    def __init__(self, token: str | None, timeout_seconds: float = 2.0) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._timeout = timeout_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self._metadata

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to a sidecar; its Sidecar and Memory services share the port."""
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    def _stub(self, address: str) -> sidecar_pb2_grpc.SidecarStub:
        return sidecar_pb2_grpc.SidecarStub(self.channel(address))

    async def load(self, address: str) -> InstanceLoad | None:
        try:
            msg = await self._stub(address).Load(
                sidecar_pb2.LoadRequest(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("sidecar=%s event=load_failed code=%s", address, exc.code())
            return None
        return load_from_pb(msg)

    async def drain(self, address: str, timeout_seconds: float) -> bool:
        """Stop the instance taking requests and wait (bounded) until it is empty."""
        try:
            resp = await self._stub(address).Drain(
                sidecar_pb2.DrainRequest(timeout_seconds=timeout_seconds),
                metadata=self._metadata,
                timeout=timeout_seconds + 5.0,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("sidecar=%s event=drain_failed code=%s", address, exc.code())
            return False
        return bool(resp.drained)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()


def _batch_groups(
    status: Mapping[str, object], now_s: float, expected_tokens: float
) -> tuple[BatchGroup, ...]:
    groups = []
    for b in status.get("batches", []) or []:  # type: ignore[union-attr]
        groups.append(
            BatchGroup(
                group_id=str(b["id"]),
                queued_requests=int(b["pending"]),
                in_flight_requests=0,
                expected_output_tokens=expected_tokens,
                deadline_s=now_s + float(b["deadline_slack_seconds"]),
            )
        )
    return tuple(groups)


def observe(
    now_s: float,
    replicas: Mapping[Pool, int],
    loads: Sequence[InstanceLoad],
    gateway_status: Mapping[str, object] | None,
    expected_batch_tokens: float,
) -> FleetObservation:
    """Build the autoscaler's input from sidecar loads and the gateway's queue status (pure)."""
    reqs = [r for ld in loads for r in ld.requests]
    inter = sum(1 for r in reqs if r.request_class == RequestClass.INTERACTIVE)
    batch = len(reqs) - inter
    status = gateway_status or {}
    return FleetObservation(
        now_s=now_s,
        replicas=dict(replicas),
        loads=tuple(loads),
        interactive_in_flight=inter,
        interactive_queued=int(status.get("interactive_queue_depth", 0) or 0),  # type: ignore[arg-type]
        batch_in_flight=batch,
        batch_queued=int(status.get("batch_queue_depth", 0) or 0),  # type: ignore[arg-type]
        batch_groups=_batch_groups(status, now_s, expected_batch_tokens),
    )


def cap_total(decision: ScaleDecision, max_total: int | None) -> ScaleDecision:
    """Hold the pools' sum to spec.replicas.max: per-pool bounds alone would let every pool grow
    to it. Only growth is trimmed (largest growth first), so a cap never forces a scale-in."""
    if max_total is None:
        return decision
    targets = dict(decision.targets)
    while sum(targets.values()) > max_total:
        growth = {p: t - decision.current.get(p, 0) for p, t in targets.items()}
        pool = max(growth, key=lambda p: (growth[p], p.value))
        if growth[pool] <= 0:
            break
        targets[pool] -= 1
    if targets == dict(decision.targets):
        return decision
    note = f" (capped at {max_total} instances in all)"
    reasons = {p: r + (note if targets[p] != decision.targets[p] else "")
               for p, r in decision.reasons.items()}  # fmt: skip
    return replace(decision, targets=targets, reasons=reasons)


def retire_unused_pools(
    decision: ScaleDecision, desired: Mapping[Pool, int], loads: Sequence[InstanceLoad], policy: str
) -> ScaleDecision:
    """Pools the policy does not manage but that still hold instances (left by an earlier policy of
    the service, e.g. chiron's interactive pool after a switch to static) go to zero, drained and
    migrated out first like any scale-in: no policy would ever count or remove them otherwise."""
    extra = {p: n for p, n in desired.items() if p not in decision.targets and n > 0}
    if not extra:
        return decision
    why = f"pool not used by the {policy} policy: retired"
    return replace(
        decision,
        current={**decision.current, **extra},
        targets={**decision.targets, **dict.fromkeys(extra, 0)},
        reasons={**decision.reasons, **dict.fromkeys(extra, why)},
        scale_in={**decision.scale_in, **{p: choose_scale_in(loads, p, n) for p, n in extra.items()}},
    )


class ControlLoop:
    def __init__(
        self,
        service: str,
        backend: FleetBackend,
        autoscaler: Autoscaler,
        sidecars: SidecarClient,
        gateway_url: str | None,
        on_event: EventSink,
        *,
        drain_timeout_seconds: float = 120.0,
        expected_batch_tokens: float = 256.0,
        max_total_replicas: int | None = None,
        clock: Callable[[], float] = time.time,
        rescheduler: Rescheduler | None = None,
        standby: StandbyConfig | None = None,
    ) -> None:
        self.service = service
        # `service` is "namespace/name" in a cluster and "name" locally; metrics label both apart.
        namespace, _, name = service.rpartition("/")
        self.metrics = METRICS.loop(namespace, name)
        self.backend = backend
        self.autoscaler = autoscaler
        self.sidecars = sidecars
        self.gateway_url = gateway_url
        self.on_event = on_event
        self.drain_timeout_seconds = drain_timeout_seconds
        self.expected_batch_tokens = expected_batch_tokens
        self.max_total_replicas = max_total_replicas
        self.clock = clock
        # Live migration (Llumnix): rebalances every step and empties scale-in victims first.
        self.rescheduler = rescheduler
        # Always present: with standby off it only removes instances parked under an earlier spec.
        self.standby = StandbyManager(
            standby or StandbyConfig(max_standby=0), SidecarMemory(sidecars), backend, self.metrics, clock
        )
        self._session: aiohttp.ClientSession | None = None

    async def _gateway_status(self) -> Mapping[str, object] | None:
        if not self.gateway_url:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            async with self._session.get(f"{self.gateway_url}/slofleet/v1/status") as resp:
                if resp.status == 200:
                    return await resp.json()
        except (aiohttp.ClientError, TimeoutError):
            log.debug("service=%s event=gateway_status_unavailable", self.service)
        return None

    async def _loads(self, refs: Sequence[InstanceRef]) -> list[InstanceLoad]:
        ready = [r for r in refs if r.phase == Phase.READY]
        results = await asyncio.gather(*(self.sidecars.load(r.sidecar_address) for r in ready))
        out = []
        for ref, load in zip(ready, results, strict=True):
            if load is not None:
                # The fleet, not the sidecar's flag, is the truth about which pool an instance is in.
                out.append(load if load.pool == ref.pool else _with_pool(load, ref.pool))
        return out

    async def step(self) -> ScaleDecision:
        refs = await self.backend.instances()
        self.standby.observe(refs)
        failed = [r for r in refs if r.phase == Phase.FAILED]
        # The autoscaler counts serving instances only; parked ones are added back in `settle`.
        desired = serving_replicas(await self.backend.desired_replicas(), refs)
        loads, status = await asyncio.gather(self._loads(refs), self._gateway_status())
        obs = observe(self.clock(), desired, loads, status, self.expected_batch_tokens)
        decision = cap_total(self.autoscaler.decide(obs), self.max_total_replicas)
        decision = retire_unused_pools(decision, desired, loads, self.autoscaler.name)
        self.metrics.observe_fleet(Counter((r.pool.value, r.phase.value) for r in refs))
        self.metrics.observe_targets(
            {p.value: n for p, n in desired.items()}, {p.value: n for p, n in decision.targets.items()}
        )
        by_id = {r.instance_id: r for r in refs}
        if self.rescheduler is not None:
            victims_all = {v for vs in decision.scale_in.values() for v in vs}
            self.rescheduler.step(loads, by_id, victims_all)
        for pool, target in decision.targets.items():
            if pool not in self.autoscaler.pools and target == 0 and desired.get(pool, 0) == 0:
                continue
            victims = decision.scale_in.get(pool, ())
            drained_by: dict[str, bool] = {}
            if victims:
                # The sidecars' Drain keeps new requests away while the rescheduler moves the running
                # ones out; Drain's bounded wait is the fallback for what could not move.
                moved, drained = await asyncio.gather(
                    self._migrate_out(victims, loads, by_id),
                    asyncio.gather(
                        *(self.sidecars.drain(by_id[v].sidecar_address, self.drain_timeout_seconds)
                          for v in victims if v in by_id)
                    ),
                )  # fmt: skip
                drained_by = dict(zip([v for v in victims if v in by_id], drained, strict=True))
                for ok in drained:
                    self.metrics.drained(ok)
                await self.on_event(
                    LoopEvent("drain", "ScaleIn", f"drained {list(victims)}: {drained}; migrations: {moved}")
                )
            action = await self.standby.settle(
                pool, desired.get(pool, 0), target, victims, drained_by, refs, self._standby_event
            )
            await self.backend.set_replicas(pool, action.replicas, remove_first=action.remove_first)
        if decision.changed:
            await self.on_event(LoopEvent("scale", "Autoscaled", decision.summary(), decision))
        for ref in failed:
            self.metrics.replacements.inc()
            await self.on_event(
                LoopEvent("replace", "InstanceFailed", f"instance {ref.instance_id} failed; replaced")
            )
        return decision

    async def _migrate_out(
        self, victims: Sequence[str], loads: Sequence[InstanceLoad], by_id: Mapping[str, InstanceRef]
    ) -> dict[str, int]:
        if self.rescheduler is None:
            return {}
        refs = list(by_id.values())
        return await self.rescheduler.drain(victims, loads, by_id, reload=lambda: self._loads(refs))

    async def _standby_event(self, kind: str, reason: str, message: str) -> None:
        await self.on_event(LoopEvent(kind, reason, message))

    async def run(self, interval_seconds: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self.clock()
            with self.metrics.duration.time():
                try:
                    await self.step()
                except Exception:  # the loop must outlive any one bad step; the next step retries
                    self.metrics.errors.inc()
                    log.exception("service=%s event=control_step_failed", self.service)
            elapsed = self.clock() - started
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval_seconds - elapsed))
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self.rescheduler is not None:
            await self.rescheduler.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _with_pool(load: InstanceLoad, pool: Pool) -> InstanceLoad:
    return replace(load, pool=pool)
