"""KubernetesFleet (the operator's FleetBackend) against kmock's API emulator: instances from the
engine pods, replicas from and to the pool Deployments, and scale-in that marks the chosen pods
with pod-deletion-cost before it lowers replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kubernetes.client
import pytest
from cluster_support import DELETION_COST, Cluster, call, cluster
from test_operator import NS, live, requests

from slofleet.fleet import Phase
from slofleet.instance import Pool
from slofleet.operator.fleet_k8s import SCALE_IN_DELETION_COST, STANDBY_ANNOTATION, KubernetesFleet
from slofleet.operator.kube import KubeClient

pytestmark = pytest.mark.timeout(60)
ENGINE = {"slofleet.io/service": "tiny", "app.kubernetes.io/component": "engine"}


@pytest.fixture
async def kube() -> AsyncIterator[tuple[Cluster, str, KubeClient]]:
    async with cluster() as (server, url):
        config = kubernetes.client.Configuration()
        config.host = url
        client = KubeClient(config)
        try:
            yield server, url, client
        finally:
            await client.close()


async def deployment(url: str, name: str, replicas: int) -> None:
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "labels": dict(ENGINE)},
        "spec": {"replicas": replicas, "selector": {"matchLabels": ENGINE}, "template": {}},
    }
    await call(url, "POST", f"/apis/apps/v1/namespaces/{NS}/deployments", body)


async def pod(
    url: str,
    name: str,
    labels: dict[str, str],
    ip: str = "",
    ready: bool = False,
    phase: str = "Running",
    grpc_port: int = 50051,
) -> None:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "containers": [
                {"name": "engine", "ports": [{"name": "http", "containerPort": 8000}]},
                {"name": "sidecar", "ports": [{"name": "grpc", "containerPort": grpc_port}]},
            ]
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **({"podIP": ip} if ip else {}),
        },
    }
    await call(url, "POST", f"/api/v1/namespaces/{NS}/pods", body)


async def test_instances_come_from_this_services_engine_pods(kube: tuple[Cluster, str, KubeClient]) -> None:
    _, url, client = kube
    await pod(
        url, "tiny-engine-interactive-a", {**ENGINE, "slofleet.io/pool": "interactive"}, "10.0.0.1", True
    )
    await pod(
        url, "tiny-engine-b", {**ENGINE, "slofleet.io/pool": "mixed"}, "10.0.0.2", False, grpc_port=6000
    )
    # A pod of the original single engine Deployment (no pool label yet): mixed.
    await pod(url, "tiny-engine-old", dict(ENGINE), "10.0.0.3", True)
    await pod(url, "tiny-engine-batch-c", {**ENGINE, "slofleet.io/pool": "batch"}, "", False, phase="Pending")
    await pod(
        url, "tiny-engine-batch-d", {**ENGINE, "slofleet.io/pool": "batch"}, "10.0.0.5", False, "Failed"
    )
    # Another service's engine and this service's gateway are not instances.
    await pod(url, "other-engine-x", {**ENGINE, "slofleet.io/service": "other"}, "10.0.0.6", True)
    await pod(url, "tiny-gateway-y", {**ENGINE, "app.kubernetes.io/component": "gateway"}, "10.0.0.7", True)

    fleet = KubernetesFleet(client, NS, "tiny", (Pool.INTERACTIVE, Pool.MIXED, Pool.BATCH))
    refs = {r.instance_id: r for r in await fleet.instances()}
    assert set(refs) == {
        "tiny-engine-interactive-a",
        "tiny-engine-b",
        "tiny-engine-old",
        "tiny-engine-batch-c",
        "tiny-engine-batch-d",
    }
    a = refs["tiny-engine-interactive-a"]
    assert (a.pool, a.phase) == (Pool.INTERACTIVE, Phase.READY)
    assert a.sidecar_address == "10.0.0.1:50051" and a.engine_url == "http://10.0.0.1:8000"
    b = refs["tiny-engine-b"]
    assert (b.pool, b.phase, b.sidecar_address) == (Pool.MIXED, Phase.STARTING, "10.0.0.2:6000")
    assert refs["tiny-engine-old"].pool == Pool.MIXED
    assert (
        refs["tiny-engine-batch-c"].phase == Phase.STARTING
        and refs["tiny-engine-batch-c"].sidecar_address == ""
    )
    assert refs["tiny-engine-batch-d"].phase == Phase.FAILED


async def test_desired_replicas_read_each_pool_deployment(kube: tuple[Cluster, str, KubeClient]) -> None:
    _, url, client = kube
    await deployment(url, "tiny-engine", 2)
    await deployment(url, "tiny-engine-interactive", 3)
    fleet = KubernetesFleet(client, NS, "tiny", (Pool.INTERACTIVE, Pool.MIXED, Pool.BATCH))
    # The batch Deployment does not exist yet: 0, not an error.
    assert await fleet.desired_replicas() == {Pool.INTERACTIVE: 3, Pool.MIXED: 2, Pool.BATCH: 0}


async def test_scale_in_marks_the_chosen_pods_before_lowering_replicas(
    kube: tuple[Cluster, str, KubeClient],
) -> None:
    server, url, client = kube
    await deployment(url, "tiny-engine-interactive", 3)
    labels = {**ENGINE, "slofleet.io/pool": "interactive"}
    for name in ("p0", "p1", "p2"):
        await pod(url, name, labels, "10.0.0.1", True)
    fleet = KubernetesFleet(client, NS, "tiny", (Pool.INTERACTIVE, Pool.MIXED, Pool.BATCH))

    # Never blind: without chosen pods, replicas do not fall below the ready pods.
    await fleet.set_replicas(Pool.INTERACTIVE, 1)
    assert live(server, "apps/v1/deployments")["tiny-engine-interactive"]["spec"]["replicas"] == 3
    # `gone` was deleted meanwhile: nothing to mark, no error.
    await fleet.set_replicas(Pool.INTERACTIVE, 1, remove_first=("p2", "gone", "p0"))
    pods = live(server, "v1/pods")
    assert pods["p2"]["metadata"]["annotations"][DELETION_COST] == str(SCALE_IN_DELETION_COST)
    assert pods["p0"]["metadata"]["annotations"][DELETION_COST] == str(SCALE_IN_DELETION_COST)
    assert DELETION_COST not in (pods["p1"]["metadata"].get("annotations") or {})
    assert "gone" not in pods
    assert live(server, "apps/v1/deployments")["tiny-engine-interactive"]["spec"]["replicas"] == 1
    log = [(r.method, r.url.path) for r in list(server) if r.method == "PATCH"]
    deployment_patch = log.index(
        ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/tiny-engine-interactive")
    )
    for name in ("p0", "p2"):
        assert log.index(("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}")) < deployment_patch


async def test_set_replicas_is_idempotent_and_tolerates_a_missing_pool(
    kube: tuple[Cluster, str, KubeClient],
) -> None:
    server, url, client = kube
    await deployment(url, "tiny-engine", 2)
    fleet = KubernetesFleet(client, NS, "tiny", (Pool.MIXED,))
    await fleet.set_replicas(Pool.MIXED, 2)
    assert requests(server, "PATCH", "/deployments/") == 0  # re-asserting a target writes nothing
    await fleet.set_replicas(Pool.MIXED, 4)
    assert live(server, "apps/v1/deployments")["tiny-engine"]["spec"]["replicas"] == 4
    # A pool whose Deployment reconcile has not created yet: nothing to do at 0, a retry later at > 0.
    await fleet.set_replicas(Pool.BATCH, 0)
    await fleet.set_replicas(Pool.BATCH, 2)
    assert "tiny-engine-batch" not in live(server, "apps/v1/deployments")
    with pytest.raises(ValueError, match="replicas: must be >= 0"):
        await fleet.set_replicas(Pool.MIXED, -1)


async def test_a_parked_pod_reads_standby_and_is_never_removed_unchosen(
    kube: tuple[Cluster, str, KubeClient],
) -> None:
    server, url, client = kube
    await deployment(url, "tiny-engine", 3)
    labels = {**ENGINE, "slofleet.io/pool": "mixed"}
    for name in ("p0", "p1", "p2"):
        await pod(url, name, labels, "10.0.0.1", True)
    fleet = KubernetesFleet(client, NS, "tiny", (Pool.MIXED,))
    await fleet.set_standby("p1", 1234.5)
    assert live(server, "v1/pods")["p1"]["metadata"]["annotations"][STANDBY_ANNOTATION] == "1234.500"
    refs = {r.instance_id: r for r in await fleet.instances()}
    assert (refs["p1"].phase, refs["p1"].standby_since_s) == (Phase.STANDBY, 1234.5)
    assert refs["p0"].phase == Phase.READY and refs["p0"].standby_since_s is None

    # The parked pod is ready to the ReplicaSet: lowering replicas without choosing it (or any
    # other) would remove a pod at random, so replicas stay.
    await fleet.set_replicas(Pool.MIXED, 2)
    assert live(server, "apps/v1/deployments")["tiny-engine"]["spec"]["replicas"] == 3

    await fleet.set_standby("p1", None)
    assert STANDBY_ANNOTATION not in (live(server, "v1/pods")["p1"]["metadata"].get("annotations") or {})
    assert {r.instance_id: r.phase for r in await fleet.instances()}["p1"] == Phase.READY
    await fleet.set_standby("gone", None)  # deleted meanwhile: nothing to record, no error
