"""Live migration in the control loop: Llumnix's rescheduling on live Load, through the sidecars.

Each control step plans with the pure policy (`slofleet.policies.migration.plan_migrations`, the
same one the simulator runs) and starts the chosen migrations as background tasks: a migration
takes seconds (pre-copy while the request decodes), a step must not wait for it. Each is a
`MigrateOut` call on the source's sidecar, which moves the request's KV to the destination's
sidecar and stops it; the gateway then cuts the client's stream over. Concurrency is bounded
(every migration copies KV on two hosts) and a request is never in two migrations at once.

Before a scale-in the loop calls `drain`: every running request on the victims migrates out (the
sidecar's own Drain, run beside it by the loop, keeps new requests away and waits for what could
not move). Every finished migration is counted by reason and outcome and reported as a LoopEvent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import grpc

from slofleet.api.v1 import migration_pb2, migration_pb2_grpc
from slofleet.fleet import InstanceRef
from slofleet.instance import InstanceLoad
from slofleet.operator.control_loop import EventSink, LoopEvent
from slofleet.operator.metrics import METRICS, LoopMetrics
from slofleet.policies.migration import Migration, MigrationConfig, Reason, Strategy, plan_migrations
from slofleet.spec import LLMServiceSpec

log = logging.getLogger("slofleet.operator.rescheduler")

# The spec's trigger names (crds/llmservice.yaml) and the policy's reasons.
TRIGGERS: Mapping[str, Reason] = {
    "loadBalance": Reason.LOAD_BALANCE,
    "defragment": Reason.DEFRAGMENT,
    "priority": Reason.PRIORITY,
    "drain": Reason.DRAIN,
}
# A sidecar that could not be asked at all (down, wrong token): the request stays where it is.
UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class ReschedulerConfig:
    policy: MigrationConfig = field(default_factory=MigrationConfig)
    reasons: frozenset[Reason] = frozenset(Reason)
    # Migrations running at once across the service (each copies KV on two hosts).
    max_concurrent: int = 2
    # Llumnix's multi-stage protocol: stop once a stage copied at most `cutover_blocks` new blocks.
    max_stages: int = 8
    cutover_blocks: int = 2
    timeout_seconds: float = 120.0
    # Planning rounds of a scale-in drain (each on fresh Load when the caller can reload it).
    drain_rounds: int = 3


def config_from_spec(spec: LLMServiceSpec) -> ReschedulerConfig | None:
    """spec.migration: None when disabled; otherwise the triggers it names, Llumnix's defaults."""
    if not spec.migration.enabled:
        return None
    reasons = frozenset(TRIGGERS[t] for t in spec.migration.triggers)
    return ReschedulerConfig(policy=MigrationConfig(strategy=Strategy.SHORTEST), reasons=reasons)


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """How one MigrateOut ended (outcome: the proto's name without its prefix, lower case)."""

    outcome: str
    message: str = ""
    stop_seconds: float = 0.0
    total_seconds: float = 0.0
    bytes_copied: int = 0

    @property
    def moved(self) -> bool:
        return self.outcome == "migrated"


def admit(
    plan: Iterable[Migration],
    in_flight: Collection[str],
    reasons: Collection[Reason],
    max_concurrent: int,
) -> list[Migration]:
    """The planned migrations to start now (pure): allowed reasons, none of a request already
    migrating, at most `max_concurrent` running in all."""
    room = max(0, max_concurrent - len(in_flight))
    out: list[Migration] = []
    seen = set(in_flight)
    for m in plan:
        if len(out) >= room:
            break
        if m.reason in reasons and m.request_id not in seen:
            out.append(m)
            seen.add(m.request_id)
    return out


def plan_round(
    loads: Sequence[InstanceLoad],
    config: ReschedulerConfig,
    in_flight: Collection[str],
    victims: Collection[str] = (),
) -> list[Migration]:
    """A step's migrations (pure): victims of a scale-in are neither sources (`drain` moves their
    requests) nor destinations; the rest is the policy's plan, admitted."""
    view = [replace(ld, draining=True, requests=()) if ld.instance_id in victims else ld for ld in loads]
    plan = plan_migrations(view, config.policy, in_flight)
    return admit(plan, in_flight, config.reasons, config.max_concurrent)


def plan_drain(
    loads: Sequence[InstanceLoad],
    config: ReschedulerConfig,
    in_flight: Collection[str],
    victims: Collection[str],
) -> list[Migration]:
    """Every running request of the victims, each to a destination with room (pure). Other
    instances are not sources here; concurrency is applied when the migrations run."""
    view = [
        replace(ld, draining=True) if ld.instance_id in victims else replace(ld, requests=()) for ld in loads
    ]
    total = sum(ld.running_requests for ld in loads if ld.instance_id in victims)
    policy = replace(config.policy, max_migrations=max(1, total))
    return [m for m in plan_migrations(view, policy, in_flight) if m.reason is Reason.DRAIN]


class MigrationClient:
    """`MigrateOut` on a source's sidecar (authenticated, one channel per address)."""

    def __init__(self, token: str | None) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> migration_pb2_grpc.MigrationStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return migration_pb2_grpc.MigrationStub(self._channels[address])

    async def migrate_out(
        self, source: InstanceRef, target: InstanceRef, request_id: str, config: ReschedulerConfig
    ) -> MigrationResult:
        req = migration_pb2.MigrateOutRequest(
            request_id=request_id,
            target_sidecar=target.sidecar_address,
            target_instance=target.instance_id,
            max_stages=config.max_stages,
            cutover_blocks=config.cutover_blocks,
            timeout_seconds=config.timeout_seconds,
        )
        last: migration_pb2.MigrationProgress | None = None
        try:
            call = self._stub(source.sidecar_address).MigrateOut(
                req, metadata=self._metadata, timeout=config.timeout_seconds + 30.0
            )
            async for progress in call:
                last = progress
        except grpc.aio.AioRpcError as exc:
            return MigrationResult(UNREACHABLE, f"MigrateOut on {source.instance_id}: {exc.code().name}")
        if last is None or not last.done:
            return MigrationResult(UNREACHABLE, "MigrateOut ended without a result")
        name = migration_pb2.MigrationOutcome.Name(last.outcome).removeprefix("MIGRATION_OUTCOME_").lower()
        return MigrationResult(name, last.message, last.stop_seconds, last.total_seconds, last.bytes_copied)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()


class Rescheduler:
    def __init__(
        self,
        service: str,
        config: ReschedulerConfig,
        client: MigrationClient,
        on_event: EventSink,
        metrics: LoopMetrics | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.client = client
        self.on_event = on_event
        if metrics is None:
            namespace, _, name = service.rpartition("/")
            metrics = METRICS.loop(namespace, name)
        self.metrics = metrics
        self.in_flight: dict[str, Migration] = {}
        self._tasks: set[asyncio.Task[MigrationResult]] = set()

    def step(
        self, loads: Sequence[InstanceLoad], refs: Mapping[str, InstanceRef], victims: Collection[str] = ()
    ) -> list[Migration]:
        """Start this step's migrations in the background; returns those started."""
        started = []
        for m in plan_round(loads, self.config, self.in_flight, victims):
            if m.source in refs and m.destination in refs:
                self._start(m, refs)
                started.append(m)
        return started

    async def drain(
        self,
        victims: Collection[str],
        loads: Sequence[InstanceLoad],
        refs: Mapping[str, InstanceRef],
        reload: Callable[[], Awaitable[Sequence[InstanceLoad]]] | None = None,
    ) -> dict[str, int]:
        """Migrate every running request off the victims, `max_concurrent` at a time, and wait for
        all; returns the count of each outcome. With `reload`, plans again on fresh Load after each
        round (a Load read while requests start may count fewer running than were reported), for
        requests not tried yet, up to `drain_rounds`. What did not move is left to the sidecar's Drain."""
        counts: dict[str, int] = {}
        if Reason.DRAIN not in self.config.reasons:
            return counts
        tried: set[str] = set()
        limit = asyncio.Semaphore(max(1, self.config.max_concurrent))

        async def one(m: Migration) -> MigrationResult:
            async with limit:
                return await self._run(m, refs)

        for _ in range(self.config.drain_rounds):
            plan = [
                m
                for m in plan_drain(loads, self.config, {*self.in_flight, *tried}, victims)
                if m.source in refs and m.destination in refs
            ]
            if not plan:
                break
            for m in plan:
                self.in_flight[m.request_id] = m
                tried.add(m.request_id)
            for r in await asyncio.gather(*(one(m) for m in plan)):
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
            if reload is None:
                break
            loads = await reload()
        return counts

    def _start(self, m: Migration, refs: Mapping[str, InstanceRef]) -> None:
        self.in_flight[m.request_id] = m
        task = asyncio.create_task(self._run(m, refs), name=f"migrate-{m.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, m: Migration, refs: Mapping[str, InstanceRef]) -> MigrationResult:
        log.info(
            "service=%s event=migration_start request_id=%s from=%s to=%s reason=%s blocks=%d",
            self.service, m.request_id, m.source, m.destination, m.reason.value, m.blocks,
        )  # fmt: skip
        try:
            result = await self.client.migrate_out(
                refs[m.source], refs[m.destination], m.request_id, self.config
            )
        finally:
            self.in_flight.pop(m.request_id, None)
        log.info(
            "service=%s event=migration_done request_id=%s from=%s to=%s reason=%s outcome=%s stop_s=%.3f "
            "total_s=%.3f bytes=%d message=%s",
            self.service, m.request_id, m.source, m.destination, m.reason.value, result.outcome,
            result.stop_seconds, result.total_seconds, result.bytes_copied, result.message,
        )  # fmt: skip
        self.metrics.migrated(m.reason.value, result.outcome)
        kind_reason = "Migrated" if result.moved else "MigrationNotDone"
        detail = f"stop {result.stop_seconds * 1000:.0f} ms" if result.moved else result.message
        event = LoopEvent(
            "migrate",
            kind_reason,
            f"request {m.request_id} {m.source} -> {m.destination} ({m.reason.value}): "
            f"{result.outcome}; {detail}",
        )
        try:
            await self.on_event(event)
        except Exception:  # an Event that cannot be written must not lose the migration's result
            log.exception("service=%s event=migration_event_failed request_id=%s", self.service, m.request_id)
        return result

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()


def rescheduler_for(
    service: str, spec: LLMServiceSpec, token: str | None, on_event: EventSink
) -> Rescheduler | None:
    """The control loop's rescheduler for an LLMService (operator and `slofleet up` alike)."""
    config = config_from_spec(spec)
    return None if config is None else Rescheduler(service, config, MigrationClient(token), on_event)
