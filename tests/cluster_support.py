"""A little more of a cluster around kmock, for the tests of scaling: label-selected lists, pods,
and the two controllers that turn a Deployment's replicas into pods.

What each piece does is what the real component does, reduced to what scaling depends on:
- the API server filters LIST by `labelSelector` (equality terms, as the operator sends them);
- the ReplicaSet controller (one level: pods are owned by their Deployment here) creates pods from
  the template up to spec.replicas and, on scale-in, deletes the pods of lowest
  `controller.kubernetes.io/pod-deletion-cost` first (newest first among equals), then reports
  replicas/readyReplicas in the Deployment's status;
- the kubelet gives each new pod an IP, starts it (the caller's `start_pod`, which runs the pod's
  sidecar on that IP) and marks it Ready; it stops it when the pod is deleted.
Every write goes through the HTTP API, so the operator sees the same watch events and the same
request log as in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import kmock
from test_operator import NS, ApiServer, emulator, live

log = logging.getLogger(__name__)
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}

StartPod = Callable[[dict[str, Any], str], Awaitable[None]]
StopPod = Callable[[str], Awaitable[None]]


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", []) or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Cluster(ApiServer):
    """ApiServer (test_operator.py) plus label-selected LIST and pods."""

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            payload["items"] = [
                i for i in payload["items"] if matches(i.get("metadata", {}).get("labels") or {}, selector)
            ]
        return payload


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[tuple[Cluster, str]]:
    """test_operator's emulator as a Cluster, with pods."""
    async with emulator(Cluster) as (server, url):
        server.resources["v1/pods"] = kmock.ResourceInfo(
            kind="Pod", namespaced=True, verbs=VERBS, subresources={"status"}
        )
        assert isinstance(server, Cluster)
        yield server, url


async def call(url: str, method: str, path: str, body: Any = None, merge: bool = False) -> Any:
    headers = {"Content-Type": "application/merge-patch+json"} if merge else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url + path, json=body, headers=headers) as resp,
    ):
        text = await resp.text()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {text}")
        return await resp.json() if text else None


class Controllers:
    """The ReplicaSet controller and the kubelet for the engine Deployments of namespace NS."""

    def __init__(self, server: Cluster, url: str, start_pod: StartPod, stop_pod: StopPod) -> None:
        self.server = server
        self.url = url
        self.start_pod = start_pod
        self.stop_pod = stop_pod
        self.ips = (f"127.0.0.{n}" for n in itertools.count(2))
        self.created: dict[str, int] = {}
        # Ready pod names in the order the controller deleted them (and those deleted unready).
        self.deleted: list[str] = []
        self.deleted_unready: list[str] = []

    async def sync_once(self) -> None:
        pods = live(self.server, "v1/pods")
        for name, dep in live(self.server, "apps/v1/deployments").items():
            if dep["metadata"]["labels"].get("app.kubernetes.io/component") != "engine":
                continue
            uid = dep["metadata"]["uid"]
            owned = [p for p in pods.values() if p["metadata"]["ownerReferences"][0]["uid"] == uid]
            want = int(dep["spec"].get("replicas", 0))
            for _ in range(want - len(owned)):
                await self._create_pod(name, dep)
            for pod in sorted(owned, key=self.deletion_rank)[: max(0, len(owned) - want)]:
                pod_name = pod["metadata"]["name"]
                await call(self.url, "DELETE", f"/api/v1/namespaces/{NS}/pods/{pod_name}")
                (self.deleted if ready(pod) else self.deleted_unready).append(pod_name)
                await self.stop_pod(pod_name)
            ready_count = min(want, len(owned))
            status = {
                "replicas": want,
                "readyReplicas": ready_count,
                "updatedReplicas": want,
                "observedGeneration": 1,
            }
            if {k: dep.get("status", {}).get(k) for k in status} != status:
                path = f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status"
                await call(self.url, "PATCH", path, {"status": status}, merge=True)

    def deletion_rank(self, pod: dict[str, Any]) -> tuple[bool, int, int]:
        """ReplicaSet scale-in order: not-ready pods first, then lower deletion cost, then the
        newer pod."""
        meta = pod["metadata"]
        cost = int((meta.get("annotations") or {}).get(DELETION_COST, "0"))
        return ready(pod), cost, -self.created[meta["name"]]

    async def _create_pod(self, deployment: str, dep: dict[str, Any]) -> None:
        template = dep["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{deployment}-{uuid.uuid4().hex[:5]}",
                "namespace": NS,
                "labels": dict(template["metadata"]["labels"]),
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                     "uid": dep["metadata"]["uid"], "controller": True}
                ],
            },
            "spec": template["spec"],
        }  # fmt: skip
        created = await call(self.url, "POST", f"/api/v1/namespaces/{NS}/pods", pod)
        self.created[created["metadata"]["name"]] = len(self.created)
        ip = next(self.ips)
        await self.start_pod(created, ip)
        status = {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        name = created["metadata"]["name"]
        await call(
            self.url, "PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": status}, merge=True
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controllers]:
        async def loop() -> None:
            while True:
                try:
                    await self.sync_once()
                except RuntimeError as exc:  # an API error: a controller retries on its next sync
                    log.warning("controllers: %s", exc)
                await asyncio.sleep(0.1)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
