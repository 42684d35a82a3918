"""KubernetesFleet: the operator's FleetBackend, one engine Deployment per pool (see render.py).

Instances are the engine pods of one LLMService: the pool comes from the pod's pool label, the
phase from its readiness, and the sidecar address from its IP and the port its `grpc` container
port declares. `set_replicas` writes the pool Deployment's spec.replicas and leaves the pods to
the Deployment controller, which also replaces failed pods: so re-asserting a target (what the
control loop does every step) is free when nothing changed.

Scale-in is never blind: before lowering replicas, the pods chosen by the policy (and drained by
the control loop) get `controller.kubernetes.io/pod-deletion-cost` far below the default 0, and
the ReplicaSet controller deletes the pods of lowest cost first (among equally ready pods).

Warm standby: a parked pod carries `slofleet.io/standby-since` (unix seconds), so that its phase
reads STANDBY for any operator replica and after an operator restart. It stays Kubernetes-ready
and in its Deployment's replicas; the ReplicaSet never prefers it over an unmarked pod, and scale-in
counts it as a pod that may not go unchosen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from slofleet.fleet import InstanceRef, Phase
from slofleet.instance import Pool
from slofleet.operator.kube import KINDS, POD, ApiError, KubeClient
from slofleet.operator.render import (
    ENGINE_HTTP_PORT,
    POOL_LABEL,
    SIDECAR_GRPC_PORT,
    SIDECAR_METRICS_PORT,
    engine_selector,
    pool_deployment_name,
)

log = logging.getLogger(__name__)

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Far below the default (0) and below anything a person would set by hand for a "keep me" pod.
SCALE_IN_DELETION_COST = -1000
STANDBY_ANNOTATION = "slofleet.io/standby-since"


def _container_port(pod: Mapping[str, Any], name: str, default: int) -> int:
    for container in pod.get("spec", {}).get("containers", []) or []:
        for port in container.get("ports", []) or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    return default


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", []) or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def standby_since(pod: Mapping[str, Any]) -> float | None:
    """When the pod was parked, from its annotation; None if it is not parked (or unreadable)."""
    value = (pod.get("metadata", {}).get("annotations") or {}).get(STANDBY_ANNOTATION)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def pod_phase(pod: Mapping[str, Any]) -> Phase:
    """The fleet phase of an engine pod: leaving, failed, parked, ready or still starting."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return Phase.STOPPING
    if pod.get("status", {}).get("phase") in ("Failed", "Succeeded"):
        return Phase.FAILED
    if not _ready(pod):
        return Phase.STARTING
    return Phase.STANDBY if standby_since(pod) is not None else Phase.READY


def instance_ref(pod: Mapping[str, Any]) -> InstanceRef:
    """One engine pod as the control loop sees it. Pods of the original single engine Deployment
    have no pool label and are mixed (that Deployment became the mixed pool's)."""
    meta = pod.get("metadata", {})
    pool = Pool((meta.get("labels") or {}).get(POOL_LABEL, Pool.MIXED.value))
    ip = pod.get("status", {}).get("podIP") or ""
    phase = pod_phase(pod)
    if not ip and phase in (Phase.READY, Phase.STANDBY):
        phase = Phase.STARTING
    grpc_port = _container_port(pod, "grpc", SIDECAR_GRPC_PORT)
    return InstanceRef(
        instance_id=meta["name"],
        pool=pool,
        phase=phase,
        engine_url=f"http://{ip}:{_container_port(pod, 'http', ENGINE_HTTP_PORT)}" if ip else "",
        sidecar_address=f"{ip}:{grpc_port}" if ip else "",
        metrics_url=f"http://{ip}:{_container_port(pod, 'metrics', SIDECAR_METRICS_PORT)}/metrics"
        if ip
        else "",
        standby_since_s=standby_since(pod) if phase == Phase.STANDBY else None,
    )


class KubernetesFleet:
    """FleetBackend over one LLMService's pool Deployments (namespace/service) and their pods."""

    def __init__(self, kube: KubeClient, namespace: str, service: str, pools: Sequence[Pool]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.service = service
        self.pools = tuple(pools)

    async def instances(self) -> Sequence[InstanceRef]:
        pods = await self.kube.list(POD, self.namespace, engine_selector(self.service))
        return [instance_ref(pod) for pod in pods]

    async def desired_replicas(self) -> dict[Pool, int]:
        """spec.replicas of each pool Deployment the policy uses (0 where it does not exist yet)."""
        out = {}
        for pool in self.pools:
            dep = await self.kube.get(
                KINDS["Deployment"], self.namespace, pool_deployment_name(self.service, pool)
            )
            out[pool] = int((dep or {}).get("spec", {}).get("replicas", 0) or 0)
        return out

    async def set_replicas(self, pool: Pool, replicas: int, remove_first: Sequence[str] = ()) -> None:
        """Mark `remove_first` for deletion, then write the pool Deployment's replicas (only if
        they differ: the control loop re-asserts every target on every step)."""
        if replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {replicas}")
        name = pool_deployment_name(self.service, pool)
        dep = await self.kube.get(KINDS["Deployment"], self.namespace, name)
        if dep is None:
            if replicas > 0:
                # Reconcile creates it (it renders every pool the policy uses); the next step retries.
                log.warning(
                    "service=%s/%s event=pool_deployment_missing name=%s", self.namespace, self.service, name
                )
            return
        current = int(dep.get("spec", {}).get("replicas", 0) or 0)
        if replicas < current:
            replicas = await self._never_blind(pool, current, replicas, remove_first)
        if current != replicas:
            await self.kube.patch(KINDS["Deployment"], self.namespace, name, {"spec": {"replicas": replicas}})
            log.info(
                "service=%s/%s event=replicas pool=%s replicas=%d remove_first=%s",
                self.namespace, self.service, pool.value, replicas, list(remove_first),
            )  # fmt: skip

    async def _never_blind(self, pool: Pool, current: int, target: int, remove_first: Sequence[str]) -> int:
        """Mark `remove_first` and lower replicas only by what removes no unchosen ready pod: pods
        not created yet, pods not ready (the ReplicaSet controller removes those first) and the
        marked ones. A parked pod is ready to Kubernetes, so it is never counted as free. A policy
        that named fewer victims than it removes (a sidecar that did not answer) gets the rest at
        its next step, once it can choose them."""
        members = [r for r in await self.instances() if r.pool == pool and r.phase != Phase.STOPPING]
        chosen = [r.instance_id for r in members if r.instance_id in remove_first]
        for pod in chosen:
            await self.mark_for_scale_in(pod)
        free = max(0, current - len(members)) + sum(
            1 for r in members if r.phase in (Phase.STARTING, Phase.FAILED) and r.instance_id not in chosen
        )
        return max(target, current - free - len(chosen))

    async def set_standby(self, instance_id: str, since_s: float | None) -> None:
        """Annotate the pod as parked at `since_s`, or remove the annotation (None: woken)."""
        value = None if since_s is None else f"{since_s:.3f}"
        try:
            await self.kube.patch(
                POD, self.namespace, instance_id, {"metadata": {"annotations": {STANDBY_ANNOTATION: value}}}
            )
        except ApiError as exc:
            if exc.status != 404:  # gone meanwhile: nothing to record
                raise

    async def mark_for_scale_in(self, pod: str) -> None:
        """Give the pod the lowest deletion cost, so that lowering replicas removes this pod."""
        patch = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(SCALE_IN_DELETION_COST)}}}
        try:
            await self.kube.patch(POD, self.namespace, pod, patch)
        except ApiError as exc:
            if exc.status != 404:  # already gone: nothing to mark
                raise
