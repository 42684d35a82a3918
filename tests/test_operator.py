"""The real kopf operator (slofleet's handlers, `run_operator`) against kmock's Kubernetes API emulator.

kmock is an in-memory API server over HTTP. It lacks some things a real cluster does that these
tests depend on; `ApiServer` below adds exactly those and nothing else, each as the real
component behaves:
- the API server assigns metadata.uid, creationTimestamp, resourceVersion, a name for
  generateName (kopf's Events) and bumps metadata.generation when the spec changes;
- a JSON patch whose `test` operation fails is answered 422, as the API server does;
- the garbage collector deletes an object whose controller ownerReference (same namespace, same
  uid) names an object that is gone, whether the owner goes first or the object comes late: that
  is how owned objects disappear with an LLMService, so the cascade only works if the operator
  wrote correct ownerReferences.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import kubernetes.client
import pytest
import yaml

from slofleet.operator.render import Images
from slofleet.operator.runner import run_operator

ROOT = Path(__file__).resolve().parent.parent
NS = "team-a"
LLMS = "slofleet.io/v1alpha1/llmservices"
OWNED = {
    "apps/v1/deployments": {"tiny-engine", "tiny-gateway"},
    "v1/services": {"tiny-engine", "tiny-gateway"},
    "v1/secrets": {"tiny-sidecar-token"},
    "policy/v1/poddisruptionbudgets": {"tiny-engine"},
    "networking.k8s.io/v1/networkpolicies": {"tiny-sidecar-grpc"},
}
IMAGES = Images(
    slofleet="registry.test/slofleet:t", engine="registry.test/engine:t", engine_cpu="registry.test/cpu:t"
)
WAIT_S = 15.0

pytestmark = pytest.mark.timeout(120)


class ApiServer(kmock.KubernetesEmulator):
    """kmock plus the API server's metadata bookkeeping and the garbage collector (see module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.versions = itertools.count(1)
        # Names whose creation fails with HTTP 500, to stop an operator half-way.
        self.fail_creates: set[str] = set()

    def _live(self) -> list[tuple[Any, str, str, Any]]:
        return [(res, ns, name, obj) for (res, ns, name), obj in self.objects.items() if not obj.deleted]

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and request.action == kmock.action.CREATE and data is not None:
            meta = data.setdefault("metadata", {})
            if meta.get("name") in self.fail_creates:
                raise kmock.KubernetesError(status=500, reason="InternalError", message="injected failure")
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(self.versions))
        elif request.resource is not None and request.action == kmock.action.UPDATE and data is not None:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                current = self.objects[key].raw
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self.versions))
                spec_changed = "spec" in data and _merged(current.get("spec"), data["spec"]) != current.get(
                    "spec"
                )
                if request.subresource is None and spec_changed:
                    meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # A JSON patch whose `test` op fails (kopf tests resourceVersion when it removes its
            # finalizer) is a 422 from the API server, not a 500 that clients retry unchanged.
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        if request.resource is not None and request.action in (
            kmock.action.CREATE,
            kmock.action.UPDATE,
            kmock.action.DELETE,
        ):
            # An UPDATE can delete too: removing the last finalizer of an object being deleted.
            await self._collect_garbage()
        return response

    async def _collect_garbage(self) -> None:
        """Delete objects whose controller owner no longer exists, until nothing changes."""
        while True:
            live = self._live()
            uids = {(ns, obj.raw.get("metadata", {}).get("uid")) for _, ns, _, obj in live}
            orphans = [
                (res, ns, name, obj)
                for res, ns, name, obj in live
                for ref in obj.raw.get("metadata", {}).get("ownerReferences", [])
                if ref.get("controller") and (ns, ref.get("uid")) not in uids
            ]
            if not orphans:
                return
            for res, _, _, obj in orphans:
                raw = obj.raw
                obj.delete()
                await self._buses[res].put({"type": "DELETED", "object": raw})


def _merged(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386), to tell whether a PATCH changes the spec."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


@contextlib.asynccontextmanager
async def emulator(cls: type[ApiServer] = ApiServer) -> AsyncIterator[tuple[ApiServer, str]]:
    """An emulated API server of class `cls` with the resources the operator uses, and its URL."""
    async with cls() as server, kmock.Server(server) as http:
        verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        server.resources[LLMS] = kmock.ResourceInfo(
            kind="LLMService",
            namespaced=True,
            verbs=verbs,
            subresources={"status", "scale"},
            shortnames={"llms"},
        )
        for res, kind in [
            ("apps/v1/deployments", "Deployment"),
            ("v1/services", "Service"),
            ("v1/secrets", "Secret"),
            ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget"),
            ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy"),
            ("v1/events", "Event"),
        ]:
            server.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
        # Discovery only: kopf waits to see the resource even when it watches cluster-wide.
        server.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs=verbs
        )
        yield server, str(http.url).rstrip("/")


@pytest.fixture
async def api() -> AsyncIterator[tuple[ApiServer, str]]:
    async with emulator() as served:
        yield served


@contextlib.asynccontextmanager
async def operator(url: str) -> AsyncIterator[asyncio.Task[None]]:
    """The operator as `slofleet operator -A` runs it, pointed at the emulator. (Cluster-wide: kmock
    0.8 cannot parse the /api/v1/namespaces path that kopf lists for `-n`.)"""
    config = kubernetes.client.Configuration()
    config.host = url
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_operator(config, clusterwide=True, images=IMAGES, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), WAIT_S)
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


def sample(name: str = "tiny", **spec_changes: Any) -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "deploy/samples/tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    obj["spec"].update(spec_changes)
    return obj


async def user(method: str, url: str, body: Any = None, patch: bool = False) -> Any:
    """What kubectl would send."""
    headers = {"Content-Type": "application/merge-patch+json"} if patch else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as resp:
        assert resp.status < 400, await resp.text()
        return await resp.json()


def llms_url(base: str, name: str = "", sub: str = "") -> str:
    return (
        f"{base}/apis/{LLMS.rsplit('/', 1)[0]}/namespaces/{NS}/llmservices"
        + (f"/{name}" if name else "")
        + sub
    )


def live(server: ApiServer, resource: str) -> dict[str, dict[str, Any]]:
    wanted = kmock.resource(resource)
    return {
        name: copy.deepcopy(obj.raw) for res, ns, name, obj in server._live() if res == wanted and ns == NS
    }


def owned(server: ApiServer) -> dict[str, set[str]]:
    return {res: set(live(server, res)) for res in OWNED}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def events(server: ApiServer) -> list[dict[str, Any]]:
    return list(live(server, "v1/events").values())


async def until(check: Callable[[], Any], what: str, within: float = WAIT_S) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def creates(server: ApiServer) -> dict[str, int]:
    """POSTs per owned resource. The token Secret is left out: the operator may not read Secrets,
    so it re-sends the create and takes 409 as "exists"; its value is checked to stay instead."""
    return {res: requests(server, "POST", res.rsplit("/", 1)[1]) for res in OWNED if res != "v1/secrets"}


def token(server: ApiServer) -> str:
    return str(live(server, "v1/secrets")["tiny-sidecar-token"]["data"]["token"])


def requests(server: ApiServer, method: str, path_part: str) -> int:
    return sum(1 for r in list(server) if r.method == method and path_part in str(r.url.path))


async def test_create_renders_owned_objects_and_status(api: tuple[ApiServer, str]) -> None:
    server, url = api
    async with operator(url):
        created = await user("POST", llms_url(url), sample())
        uid = created["metadata"]["uid"]
        await until(lambda: owned(server) == OWNED, "every owned object")

        for res in OWNED:
            for obj in live(server, res).values():
                refs = obj["metadata"]["ownerReferences"]
                assert refs == [
                    {
                        "apiVersion": "slofleet.io/v1alpha1",
                        "kind": "LLMService",
                        "name": "tiny",
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ]
                assert obj["metadata"]["labels"]["slofleet.io/service"] == "tiny"

        engine = live(server, "apps/v1/deployments")["tiny-engine"]
        containers = {c["name"]: c for c in engine["spec"]["template"]["spec"]["containers"]}
        assert containers["engine"]["image"] == IMAGES.engine_cpu  # the sample has no GPU
        assert containers["sidecar"]["image"] == IMAGES.slofleet
        assert engine["spec"]["replicas"] == 1

        svc = await until(lambda: live(server, LLMS)["tiny"].get("status", {}).get("conditions"), "status")
        obj = live(server, LLMS)["tiny"]
        assert svc and obj["status"]["observedGeneration"] == 1
        assert condition(obj, "Ready")["status"] == "False"
        assert condition(obj, "Progressing")["status"] == "True"
        assert "kopf" not in obj["status"]  # kopf's bookkeeping stays in annotations

        await until(lambda: "Created" in {e["reason"] for e in events(server)}, "a Created event")

        # The Deployment controller reports a ready pod: the LLMService follows.
        await user(
            "PATCH",
            f"{url}/apis/apps/v1/namespaces/{NS}/deployments/tiny-engine/status",
            {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}},
            patch=True,
        )
        await until(
            lambda: condition(live(server, LLMS)["tiny"], "Ready").get("status") == "True", "Ready=True"
        )
        obj = live(server, LLMS)["tiny"]
        assert obj["status"]["readyReplicas"] == 1
        assert condition(obj, "Progressing")["reason"] == "Complete"
        await until(lambda: "Ready" in {e["reason"] for e in events(server)}, "a Ready event")


async def test_update_patches_in_place_without_duplicates(api: tuple[ApiServer, str]) -> None:
    server, url = api
    async with operator(url):
        await user("POST", llms_url(url), sample())
        await until(lambda: owned(server) == OWNED, "every owned object")
        posts_before, token_before = creates(server), token(server)

        engine = dict(sample()["spec"]["engine"], maxModelLen=2048)
        await user(
            "PATCH",
            llms_url(url, "tiny"),
            {"spec": {"engine": engine, "gateway": {"replicas": 3}}},
            patch=True,
        )

        def rolled_out() -> bool:
            deployments = live(server, "apps/v1/deployments")
            args = deployments["tiny-engine"]["spec"]["template"]["spec"]["containers"][0]["args"]
            return "2048" in args and deployments["tiny-gateway"]["spec"]["replicas"] == 3

        await until(rolled_out, "the new spec in the Deployments")
        await until(
            lambda: live(server, LLMS)["tiny"]["status"].get("observedGeneration") == 2, "generation 2"
        )
        assert owned(server) == OWNED
        # Patched, never re-created; the untouched objects were not even written.
        assert creates(server) == posts_before
        assert token(server) == token_before
        assert requests(server, "PATCH", "/deployments/tiny-engine") >= 1
        assert requests(server, "PATCH", "/services/") == 0
        assert requests(server, "PATCH", "/poddisruptionbudgets/") == 0
        await until(lambda: "Updated" in {e["reason"] for e in events(server)}, "an Updated event")


async def test_delete_lets_the_garbage_collector_take_owned_objects(api: tuple[ApiServer, str]) -> None:
    server, url = api
    async with operator(url):
        await user("POST", llms_url(url), sample())
        await until(lambda: owned(server) == OWNED, "every owned object")
        await user("DELETE", llms_url(url, "tiny"))

        await until(lambda: not any(owned(server).values()), "owned objects to be collected")
        await asyncio.sleep(1.0)  # the Deployment DELETED events reach the operator
        assert not any(owned(server).values()), "the operator re-created objects of a deleted LLMService"
        assert "tiny" not in live(server, LLMS)  # no finalizer holds the deletion


@pytest.mark.parametrize(
    ("changes", "reason", "field", "fix"),
    [
        # The schema accepts it; only the operator knows a pod cannot run it.
        (
            {"engine": {"resources": {"gpu": 1}, "tensorParallelSize": 2}},
            "UnsupportedSpec",
            "spec.engine.tensorParallelSize",
            {"engine": {"tensorParallelSize": 1}},
        ),
        # The CRD's CEL rule rejects it in a real cluster; an outdated CRD must not crash the operator.
        ({"replicas": {"min": 5, "max": 3}}, "InvalidSpec", "spec.replicas.min", {"replicas": {"min": 1}}),
    ],
)
async def test_bad_spec_is_degraded_with_an_event_and_no_retry(
    api: tuple[ApiServer, str], changes: dict[str, Any], reason: str, field: str, fix: dict[str, Any]
) -> None:
    server, url = api
    async with operator(url) as task:
        await user("POST", llms_url(url), sample(**changes))

        def degraded() -> dict[str, Any]:
            obj = live(server, LLMS)["tiny"]
            return condition(obj, "Degraded") if condition(obj, "Degraded").get("status") == "True" else {}

        cond = await until(degraded, "Degraded=True")
        assert cond["reason"] == reason and field in cond["message"], cond
        assert condition(live(server, LLMS)["tiny"], "Ready")["status"] == "False"

        def warnings() -> list[dict[str, Any]]:
            return [e for e in events(server) if e["type"] == "Warning" and e["reason"] == reason]

        await until(warnings, "a Warning event")
        assert not any(owned(server).values())

        reads = requests(server, "GET", "/llmservices/tiny")
        await asyncio.sleep(2.0)
        assert requests(server, "GET", "/llmservices/tiny") == reads, "the operator retries an invalid spec"
        assert len(warnings()) == 1 and field in warnings()[0]["message"]
        assert not task.done()

        # Fixing the spec is enough: the operator picks it up and creates everything.
        await user("PATCH", llms_url(url, "tiny"), {"spec": fix}, patch=True)
        await until(lambda: owned(server) == OWNED, "every owned object after the fix")
        await until(
            lambda: condition(live(server, LLMS)["tiny"], "Degraded").get("status") == "False",
            "Degraded=False",
        )


async def test_restart_mid_way_converges_without_duplicates(api: tuple[ApiServer, str]) -> None:
    server, url = api
    server.fail_creates = {"tiny-gateway"}  # the first operator dies before it gets this far
    async with operator(url):
        await user("POST", llms_url(url), sample())
        await until(lambda: "tiny-engine" in live(server, "apps/v1/deployments"), "the engine Deployment")
        await until(lambda: requests(server, "POST", "/services") >= 2, "a failed gateway Service create")
    first = owned(server)
    assert first != OWNED and "tiny-engine" in first["apps/v1/deployments"]
    posts_before, token_before = creates(server), token(server)
    engine_rv = live(server, "apps/v1/deployments")["tiny-engine"]["metadata"]["resourceVersion"]

    server.fail_creates = set()
    async with operator(url):
        await until(lambda: owned(server) == OWNED, "convergence after the restart")
        await until(lambda: condition(live(server, LLMS)["tiny"], "Progressing"), "status after the restart")
    # Only the missing objects were created; what existed was neither re-created nor rewritten.
    for res, posted in creates(server).items():
        missing = OWNED[res] - first[res]
        assert posted - posts_before[res] == len(missing), (res, posted, missing)
    assert token(server) == token_before
    assert live(server, "apps/v1/deployments")["tiny-engine"]["metadata"]["resourceVersion"] == engine_rv


async def test_slofleet_operator_command_with_a_kubeconfig(
    api: tuple[ApiServer, str], tmp_path: Path
) -> None:
    """The shipped entry point: `slofleet operator --kubeconfig F` as its own process, with its
    liveness endpoint, stopping cleanly on SIGTERM."""
    server, url = api
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "tester", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
                "current-context": "kmock",
            }
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "slofleet.cli", "operator", "-A", "--kubeconfig", str(kubeconfig),
        "--liveness", f"http://127.0.0.1:{port}/healthz",
        env={**os.environ, "SLOFLEET_IMAGE": "reg/x:1", "SLOFLEET_ENGINE_CPU_IMAGE": "reg/e:1"},
    )  # fmt: skip
    try:
        await user("POST", llms_url(url), sample())
        await until(lambda: owned(server) == OWNED, "every owned object", within=60)
        engine = live(server, "apps/v1/deployments")["tiny-engine"]
        assert {c["image"] for c in engine["spec"]["template"]["spec"]["containers"]} == {
            "reg/x:1",
            "reg/e:1",
        }
        assert any(r.headers.get("Authorization") == "Bearer t0ken" for r in list(server))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_someone_elses_object_is_never_taken_over(api: tuple[ApiServer, str]) -> None:
    server, url = api
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tiny-engine", "namespace": NS}}
    await user("POST", f"{url}/api/v1/namespaces/{NS}/services", theirs)
    async with operator(url):
        await user("POST", llms_url(url), sample())
        cond = await until(
            lambda: (
                condition(live(server, LLMS)["tiny"], "Degraded").get("reason") == "OwnershipConflict"
                and condition(live(server, LLMS)["tiny"], "Degraded")
            ),
            "Degraded=OwnershipConflict",
        )
        assert "Service team-a/tiny-engine" in cond["message"]
        assert "ownerReferences" not in live(server, "v1/services")["tiny-engine"]["metadata"]
        assert requests(server, "PATCH", "/services/tiny-engine") == 0
