"""Warm standby in the control loop (operator/standby.py) with fake sidecars and a fake fleet:
scale-in parks drained victims up to spec.memory.standby, scale-out wakes parked instances before
it creates any when waking beats a cold start, and the autoscaler never sees a parked instance as
capacity while the backend keeps it in its replicas."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from slofleet.api.v1 import memory_pb2 as mpb
from slofleet.api.v1 import memory_pb2_grpc as mpb_grpc
from slofleet.api.v1 import sidecar_pb2 as spb
from slofleet.api.v1 import sidecar_pb2_grpc as spb_grpc
from slofleet.fleet import InstanceRef, Phase
from slofleet.instance import InstanceLoad, Pool
from slofleet.local import status as local_status
from slofleet.operator.control_loop import ControlLoop, LoopEvent, SidecarClient
from slofleet.operator.metrics import OperatorMetrics
from slofleet.operator.standby import (
    SidecarMemory,
    StandbyManager,
    excess_parked,
    serving_replicas,
    standby_config,
)
from slofleet.policies.global_autoscaler import FleetObservation, ScaleDecision
from slofleet.policies.memory_planner import Parked, StandbyConfig
from slofleet.spec import parse_spec

WEIGHTS = 16 * 10**9  # 16 GB: 0.5 s + 0.8 s to wake at the planner's 20 GB/s
CONFIG = StandbyConfig(
    cold_start_s=60.0, host_memory_budget_bytes=1 << 62, max_standby=2, standby_ttl_s=600.0
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeFleet:
    """A FleetBackend that records calls; set_replicas only records (the test reads the counts)."""

    refs: dict[str, InstanceRef]
    desired: dict[Pool, int]
    calls: list[tuple[str, object, ...]] = field(default_factory=list)

    async def instances(self) -> Sequence[InstanceRef]:
        return list(self.refs.values())

    async def desired_replicas(self) -> dict[Pool, int]:
        return dict(self.desired)

    async def set_replicas(self, pool: Pool, replicas: int, remove_first: Sequence[str] = ()) -> None:
        self.calls.append(("set_replicas", pool, replicas, tuple(remove_first)))
        self.desired[pool] = replicas

    async def set_standby(self, instance_id: str, since_s: float | None) -> None:
        self.calls.append(("set_standby", instance_id, since_s))
        ref = self.refs[instance_id]
        phase = Phase.READY if since_s is None else Phase.STANDBY
        self.refs[instance_id] = replace(ref, phase=phase, standby_since_s=since_s)

    def replicas_set(self, pool: Pool) -> tuple[int, tuple[str, ...]]:
        (_, _, replicas, remove), *_ = [
            c for c in reversed(self.calls) if c[0] == "set_replicas" and c[1] == pool
        ]
        return replicas, remove  # type: ignore[return-value]


@dataclass
class FakeSidecars:
    """The SidecarClient and the Memory commands of every instance, by address (= instance id)."""

    loads: dict[str, InstanceLoad] = field(default_factory=dict)
    drains: dict[str, bool] = field(default_factory=dict)
    wake_seconds: dict[str, float | None] = field(default_factory=dict)
    standby_ok: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def load(self, address: str) -> InstanceLoad | None:
        self.calls.append(("load", address))
        return self.loads.get(address)

    async def drain(self, address: str, timeout_seconds: float) -> bool:
        self.calls.append(("drain", address))
        return self.drains.get(address, True)

    async def weight_bytes(self, address: str) -> int | None:
        return WEIGHTS

    async def standby(self, address: str) -> bool:
        self.calls.append(("standby", address))
        return self.standby_ok

    async def wake(self, address: str) -> float | None:
        self.calls.append(("wake", address))
        return self.wake_seconds.get(address, 1.2)

    async def hold(self, address: str) -> None:
        self.calls.append(("hold", address))

    async def close(self) -> None:
        return None

    def did(self, command: str) -> list[str]:
        return [a for c, a in self.calls if c == command]


@dataclass
class Scripted:
    """An autoscaler that returns the targets the test sets, and keeps what it was shown."""

    targets: dict[Pool, int]
    scale_in: dict[Pool, tuple[str, ...]] = field(default_factory=dict)
    seen: list[FleetObservation] = field(default_factory=list)
    name: str = "scripted"
    pools: tuple[Pool, ...] = (Pool.MIXED,)
    preempts_batch: bool = False
    uses_local_autoscaler: bool = False

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        self.seen.append(obs)
        current = {p: obs.replicas.get(p, 0) for p in self.targets}
        return ScaleDecision(obs.now_s, current, dict(self.targets), {p: "scripted" for p in self.targets},
                             dict(self.scale_in))  # fmt: skip


def ref(
    name: str, phase: Phase = Phase.READY, since: float | None = None, pool: Pool = Pool.MIXED
) -> InstanceRef:
    return InstanceRef(name, pool, phase, f"http://{name}", name, standby_since_s=since)


def load(name: str) -> InstanceLoad:
    return InstanceLoad(name, 0, 0, 0.0, 100, 100, 16, 8)


def make_loop(
    refs: Sequence[InstanceRef],
    autoscaler: Scripted,
    config: StandbyConfig = CONFIG,
    clock: Clock | None = None,
) -> tuple[ControlLoop, FakeFleet, FakeSidecars, list[LoopEvent]]:
    fleet = FakeFleet({r.instance_id: r for r in refs}, {Pool.MIXED: len(refs)})
    sidecars = FakeSidecars(loads={r.instance_id: load(r.instance_id) for r in refs})
    events: list[LoopEvent] = []

    async def on_event(event: LoopEvent) -> None:
        events.append(event)

    loop = ControlLoop(
        "test",
        fleet,
        autoscaler,
        sidecars,
        None,
        on_event,
        standby=config,
        clock=clock or Clock(),  # type: ignore[arg-type]
    )
    loop.standby.commands = sidecars
    return loop, fleet, sidecars, events


async def test_scale_in_parks_the_drained_victim_and_keeps_it_in_the_replicas() -> None:
    autoscaler = Scripted({Pool.MIXED: 2}, {Pool.MIXED: ("b",)})
    loop, fleet, sidecars, events = make_loop([ref("a"), ref("b"), ref("c")], autoscaler)
    await loop.step()
    assert sidecars.did("drain") == ["b"] and sidecars.did("standby") == ["b"]
    assert ("set_standby", "b", 1000.0) in fleet.calls
    # Serving 2 + parked 1: the backend keeps all three and removes nobody.
    assert fleet.replicas_set(Pool.MIXED) == (3, ())
    assert [e.kind for e in events if e.kind == "park"] == ["park"]
    assert loop.standby.parked_total == 1

    # The next step: b is not capacity (no Load asked, not in the replicas the autoscaler sees),
    # but the backend keeps it.
    autoscaler.scale_in = {}
    sidecars.calls.clear()
    await loop.step()
    assert autoscaler.seen[-1].replicas[Pool.MIXED] == 2
    assert {ld.instance_id for ld in autoscaler.seen[-1].loads} == {"a", "c"}
    assert "b" not in sidecars.did("load")
    assert sidecars.did("hold") == ["b"]  # its drain re-asserted (a restarted sidecar forgets it)
    assert fleet.replicas_set(Pool.MIXED) == (3, ())


async def test_scale_out_wakes_parked_first_and_cold_starts_only_the_rest() -> None:
    autoscaler = Scripted({Pool.MIXED: 3})
    loop, fleet, sidecars, events = make_loop([ref("a"), ref("b", Phase.STANDBY, 990.0)], autoscaler)
    await loop.step()
    assert autoscaler.seen[0].replicas[Pool.MIXED] == 1  # a parked instance is not capacity
    assert sidecars.did("wake") == ["b"]
    assert ("set_standby", "b", None) in fleet.calls
    # 1 serving -> 3: b woken, one cold start; nothing parked is left.
    assert fleet.replicas_set(Pool.MIXED) == (3, ())
    assert any(e.kind == "wake" and "1 cold start" in e.message for e in events)
    assert loop.standby.wake_s == 1.2


async def test_a_slow_wake_loses_to_a_cold_start() -> None:
    autoscaler = Scripted({Pool.MIXED: 2})
    loop, fleet, sidecars, _ = make_loop([ref("a"), ref("b", Phase.STANDBY, 990.0)], autoscaler)
    loop.standby.wake_s = 90.0  # measured earlier; the cold start is 60 s
    await loop.step()
    assert sidecars.did("wake") == []
    assert fleet.replicas_set(Pool.MIXED) == (3, ())  # one cold start, b stays parked


async def test_a_measured_cold_start_replaces_the_configured_one() -> None:
    clock = Clock()
    autoscaler = Scripted({Pool.MIXED: 1})
    loop, fleet, _, _ = make_loop([ref("a", Phase.STARTING)], autoscaler, clock=clock)
    await loop.step()
    clock.now += 5.0
    fleet.refs["a"] = ref("a")
    await loop.step()
    assert loop.standby.cold_start_s == 5.0
    # Now a wake measured at 6 s is slower than a cold start: no wake.
    loop.standby.wake_s = 6.0
    fleet.refs["b"] = ref("b", Phase.STANDBY, clock.now)
    fleet.desired[Pool.MIXED] = 2
    autoscaler.targets = {Pool.MIXED: 2}
    sidecars: FakeSidecars = loop.standby.commands  # type: ignore[assignment]
    await loop.step()
    assert sidecars.did("wake") == []


async def test_max_parked_is_honoured_and_the_rest_is_deleted() -> None:
    config = replace(CONFIG, max_standby=1)
    autoscaler = Scripted({Pool.MIXED: 1}, {Pool.MIXED: ("b",)})
    loop, fleet, sidecars, _ = make_loop(
        [ref("a"), ref("b"), ref("c", Phase.STANDBY, 990.0)], autoscaler, config
    )
    await loop.step()
    assert sidecars.did("standby") == []
    assert fleet.replicas_set(Pool.MIXED) == (2, ("b",))  # a serving + c parked


async def test_max_parked_holds_across_pools_settled_in_one_step() -> None:
    inter = [ref(f"i{n}", pool=Pool.INTERACTIVE) for n in range(3)]
    autoscaler = Scripted(
        {Pool.INTERACTIVE: 1, Pool.MIXED: 1}, {Pool.INTERACTIVE: ("i1", "i2"), Pool.MIXED: ("m1",)}
    )
    autoscaler.pools = (Pool.INTERACTIVE, Pool.MIXED)
    loop, fleet, sidecars, _ = make_loop([*inter, ref("m0"), ref("m1")], autoscaler)
    fleet.desired = {Pool.INTERACTIVE: 3, Pool.MIXED: 2}
    await loop.step()
    assert sidecars.did("standby") == ["i1", "i2"]  # the interactive pool, settled first, filled it
    assert fleet.replicas_set(Pool.INTERACTIVE) == (3, ())
    assert fleet.replicas_set(Pool.MIXED) == (1, ("m1",))
    assert loop.standby.parked == {Pool.INTERACTIVE: 2} and loop.standby.parked_total == 2


async def test_a_victim_that_did_not_drain_or_park_is_deleted() -> None:
    autoscaler = Scripted({Pool.MIXED: 1}, {Pool.MIXED: ("b", "c")})
    loop, fleet, sidecars, _ = make_loop([ref("a"), ref("b"), ref("c")], autoscaler)
    sidecars.drains["b"] = False  # requests left: parking would freeze them
    await loop.step()
    assert sidecars.did("standby") == ["c"]
    assert fleet.replicas_set(Pool.MIXED) == (2, ("b",))

    autoscaler2 = Scripted({Pool.MIXED: 1}, {Pool.MIXED: ("b",)})
    loop2, fleet2, sidecars2, _ = make_loop([ref("a"), ref("b")], autoscaler2)
    sidecars2.standby_ok = False
    await loop2.step()
    assert fleet2.replicas_set(Pool.MIXED) == (1, ("b",))
    assert not [c for c in fleet2.calls if c[0] == "set_standby"]


async def test_standby_off_deletes_victims_and_earlier_parked_instances() -> None:
    autoscaler = Scripted({Pool.MIXED: 1}, {Pool.MIXED: ("b",)})
    off = StandbyConfig(max_standby=0)
    loop, fleet, sidecars, events = make_loop(
        [ref("a"), ref("b"), ref("c", Phase.STANDBY, 990.0)], autoscaler, off
    )
    await loop.step()
    assert sidecars.did("standby") == []
    assert fleet.replicas_set(Pool.MIXED) == (1, ("c", "b"))
    assert any(e.kind == "unpark" and "c" in e.message for e in events)


async def test_parked_past_the_ttl_are_removed() -> None:
    clock = Clock(2000.0)
    autoscaler = Scripted({Pool.MIXED: 1})
    refs = [ref("a"), ref("old", Phase.STANDBY, 1000.0), ref("new", Phase.STANDBY, 1990.0)]
    loop, fleet, _, _ = make_loop(refs, autoscaler, clock=clock)
    await loop.step()
    assert fleet.replicas_set(Pool.MIXED) == (2, ("old",))


async def test_a_failed_wake_is_replaced_by_a_cold_start() -> None:
    autoscaler = Scripted({Pool.MIXED: 2})
    loop, fleet, sidecars, events = make_loop([ref("a"), ref("b", Phase.STANDBY, 990.0)], autoscaler)
    sidecars.wake_seconds["b"] = None
    await loop.step()
    assert fleet.replicas_set(Pool.MIXED) == (2, ("b",))  # b goes, a new pod comes
    assert any(e.reason == "WakeFailed" for e in events)


def test_serving_replicas_leave_out_parked_instances() -> None:
    refs = [ref("a"), ref("b", Phase.STANDBY, 1.0), ref("c", Phase.STANDBY, 1.0, Pool.INTERACTIVE)]
    assert serving_replicas({Pool.MIXED: 2, Pool.INTERACTIVE: 1, Pool.BATCH: 0}, refs) == {
        Pool.MIXED: 1,
        Pool.INTERACTIVE: 0,
        Pool.BATCH: 0,
    }


@pytest.mark.parametrize(
    ("max_standby", "expected"),
    [(2, ("expired",)), (1, ("expired", "older")), (0, ("expired", "newer", "older"))],
)
def test_excess_parked_are_the_expired_then_the_oldest_over_the_count(
    max_standby: int, expected: tuple[str, ...]
) -> None:
    config = replace(CONFIG, max_standby=max_standby)
    parked = [Parked("expired", 1, 0.0), Parked("older", 1, 900.0), Parked("newer", 1, 950.0)]
    assert excess_parked(parked, 1000.0, config) == expected


def test_standby_config_comes_from_the_spec() -> None:
    spec = parse_spec(
        {
            "model": "m",
            "memory": {"standby": 3, "standbyTtlSeconds": 120},
            "autoscaling": {"coldStartSeconds": 200},
        }
    )
    config = standby_config(spec)
    assert (config.max_standby, config.standby_ttl_s, config.cold_start_s) == (3, 120.0, 200.0)
    assert config.host_memory_budget_bytes > 0
    assert standby_config(parse_spec({"model": "m"})).max_standby == 0


async def test_metrics_count_parked_instances_and_events() -> None:
    metrics = OperatorMetrics()
    fleet = FakeFleet({"a": ref("a"), "b": ref("b", Phase.STANDBY, 990.0)}, {Pool.MIXED: 2})
    sidecars = FakeSidecars()
    manager = StandbyManager(CONFIG, sidecars, fleet, metrics.loop("ns", "svc"), Clock())

    async def ignore(kind: str, reason: str, message: str) -> None:
        return None

    manager.observe(list(fleet.refs.values()))
    scope = {"namespace": "ns", "llmservice": "svc"}
    assert metrics.registry.get_sample_value("slofleet_operator_standby_instances", scope) == 1
    await manager.settle(Pool.MIXED, 1, 2, (), {}, list(fleet.refs.values()), ignore)
    assert metrics.registry.get_sample_value("slofleet_operator_standby_instances", scope) == 0
    assert (
        metrics.registry.get_sample_value(
            "slofleet_operator_standby_events_total", {**scope, "event": "woken"}
        )
        == 1
    )


class _Memory(mpb_grpc.MemoryServicer):
    """A sidecar's Memory service whose Wake is refused; Status says what is resident."""

    def __init__(self, standby: bool) -> None:
        self.standby = standby

    async def Status(
        self, request: mpb.MemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> mpb.MemoryStatus:
        return mpb.MemoryStatus(standby=self.standby, paused=self.standby, resident_weight_bytes=WEIGHTS)

    async def Wake(self, request: mpb.WakeRequest, context: grpc.aio.ServicerContext) -> mpb.MemoryStatus:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "wake: refused")
        raise AssertionError("abort raises")


class _Sidecar(spb_grpc.SidecarServicer):
    def __init__(self) -> None:
        self.drains: list[tuple[bool, float]] = []

    async def Drain(self, request: spb.DrainRequest, context: grpc.aio.ServicerContext) -> spb.DrainResponse:
        self.drains.append((request.cancel, request.timeout_seconds))
        return spb.DrainResponse(drained=True)


@pytest.mark.parametrize(("still_parked", "expected"), [(False, 0.0), (True, None)])
async def test_a_refused_wake_reopens_only_an_instance_whose_weights_are_back(
    still_parked: bool, expected: float | None
) -> None:
    """An engine that restarted while parked serves with every weight: re-open it. One that
    is still parked (its host store lost the weights) must not be re-opened into a paused engine."""
    server = grpc.aio.server()
    sidecar = _Sidecar()
    mpb_grpc.add_MemoryServicer_to_server(_Memory(still_parked), server)
    spb_grpc.add_SidecarServicer_to_server(sidecar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = SidecarClient(None)
    try:
        commands = SidecarMemory(client)
        assert await commands.wake(f"127.0.0.1:{port}") == expected
        assert sidecar.drains == ([] if still_parked else [(True, 0.0)])
        await commands.hold(f"127.0.0.1:{port}")
        assert sidecar.drains[-1] == (False, 0.5)
    finally:
        await client.close()
        await server.stop(None)


def test_local_status_shows_parked_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    instances = [
        {"instance_id": "tiny-mixed-0", "pool": "mixed", "phase": "ready"},
        {"instance_id": "tiny-mixed-1", "pool": "mixed", "phase": "standby"},
    ]
    state = {
        "service": "tiny",
        "model": "m",
        "gateway_url": "http://gw",
        "counters": {},
        "instances": instances,
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(local_status, "gateway_status", lambda url: {"instances": []})
    assert local_status.main(argparse.Namespace(state_dir=tmp_path, json=False)) == 0
    out = capsys.readouterr().out
    assert "standby 1" in out
    assert any(line.startswith("tiny-mixed-1") and " standby " in line for line in out.splitlines())
