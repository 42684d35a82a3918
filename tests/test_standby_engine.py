"""Warm standby end to end on this machine: the control loop parks a local vLLM CPU instance
through its real sidecar (Memory.Standby after Drain), the local fleet keeps the process pair
but reports it STANDBY, and the next scale-out wakes it instead of starting a process; it then
serves a completion. One instance of the generated tiny model (about a minute to start).

The autoscaler is scripted (scale to 0, then back to 1) so that the test is about the standby
path, not about Chiron's timing; test_standby.py covers the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest

from slofleet.api.v1 import memory_pb2 as mpb
from slofleet.api.v1 import memory_pb2_grpc as mpb_grpc
from slofleet.fleet import Phase
from slofleet.instance import Pool
from slofleet.local.fleet import LocalFleet
from slofleet.local.instance import EngineLaunch
from slofleet.local.up import local_engine_args, resolve_model
from slofleet.operator.control_loop import ControlLoop, LoopEvent, SidecarClient
from slofleet.policies.global_autoscaler import FleetObservation, ScaleDecision
from slofleet.policies.memory_planner import StandbyConfig
from slofleet.spec import parse_spec

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
TOKEN = "standby-test-token"


@dataclass
class Scripted:
    """Scale the mixed pool to `target`, naming every ready instance above it as a victim."""

    target: int
    name: str = "scripted"
    pools: tuple[Pool, ...] = (Pool.MIXED,)
    preempts_batch: bool = False
    uses_local_autoscaler: bool = False
    seen: list[FleetObservation] = field(default_factory=list)

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        self.seen.append(obs)
        current = obs.replicas.get(Pool.MIXED, 0)
        victims = tuple(sorted(ld.instance_id for ld in obs.loads))[: max(0, current - self.target)]
        return ScaleDecision(obs.now_s, {Pool.MIXED: current}, {Pool.MIXED: self.target},
                             {Pool.MIXED: "scripted"}, {Pool.MIXED: victims} if victims else {})  # fmt: skip


async def memory_status(address: str) -> mpb.MemoryStatus:
    async with grpc.aio.insecure_channel(address) as channel:
        return await mpb_grpc.MemoryStub(channel).Status(
            mpb.MemoryStatusRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30
        )


async def health(engine_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{engine_url}/health") as resp:
        return resp.status


async def complete(engine_url: str) -> str:
    body = {"model": "standby", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{engine_url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(120)) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["text"]


async def test_local_instance_parks_then_wakes_on_scale_out_and_serves(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "model": "generated:tiny",
            "engine": {"resources": {"gpu": 0, "cpu": "1", "memory": "4Gi"}, "maxModelLen": 1024},
            "replicas": {"min": 0, "max": 1, "initial": 1},
            "migration": {"enabled": False},
            "memory": {"standby": 1},
        }
    )
    launch = EngineLaunch(
        model=resolve_model(spec.model),
        served_model_name="standby",
        engine_args=local_engine_args(spec),
        sidecar_token=TOKEN,
        sidecar_args=("--weight-store", str(tmp_path / "store")),
        migration=False,
    )
    events: list[LoopEvent] = []

    async def on_event(event: LoopEvent) -> None:
        events.append(event)

    autoscaler = Scripted(target=0)
    sidecars = SidecarClient(TOKEN, timeout_seconds=30.0)
    async with LocalFleet("standby", launch, tmp_path / "logs") as fleet:
        await fleet.set_replicas(Pool.MIXED, 1)
        await fleet.wait_ready(600)
        (ref,) = await fleet.instances()
        before = await complete(ref.engine_url)
        config = StandbyConfig(cold_start_s=60.0, host_memory_budget_bytes=1 << 62, max_standby=1)
        loop = ControlLoop(
            "standby", fleet, autoscaler, sidecars, None, on_event, drain_timeout_seconds=30.0, standby=config
        )
        try:
            # Scale-in to 0 serving: the instance is drained and parked, its processes stay.
            await loop.step()
            (parked,) = await fleet.instances()
            assert parked.instance_id == ref.instance_id and parked.phase == Phase.STANDBY, events
            assert await fleet.desired_replicas() == {Pool.MIXED: 1}
            status = await memory_status(ref.sidecar_address)
            assert status.standby and status.paused and status.resident_weight_bytes == 0
            assert [e.kind for e in events if e.kind in ("park", "wake")] == ["park"]
            # A pod's readiness and liveness probes read the engine's /health: parked stays healthy
            # (a failing probe would restart the container and lose the parked state).
            assert await health(ref.engine_url) == 200

            # Parked is not capacity: the next observation sees 0 mixed replicas and no load.
            autoscaler.target = 0
            await loop.step()
            assert autoscaler.seen[-1].replicas[Pool.MIXED] == 0 and autoscaler.seen[-1].loads == ()
            assert fleet.get(ref.instance_id) is not None

            # Scale-out: the parked instance is woken (no new process) and serves the same tokens.
            autoscaler.target = 1
            await loop.step()
            (woken,) = await fleet.instances()
            assert woken.instance_id == ref.instance_id and woken.phase == Phase.READY
            status = await memory_status(ref.sidecar_address)
            assert not status.standby and not status.paused and status.resident_weight_bytes > 0
            load = await sidecars.load(ref.sidecar_address)
            assert load is not None and not load.draining
            assert await complete(ref.engine_url) == before
            wake = [e for e in events if e.kind == "wake"]
            assert wake and "woke" in wake[0].message, events
            assert loop.standby.wake_s is not None and loop.standby.wake_s < 60.0
        finally:
            await loop.close()
            await sidecars.close()
