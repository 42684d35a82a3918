"""The operator's control loop against kmock on a synthetic load feed: the real kopf operator, its
daemon and Chiron, scaling pool Deployments up under load and, after the stabilization window,
down again, marking the drained pod before the replicas fall.

What is real and what is synthetic, and why: every engine pod runs the real sidecar gRPC service
(`SidecarService` with its bearer-token guard, `SidecarState`) on the pod's IP, started by the
emulated kubelet with the token it reads from the pod's Secret, exactly as the pod gets it. The
engine beside it cannot run here (a vLLM per pod, several pods), so what the sidecar would scrape
from vLLM's /metrics is fed into `SidecarState.observe` as samples at the sidecar's 10 Hz, and the
requests come in the way the gateway reports them, over the sidecar's `ReportRequests` RPC. So the
operator's whole path is real: Load and Drain over authenticated gRPC, the policy, the Kubernetes
writes, status and Events; only the engine's numbers are made up. (Injecting loads into the
control loop instead would skip the sidecar protocol and the token, which is what breaks first.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
import pytest
from cluster_support import DELETION_COST, Cluster, Controllers, cluster
from test_operator import LLMS, NS, condition, events, live, llms_url, operator, sample, until, user

from slofleet.api.v1 import sidecar_pb2 as pb
from slofleet.api.v1 import sidecar_pb2_grpc as pb_grpc
from slofleet.instance import Pool
from slofleet.operator.render import SIDECAR_GRPC_PORT
from slofleet.sidecar.enginemetrics import EngineSample, Histogram
from slofleet.sidecar.service import BearerTokenInterceptor, ExpectedToken, SidecarService
from slofleet.sidecar.state import SidecarState

# Generous: the machine may be shared with vLLM servers; every wait below is for an event, not a sleep.
pytestmark = pytest.mark.timeout(300)
WITHIN_S = 60.0

LIMIT = 4  # each instance's concurrency limit: 10 requests need 4 instances at fill 0.8
STABILIZATION_S = 3
SPEC = {
    "replicas": {"min": 1, "max": 4, "initial": 1},
    "pools": {"interactive": {"min": 1}},
    "autoscaling": {
        "policy": "chiron",
        "intervalSeconds": 1,
        "scaleDownStabilizationSeconds": STABILIZATION_S,
        "maxScaleStep": 2,
    },
}
T = TypeVar("T")
NO_LATENCY = Histogram((float("inf"),), (0.0,))


class PodSidecar:
    """One pod's sidecar: the real gRPC service on the pod IP, its engine observation synthetic."""

    def __init__(self, pod: dict[str, Any], ip: str, token: str) -> None:
        args = next(c for c in pod["spec"]["containers"] if c["name"] == "sidecar")["args"]
        self.pool = Pool(args[args.index("--pool") + 1])
        self.state = SidecarState(pod["metadata"]["name"], concurrency_limit=LIMIT, pool=self.pool)
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(ExpectedToken(token), lambda _: None)]
        )
        pb_grpc.add_SidecarServicer_to_server(
            SidecarService(self.state, engine_url=f"http://{ip}:8000"), self.server
        )
        self.address = f"{ip}:{SIDECAR_GRPC_PORT}"
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"cannot bind the sidecar of {pod['metadata']['name']} on {self.address}")
        self._engine: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._engine = asyncio.create_task(self._observe_engine())

    async def _observe_engine(self) -> None:
        """What the sidecar's poller would read from vLLM: the reported requests are running."""
        generated = 0.0
        while True:
            running = len(self.state.tracked_requests)
            generated += 20.0 * running
            self.state.observe(
                EngineSample(
                    running_requests=running, waiting_requests=0, kv_usage_fraction=running / (4 * LIMIT),
                    num_gpu_blocks=1000, block_size_tokens=16, preemptions_total=0.0,
                    prompt_tokens_total=0.0, generation_tokens_total=generated,
                    ttft=NO_LATENCY, itl=NO_LATENCY,
                )
            )  # fmt: skip
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine
        await self.server.stop(grace=1.0)


class SidecarHost:
    """A thread with its own event loop for the pods' sidecars. In a cluster they are other
    processes; here a loop of their own keeps them apart from the operator's, whose kopf cancels
    every task of its loop when it stops, and lets them outlive the operator as pods do."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecars", daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def start_sidecar(pod: dict[str, Any], ip: str, token: str) -> PodSidecar:
    sidecar = PodSidecar(pod, ip, token)
    await sidecar.start()
    return sidecar


class Fleet:
    """The emulated kubelet's pods (their sidecars) and the gateway's side of the load feed."""

    def __init__(self, server: Cluster, host: SidecarHost) -> None:
        self.host = host
        self.server = server
        self.sidecars: dict[str, PodSidecar] = {}
        self.token = ""
        self.sent: dict[str, list[str]] = {}

    def pod_token(self, pod: dict[str, Any]) -> str:
        """The kubelet resolves SLOFLEET_SIDECAR_TOKEN's secretKeyRef from the cluster."""
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "sidecar")
        ref = next(e for e in container["env"] if e["name"] == "SLOFLEET_SIDECAR_TOKEN")["valueFrom"]
        secret = live(self.server, "v1/secrets")[ref["secretKeyRef"]["name"]]
        return base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()

    async def start_pod(self, pod: dict[str, Any], ip: str) -> None:
        self.token = self.pod_token(pod)
        self.sidecars[pod["metadata"]["name"]] = await self.host.run(start_sidecar(pod, ip, self.token))

    async def stop_pod(self, name: str) -> None:
        sidecar = self.sidecars.pop(name, None)
        if sidecar is not None:
            await self.host.run(sidecar.stop())

    async def report(self, name: str, kind: int, ids: list[str]) -> None:
        """The gateway's ReportRequests stream to one sidecar."""
        events = [
            pb.RequestEvent(
                kind=kind,
                request=pb.RequestInfo(
                    request_id=i,
                    request_class=pb.REQUEST_CLASS_INTERACTIVE,
                    prompt_tokens=100,
                    max_tokens=200,
                ),
            )
            for i in ids
        ]
        async with grpc.aio.insecure_channel(self.sidecars[name].address) as channel:
            await pb_grpc.SidecarStub(channel).ReportRequests(
                iter(events), metadata=(("authorization", f"Bearer {self.token}"),), timeout=5
            )

    async def admit(self, name: str, count: int) -> None:
        ids = [f"{name}-req-{len(self.sent.get(name, [])) + i}" for i in range(count)]
        await self.report(name, pb.RequestEvent.KIND_ADMITTED, ids)
        self.sent.setdefault(name, []).extend(ids)

    async def finish_all(self) -> None:
        for name, ids in self.sent.items():
            if name in self.sidecars:
                await self.report(name, pb.RequestEvent.KIND_FINISHED, ids)
        self.sent.clear()

    async def close(self) -> None:
        for name in list(self.sidecars):
            await self.stop_pod(name)


@contextlib.asynccontextmanager
async def sidecars(server: Cluster) -> AsyncIterator[Fleet]:
    """The pods' sidecars; they stop after the operator, as pods outlive an operator restart."""
    host = SidecarHost()
    fleet = Fleet(server, host)
    try:
        yield fleet
    finally:
        await fleet.close()
        host.close()


def replicas(server: Cluster) -> dict[str, int]:
    return {
        name: d["spec"]["replicas"]
        for name, d in live(server, "apps/v1/deployments").items()
        if "engine" in name
    }


def serving(server: Cluster) -> int:
    return replicas(server)["tiny-engine-interactive"] + replicas(server)["tiny-engine"]


def pools(server: Cluster) -> dict[str, int]:
    r = replicas(server)
    return {
        "interactive": r["tiny-engine-interactive"],
        "mixed": r["tiny-engine"],
        "batch": r["tiny-engine-batch"],
    }


def status(server: Cluster) -> dict[str, Any]:
    return dict(live(server, LLMS)["tiny"].get("status") or {})


def pod_log(server: Cluster) -> list[tuple[str, str]]:
    """(method, path) of every write, in the order the API server took them."""
    return [(r.method, r.url.path) for r in list(server) if r.method in ("PATCH", "DELETE", "POST")]


async def test_load_scales_pools_out_then_in_after_stabilization() -> None:
    async with cluster() as (server, url), sidecars(server) as fleet, operator(url):
        controllers = Controllers(server, url, fleet.start_pod, fleet.stop_pod)
        async with controllers.running():
            await scale_out_and_in(server, url, fleet, controllers)


async def scale_out_and_in(server: Cluster, url: str, fleet: Fleet, controllers: Controllers) -> None:
    await user("POST", llms_url(url), sample(**SPEC))
    # replicas.initial = 1 spread over Chiron's pools: one interactive instance.
    await until(
        lambda: replicas(server) == {"tiny-engine": 0, "tiny-engine-interactive": 1, "tiny-engine-batch": 0},
        "the pool Deployments",
        within=WITHIN_S,
    )
    await until(
        lambda: condition(live(server, LLMS)["tiny"], "Ready").get("status") == "True",
        "Ready",
        WITHIN_S,
    )
    await until(
        lambda: status(server).get("pools") == {"interactive": 1, "mixed": 0, "batch": 0},
        "pools",
        WITHIN_S,
    )
    assert "lastScale" not in status(server)  # nothing changed yet: no decision to report

    # Load above capacity: 10 requests on one instance whose local limit is 4. However Chiron
    # splits it between interactive and mixed (a tuning of the policy), 10 requests need all 4
    # instances that spec.replicas.max allows: 1 -> 3 (maxScaleStep 2) -> 4.
    (first,) = fleet.sidecars
    await fleet.admit(first, 10)
    await until(lambda: serving(server) == 4, "scale-out to 4 instances", within=WITHIN_S)
    scaled = await until(
        lambda: status(server).get("lastScale", {}).get("to") == 4 and status(server)["lastScale"],
        "status.lastScale of the scale-out",
        WITHIN_S,
    )
    assert scaled["from"] < 4, scaled
    assert "10 interactive in flight" in scaled["reason"], scaled
    autoscaled = await until(
        lambda: [e for e in events(server) if e["reason"] == "Autoscaled"],
        "an Autoscaled Event",
        WITHIN_S,
    )
    assert autoscaled[0]["type"] == "Normal" and "interactive 1->" in autoscaled[0]["message"]
    await until(lambda: status(server).get("pools") == pools(server), "status.pools", WITHIN_S)
    await until(lambda: len(fleet.sidecars) == 4, "four running pods", WITHIN_S)

    # The load falls: nothing leaves before a stabilization window of low recommendations.
    fell = time.monotonic()
    await fleet.finish_all()
    await until(lambda: serving(server) < 4, "the first scale-in", within=WITHIN_S)
    assert time.monotonic() - fell >= STABILIZATION_S - 1.0
    await until(
        lambda: replicas(server)["tiny-engine-interactive"] == 1 and replicas(server)["tiny-engine"] == 0,
        "scale-in to the pools' minimum",
        within=WITHIN_S,
    )
    await until(
        lambda: len(live(server, "v1/pods")) == 1 and len(fleet.sidecars) == 1, "one pod left", WITHIN_S
    )
    assert len(controllers.deleted) + len(controllers.deleted_unready) >= 3
    await until(
        lambda: status(server)["pools"] == {"interactive": 1, "mixed": 0, "batch": 0}, "pools", WITHIN_S
    )
    assert status(server)["lastScale"]["to"] < status(server)["lastScale"]["from"]
    await until(lambda: [e for e in events(server) if e["reason"] == "ScaleIn"], "a ScaleIn Event", WITHIN_S)

    # Every removed ready pod is one the operator chose: marked with the lowest deletion cost
    # first, then its Deployment's replicas lowered, then (only then) deleted by the controller.
    # (A pod still starting may go unmarked: it serves nothing, and the ReplicaSet removes it first.)
    log = pod_log(server)
    for name in controllers.deleted:
        marked = log.index(("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}"))
        deleted = log.index(("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}"))
        deployment = name.rsplit("-", 1)[0]
        lowered = [
            i
            for i, w in enumerate(log)
            if w == ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/{deployment}")
        ]
        assert any(marked < i < deleted for i in lowered), (name, marked, lowered, deleted)
    assert all(
        (obj.get("metadata", {}).get("annotations") or {}).get(DELETION_COST) is None
        for obj in live(server, "v1/pods").values()
    ), "a pod that stays was marked for deletion"
