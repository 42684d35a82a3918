"""The control loop's rescheduler (operator/rescheduler.py): its pure decisions, and its bookkeeping
(concurrency bound, no request twice, outcomes counted, Events) with a fake MigrateOut client."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from slofleet.fleet import InstanceRef, Phase
from slofleet.instance import InstanceLoad, Pool
from slofleet.operator.control_loop import ControlLoop, LoopEvent
from slofleet.operator.metrics import METRICS
from slofleet.operator.rescheduler import (
    MigrationResult,
    Rescheduler,
    ReschedulerConfig,
    admit,
    config_from_spec,
    plan_drain,
    plan_round,
)
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.global_autoscaler import ScaleDecision
from slofleet.policies.migration import Migration, MigrationConfig, Reason
from slofleet.spec import parse_spec
from tests.test_migration_policy import inst, req

CFG = ReschedulerConfig(policy=MigrationConfig(out_threshold=40.0, in_threshold=60.0), max_concurrent=2)


def busy(iid: str, n: int = 10) -> InstanceLoad:
    return inst(iid, [req(f"{iid}{i}", 800 + 160 * i) for i in range(n)])


def refs(*ids: str) -> dict[str, InstanceRef]:
    return {i: InstanceRef(i, Pool.MIXED, Phase.READY, f"http://{i}", f"{i}:50051") for i in ids}


def m(rid: str, reason: Reason = Reason.LOAD_BALANCE) -> Migration:
    return Migration(rid, "a", "b", reason, 1)


def test_admit_bounds_concurrency_skips_running_requests_and_unwanted_reasons() -> None:
    plan = [m("r1"), m("r2", Reason.PRIORITY), m("r3"), m("r4")]
    assert admit(plan, in_flight=set(), reasons=set(Reason), max_concurrent=2) == plan[:2]
    assert admit(plan, in_flight={"r1"}, reasons=set(Reason), max_concurrent=3) == [plan[1], plan[2]]
    assert admit(plan, in_flight=set(), reasons={Reason.LOAD_BALANCE}, max_concurrent=9) == [
        plan[0], plan[2], plan[3],
    ]  # fmt: skip
    assert admit(plan, in_flight={"x", "y"}, reasons=set(Reason), max_concurrent=2) == []


def test_plan_round_never_uses_a_scale_in_victim() -> None:
    loads = [busy("a"), inst("b", []), inst("c", [])]
    plan = plan_round(loads, CFG, in_flight=())
    assert [(p.source, p.destination) for p in plan] == [("a", "b")]
    # b is being removed: it is no destination, and c takes the request instead.
    assert [(p.source, p.destination) for p in plan_round(loads, CFG, (), victims={"b"})] == [("a", "c")]
    # A victim is no source of a step either (drain moves its requests).
    assert plan_round(loads, CFG, (), victims={"a"}) == []


def test_plan_drain_moves_every_running_request_of_the_victim_only() -> None:
    loads = [busy("a", 4), busy("b", 10), inst("c", [])]
    plan = plan_drain(loads, CFG, in_flight={"a1"}, victims={"a"})
    assert sorted(p.request_id for p in plan) == ["a0", "a2", "a3"]
    assert {(p.source, p.destination, p.reason) for p in plan} == {("a", "c", Reason.DRAIN)}


def test_spec_turns_migration_off_or_limits_its_triggers() -> None:
    assert config_from_spec(parse_spec({"model": "m", "migration": {"enabled": False}})) is None
    cfg = config_from_spec(parse_spec({"model": "m", "migration": {"triggers": ["drain", "priority"]}}))
    assert cfg is not None and cfg.reasons == {Reason.DRAIN, Reason.PRIORITY}
    full = config_from_spec(parse_spec({"model": "m"}))
    assert full is not None and full.reasons == set(Reason)


class FakeClient:
    """MigrateOut that waits to be released; records how many ran at once."""

    def __init__(self, outcome: str = "migrated") -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, str, str]] = []
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def migrate_out(
        self, source: InstanceRef, target: InstanceRef, request_id: str, config: ReschedulerConfig
    ) -> MigrationResult:
        self.calls.append((source.instance_id, target.instance_id, request_id))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return MigrationResult(self.outcome, "" if self.outcome == "migrated" else "no room", 0.01, 0.5, 1024)

    async def close(self) -> None:
        pass


def migrations_total(service: str, reason: str, outcome: str) -> float:
    ns, _, name = service.rpartition("/")
    return (
        METRICS.registry.get_sample_value(
            "slofleet_operator_migrations_total",
            {"namespace": ns, "llmservice": name, "reason": reason, "outcome": outcome},
        )
        or 0.0
    )


async def test_step_starts_in_the_background_and_never_twice() -> None:
    events: list[LoopEvent] = []

    async def sink(e: LoopEvent) -> None:
        events.append(e)

    client = FakeClient()
    r = Rescheduler("ns/resched-step", CFG, client, sink)  # type: ignore[arg-type]
    loads = [busy("a"), inst("b", []), inst("c", [])]
    started = r.step(loads, refs("a", "b", "c"))
    assert [s.request_id for s in started] == ["a0"]
    await asyncio.sleep(0)
    assert r.in_flight.keys() == {"a0"}
    # The same picture next step: a0 is migrating, so the next request goes.
    again = r.step(loads, refs("a", "b", "c"))
    assert [s.request_id for s in again] == ["a1"]
    assert r.step(loads, refs("a", "b", "c")) == []  # two running: the bound
    client.release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not r.in_flight
    assert migrations_total("ns/resched-step", "load_balance", "migrated") == 2
    assert [e.kind for e in events] == ["migrate", "migrate"] and events[0].reason == "Migrated"
    await r.close()


async def test_drain_runs_every_move_within_the_bound_and_counts_outcomes() -> None:
    client = FakeClient(outcome="rejected")
    events: list[LoopEvent] = []

    async def sink(e: LoopEvent) -> None:
        events.append(e)

    r = Rescheduler("ns/resched-drain", CFG, client, sink)  # type: ignore[arg-type]
    loads = [busy("a", 5), inst("b", []), inst("c", [])]
    task = asyncio.create_task(r.drain(["a"], loads, refs("a", "b", "c")))
    for _ in range(20):
        await asyncio.sleep(0)
    assert client.running == 2
    client.release.set()
    counts = await task
    assert counts == {"rejected": 5} and client.peak == 2
    assert sorted(c[2] for c in client.calls) == [f"a{i}" for i in range(5)]
    assert migrations_total("ns/resched-drain", "drain", "rejected") == 5
    assert all(e.reason == "MigrationNotDone" and "no room" in e.message for e in events)
    await r.close()


class OneVictimFleet:
    """Backend double: two ready instances, the autoscaler removes 'a'."""

    def __init__(self) -> None:
        self.replicas: list[tuple[Pool, int, Sequence[str]]] = []

    async def instances(self) -> list[InstanceRef]:
        return list(refs("a", "b").values())

    async def desired_replicas(self) -> dict[Pool, int]:
        return {Pool.MIXED: 2}

    async def set_replicas(self, pool: Pool, replicas: int, remove_first: Sequence[str] = ()) -> None:
        self.replicas.append((pool, replicas, tuple(remove_first)))


class ScaleInA(StaticAutoscaler):
    def decide(self, obs: object) -> ScaleDecision:  # type: ignore[override]
        return ScaleDecision(
            now_s=0.0, targets={Pool.MIXED: 1}, current={Pool.MIXED: 2}, scale_in={Pool.MIXED: ("a",)},
            reasons={Pool.MIXED: "test"},
        )  # fmt: skip


class Sidecars:
    def __init__(self, loads: dict[str, InstanceLoad], order: list[str]) -> None:
        self.loads = loads
        self.order = order

    async def load(self, address: str) -> InstanceLoad | None:
        return self.loads[address.partition(":")[0]]

    async def drain(self, address: str, timeout_seconds: float) -> bool:
        self.order.append(f"drain {address.partition(':')[0]}")
        return True


@pytest.mark.parametrize("with_rescheduler", [True, False])
async def test_control_loop_migrates_the_victims_requests_out_before_lowering_replicas(
    with_rescheduler: bool,
) -> None:
    order: list[str] = []
    events: list[LoopEvent] = []

    async def sink(e: LoopEvent) -> None:
        events.append(e)

    client = FakeClient()
    client.release.set()
    fleet = OneVictimFleet()
    rescheduler = Rescheduler("ns/resched-loop", CFG, client, sink) if with_rescheduler else None  # type: ignore[arg-type]
    loop = ControlLoop(
        "ns/resched-loop", fleet, ScaleInA(1), Sidecars({"a": busy("a", 3), "b": inst("b", [])}, order),  # type: ignore[arg-type]
        None, sink, rescheduler=rescheduler,
    )  # fmt: skip
    await loop.step()
    await loop.close()
    assert fleet.replicas == [(Pool.MIXED, 1, ("a",))]
    drain = next(e for e in events if e.kind == "drain")
    if with_rescheduler:
        assert sorted(c[2] for c in client.calls) == ["a0", "a1", "a2"]
        assert "migrations: {'migrated': 3}" in drain.message
    else:
        assert client.calls == [] and "migrations: {}" in drain.message
    assert order == ["drain a"]


async def test_drain_plans_again_on_fresh_load_for_requests_it_did_not_see_running() -> None:
    client = FakeClient()
    client.release.set()

    async def sink(e: LoopEvent) -> None:
        pass

    r = Rescheduler("ns/resched-reload", CFG, client, sink)  # type: ignore[arg-type]
    both = [req("a0", 800), req("a1", 900)]
    # The first Load was read while a1 was being scheduled: the engine counted one running.
    first = [inst("a", both, running=1), inst("b", [])]
    fresh = [inst("a", both), inst("b", [])]
    reloads = 0

    async def reload() -> list[InstanceLoad]:
        nonlocal reloads
        reloads += 1
        return fresh

    counts = await r.drain(["a"], first, refs("a", "b"), reload=reload)
    assert counts == {"migrated": 2} and [c[2] for c in client.calls] == ["a0", "a1"]
    assert reloads == 2  # after the round that moved a0, and after the one that moved a1
    await r.close()
