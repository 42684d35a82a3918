"""Warm standby through the real operator against kmock (issue 9, item 4): with
spec.memory.standby = 2, scale-in parks two drained pods instead of deleting them (annotated,
kept in their Deployments' replicas, counted in status.standbyReplicas) and deletes the rest; the
next burst wakes the parked pods before any pod is created for it.

The harness is test_operator_autoscaling's (real sidecar gRPC service per pod, synthetic engine
numbers) with one addition per pod: a Memory service on the sidecar's port that answers
Status/Standby/Wake the way the real one does on an engine, without an engine to move weights of.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cluster_support import Cluster, Controllers, cluster
from test_operator import LLMS, events, live, llms_url, operator, sample, until, user
from test_operator_autoscaling import SPEC, WITHIN_S, Fleet, PodSidecar, SidecarHost, serving, status

from slofleet.api.v1 import memory_pb2 as mpb
from slofleet.api.v1 import memory_pb2_grpc as mpb_grpc
from slofleet.operator.fleet_k8s import STANDBY_ANNOTATION

pytestmark = pytest.mark.timeout(300)
WEIGHT_BYTES = 2 * 10**9


class EngineMemory(mpb_grpc.MemoryServicer):
    """The Memory service's answers for an engine whose weights are all parked or all resident."""

    def __init__(self) -> None:
        self.parked = False
        self.commands: list[str] = []

    def _status(self, seconds: float = 0.0) -> mpb.MemoryStatus:
        return mpb.MemoryStatus(
            layers_total=4,
            layers_resident=0 if self.parked else 4,
            standby=self.parked,
            paused=self.parked,
            resident_weight_bytes=0 if self.parked else WEIGHT_BYTES,
            dropped_weight_bytes=WEIGHT_BYTES if self.parked else 0,
            last_operation_seconds=seconds,
        )

    async def Status(
        self, request: mpb.MemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> mpb.MemoryStatus:
        return self._status()

    async def Standby(
        self, request: mpb.StandbyRequest, context: grpc.aio.ServicerContext
    ) -> mpb.MemoryStatus:
        self.commands.append("standby")
        if self.parked:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "standby: already in standby")
        self.parked = True
        return self._status(0.05)

    async def Wake(self, request: mpb.WakeRequest, context: grpc.aio.ServicerContext) -> mpb.MemoryStatus:
        self.commands.append("wake")
        if not self.parked:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "wake: not in standby")
        self.parked = False
        return self._status(0.1)


class ParkablePod(PodSidecar):
    def __init__(self, pod: dict[str, Any], ip: str, token: str) -> None:
        super().__init__(pod, ip, token)
        self.memory = EngineMemory()
        mpb_grpc.add_MemoryServicer_to_server(self.memory, self.server)


async def start_parkable(pod: dict[str, Any], ip: str, token: str) -> PodSidecar:
    sidecar = ParkablePod(pod, ip, token)
    await sidecar.start()
    return sidecar


class ParkableFleet(Fleet):
    async def start_pod(self, pod: dict[str, Any], ip: str) -> None:
        self.token = self.pod_token(pod)
        self.sidecars[pod["metadata"]["name"]] = await self.host.run(start_parkable(pod, ip, self.token))


@contextlib.asynccontextmanager
async def parkable_sidecars(server: Cluster) -> AsyncIterator[ParkableFleet]:
    host = SidecarHost()
    fleet = ParkableFleet(server, host)
    try:
        yield fleet
    finally:
        await fleet.close()
        host.close()


def parked_pods(server: Cluster) -> set[str]:
    return {
        name
        for name, pod in live(server, "v1/pods").items()
        if STANDBY_ANNOTATION in (pod["metadata"].get("annotations") or {})
    }


def engine_replicas(server: Cluster) -> int:
    return sum(d["spec"]["replicas"] for n, d in live(server, "apps/v1/deployments").items() if "engine" in n)


async def test_scale_in_parks_up_to_the_standby_count_and_the_next_burst_wakes_them() -> None:
    async with cluster() as (server, url), parkable_sidecars(server) as fleet, operator(url):
        controllers = Controllers(server, url, fleet.start_pod, fleet.stop_pod)
        async with controllers.running():
            await user("POST", llms_url(url), sample(**SPEC, memory={"standby": 2}))
            await until(lambda: len(fleet.sidecars) == 1, "the first pod", WITHIN_S)
            (first,) = fleet.sidecars
            await fleet.admit(first, 10)
            await until(
                lambda: serving(server) == 4 and len(fleet.sidecars) == 4, "four serving pods", WITHIN_S
            )

            # The load goes: three leave service; two are parked, one is deleted.
            await fleet.finish_all()
            await until(lambda: len(parked_pods(server)) == 2, "two parked pods", WITHIN_S)
            await until(
                lambda: len(live(server, "v1/pods")) == len(fleet.sidecars) == 3, "one pod deleted", WITHIN_S
            )
            await until(
                lambda: status(server).get("standbyReplicas") == 2, "status.standbyReplicas", WITHIN_S
            )
            assert engine_replicas(server) == 3  # 1 serving + 2 parked, all kept by their Deployments
            for name in parked_pods(server):
                pod = fleet.sidecars[name]
                assert isinstance(pod, ParkablePod) and pod.memory.parked
                assert pod.state.draining, "a parked pod must not take requests"
            assert [e for e in events(server) if e["reason"] == "ScaleInToStandby"]
            (serving_pod,) = set(fleet.sidecars) - parked_pods(server)

            # A burst: the parked pods are woken (re-opened for requests) before pods are created.
            created_before = len(controllers.created)
            woken = parked_pods(server)
            await fleet.admit(serving_pod, 10)
            await until(lambda: not parked_pods(server), "every parked pod woken", WITHIN_S)
            for name in woken:
                pod = fleet.sidecars[name]
                assert isinstance(pod, ParkablePod) and pod.memory.commands == ["standby", "wake"]
                assert not pod.memory.parked and not pod.state.draining
            await until(
                lambda: status(server).get("standbyReplicas") == 0, "status.standbyReplicas 0", WITHIN_S
            )
            await until(
                lambda: engine_replicas(server) == len(live(server, "v1/pods")) == 4,
                "four serving again",
                WITHIN_S,
            )
            assert [e for e in events(server) if e["reason"] == "WokeFromStandby"]
            # 1 serving + 2 woken + 1 new pod (the kubelet records a pod just after creating it).
            await until(lambda: len(controllers.created) == created_before + 1, "one pod created", WITHIN_S)
            assert woken <= set(live(server, "v1/pods")), "a woken pod was replaced instead"
            assert live(server, LLMS)["tiny"]["status"]["standbyReplicas"] == 0
