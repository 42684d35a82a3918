"""Pure rendering of an LLMService's objects and of its status (no I/O)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from slofleet.instance import Pool
from slofleet.operator.render import (
    POOL_LABEL,
    SIDECAR_GRPC_PORT,
    Images,
    desired_pool_replicas,
    render_all,
    vllm_args,
)
from slofleet.operator.status import build_status, deployment_conditions, invalid_conditions, status_changed
from slofleet.spec import LLMService, load_llmservice_file, parse_spec

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Images(slofleet="reg/slofleet:1", engine="reg/engine:1")


def service(name: str = "svc", uid: str | None = "uid-1", **spec: Any) -> LLMService:
    return LLMService(name=name, namespace="ns", spec=parse_spec({"model": "org/m", **spec}), uid=uid)


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_render_all_objects_are_owned_labelled_and_namespaced() -> None:
    objs = by_kind(render_all(service(), IMAGES))
    assert set(objs) == {
        ("Secret", "svc-sidecar-token"),
        ("Deployment", "svc-engine"),
        ("Deployment", "svc-engine-interactive"),
        ("Deployment", "svc-engine-batch"),
        ("Service", "svc-engine"),
        ("PodDisruptionBudget", "svc-engine"),
        ("NetworkPolicy", "svc-sidecar-grpc"),
        ("Deployment", "svc-gateway"),
        ("Service", "svc-gateway"),
    }
    for obj in objs.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "slofleet.io/v1alpha1",
                "kind": "LLMService",
                "name": "svc",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["slofleet.io/service"] == "svc"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "slofleet-operator"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "slofleet"


def test_no_uid_means_no_owner_reference() -> None:
    """`slofleet render` output must never carry a made-up owner uid (the GC would delete it)."""
    for obj in render_all(service(uid=None), IMAGES):
        assert "ownerReferences" not in obj["metadata"]


def test_selectors_match_their_pod_templates() -> None:
    objs = by_kind(render_all(service(), IMAGES))
    for name in ("svc-engine", "svc-gateway"):
        dep = objs["Deployment", name]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert objs["Service", name]["spec"]["selector"].items() <= pod_labels.items()
    engine_pods = objs["Deployment", "svc-engine"]["spec"]["template"]["metadata"]["labels"]
    assert (
        objs["PodDisruptionBudget", "svc-engine"]["spec"]["selector"]["matchLabels"].items()
        <= engine_pods.items()
    )
    policy = objs["NetworkPolicy", "svc-sidecar-grpc"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= engine_pods.items()
    gateway_pods = objs["Deployment", "svc-gateway"]["spec"]["template"]["metadata"]["labels"]
    sources = [peer.get("podSelector", {}).get("matchLabels", {}) for peer in policy["ingress"][0]["from"]]
    assert any(s.items() <= gateway_pods.items() for s in sources)
    assert policy["ingress"][0]["ports"] == [{"protocol": "TCP", "port": SIDECAR_GRPC_PORT}]


def test_gpu_engine_pod() -> None:
    svc = service(
        engine={
            "resources": {"gpu": 2, "cpu": "8", "memory": "40Gi"},
            "tensorParallelSize": 2,
            "maxModelLen": 8192,
            "args": ["--enable-prefix-caching"],
            "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "9"}, {"name": "X", "value": "y"}],
        }
    )
    dep = by_kind(render_all(svc, IMAGES))["Deployment", "svc-engine"]
    engine, sidecar = containers(dep)["engine"], containers(dep)["sidecar"]
    assert engine["image"] == "reg/engine:1" and sidecar["image"] == "reg/slofleet:1"
    assert engine["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = engine["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    assert args[-1] == "--enable-prefix-caching"  # the user's args come last and win
    extension = args[args.index("--worker-extension-cls") + 1]
    assert extension == "slofleet.sidecar.vllm_ext.worker.SlofleetWorkerExtension"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert engine["resources"]["requests"] == {"cpu": "8", "memory": "40Gi", "nvidia.com/gpu": 2}
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["X"] == "y"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "9"  # user env overrides ours
    pod = dep["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "40Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in engine["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in sidecar["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert sidecar["readinessProbe"]["grpc"] == {"port": SIDECAR_GRPC_PORT}
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert not any(v["name"] == "model" for v in pod["volumes"])  # a hub id needs no volume


def test_cpu_engine_has_no_gpu_and_a_kv_cache_size() -> None:
    dep = by_kind(render_all(service(), IMAGES))["Deployment", "svc-engine"]
    engine = containers(dep)["engine"]
    assert engine["image"] == IMAGES.engine_cpu
    assert "nvidia.com/gpu" not in engine["resources"]["limits"]
    assert "tolerations" not in dep["spec"]["template"]["spec"]
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"} in engine["env"]


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        ({"claimName": "weights"}, {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}),
        ({"hostPath": "/srv/models"}, {"hostPath": {"path": "/srv/models", "type": "Directory"}}),
    ],
)
def test_model_volume(volume: dict[str, Any], expected: dict[str, Any]) -> None:
    svc = service(model="/weights/llama", modelVolume={**volume, "mountPath": "/weights"})
    dep = by_kind(render_all(svc, IMAGES))["Deployment", "svc-engine"]
    model = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert {k: v for k, v in model.items() if k != "name"} == expected
    engine = containers(dep)["engine"]
    assert {"name": "model", "mountPath": "/weights", "readOnly": True} in engine["volumeMounts"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in engine["env"]
    assert engine["args"][:2] == ["--model", "/weights/llama"]


@pytest.mark.parametrize(
    ("sidecar", "secret", "key"),
    [({}, "svc-sidecar-token", "token"), ({"tokenSecretRef": {"name": "tok", "key": "k"}}, "tok", "k")],
)
def test_sidecar_token_reaches_sidecar_and_gateway(sidecar: dict[str, Any], secret: str, key: str) -> None:
    objs = by_kind(render_all(service(sidecar=sidecar), IMAGES))
    assert (("Secret", "svc-sidecar-token") in objs) == (not sidecar)  # generated only when not given
    env = containers(objs["Deployment", "svc-engine"])["sidecar"]["env"]
    ref = next(e for e in env if e["name"] == "SLOFLEET_SIDECAR_TOKEN")
    assert ref["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}
    gateway = objs["Deployment", "svc-gateway"]
    volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "token")
    assert volume["secret"] == {"secretName": secret, "items": [{"key": key, "path": "token"}]}
    args = containers(gateway)["gateway"]["args"]
    mount = next(m for m in containers(gateway)["gateway"]["volumeMounts"] if m["name"] == "token")
    assert args[args.index("--sidecar-token-file") + 1] == f"{mount['mountPath']}/token"
    assert args[args.index("--sidecar-dns") + 1] == f"svc-engine.ns.svc:{SIDECAR_GRPC_PORT}"


def test_commands_parse_with_the_real_clis() -> None:
    """The args the operator writes are accepted by `slofleet sidecar` and `slofleet gateway`."""
    from slofleet.cli import build_parser

    objs = by_kind(render_all(service(), IMAGES))
    parser = build_parser()
    sidecar_args = containers(objs["Deployment", "svc-engine"])["sidecar"]["args"]
    parsed = parser.parse_args([a.replace("$(POD_NAME)", "pod-0") for a in sidecar_args])
    assert parsed.instance_id == "pod-0" and parsed.grpc_port == SIDECAR_GRPC_PORT
    parsed = parser.parse_args(containers(objs["Deployment", "svc-gateway"])["gateway"]["args"])
    assert parsed.port == 8080


def test_images_come_from_the_spec_then_the_operator_environment() -> None:
    assert Images.from_env({"SLOFLEET_IMAGE": "a:1", "SLOFLEET_ENGINE_IMAGE": "b:2"}) == Images("a:1", "b:2")
    assert Images.from_env({}) == Images()
    svc = service(engine={"image": "mine/vllm:x"}, gateway={"image": "mine/gw:y", "replicas": 2})
    objs = by_kind(render_all(svc, IMAGES))
    assert containers(objs["Deployment", "svc-engine"])["engine"]["image"] == "mine/vllm:x"
    gateway = objs["Deployment", "svc-gateway"]
    assert containers(gateway)["gateway"]["image"] == "mine/gw:y"
    assert gateway["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("policy", "current", "expected"),
    [
        ("queue", None, 2),  # creation: replicas.initial
        ("queue", 5, 5),  # the control loop owns the count afterwards
        ("utilization", 9, 6),  # ... within min..max
        ("queue", 0, 1),
        ("static", 5, 2),  # static: initial, always
    ],
)
def test_engine_replicas(policy: str, current: int | None, expected: int) -> None:
    spec = parse_spec(
        {"model": "m", "replicas": {"min": 1, "max": 6, "initial": 2}, "autoscaling": {"policy": policy}}
    )
    assert desired_pool_replicas(spec, {Pool.MIXED: current}) == {Pool.MIXED: expected}


def test_initial_defaults_to_min() -> None:
    spec = parse_spec({"model": "m", "replicas": {"min": 3, "max": 6}, "autoscaling": {"policy": "queue"}})
    assert desired_pool_replicas(spec, {}) == {Pool.MIXED: 3}
    assert "--max-model-len" not in vllm_args(spec)


def test_chiron_pools_start_from_initial_then_belong_to_the_control_loop() -> None:
    spec = parse_spec(
        {
            "model": "m",
            "replicas": {"min": 1, "max": 8, "initial": 4},
            "pools": {"interactive": {"min": 1, "max": 5}, "batch": {"max": 2}},
        }
    )
    # A new service: replicas.initial spread over the pools (one mixed burst buffer).
    assert desired_pool_replicas(spec, {}) == {Pool.INTERACTIVE: 3, Pool.MIXED: 1, Pool.BATCH: 0}
    # Afterwards the control loop's counts stand, clamped only into each pool's bounds.
    current = {Pool.INTERACTIVE: 9, Pool.MIXED: 3, Pool.BATCH: 2}
    assert desired_pool_replicas(spec, current) == {Pool.INTERACTIVE: 5, Pool.MIXED: 3, Pool.BATCH: 2}
    # An upgrade from the single engine Deployment (now the mixed pool): the new pools start at
    # their minimum instead of adding a second fleet.
    upgrade = {Pool.MIXED: 4, Pool.INTERACTIVE: None, Pool.BATCH: None}
    assert desired_pool_replicas(spec, upgrade) == {Pool.INTERACTIVE: 1, Pool.MIXED: 4, Pool.BATCH: 0}


def test_each_pool_is_a_deployment_whose_pods_and_sidecar_know_their_pool() -> None:
    objs = by_kind(render_all(service(), IMAGES))
    names = {
        Pool.MIXED: "svc-engine",
        Pool.INTERACTIVE: "svc-engine-interactive",
        Pool.BATCH: "svc-engine-batch",
    }
    selectors = []
    for pool, name in names.items():
        dep = objs["Deployment", name]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pod_labels[POOL_LABEL] == pool.value
        args = containers(dep)["sidecar"]["args"]
        assert args[args.index("--pool") + 1] == pool.value
        # Every pool's pods are behind the one headless Service.
        assert objs["Service", "svc-engine"]["spec"]["selector"].items() <= pod_labels.items()
        selectors.append(dep["spec"]["selector"]["matchLabels"])
    # The mixed pool keeps the original (immutable) selector; the others narrow it by pool.
    assert selectors[0] == {"slofleet.io/service": "svc", "app.kubernetes.io/component": "engine"}
    assert selectors[1] == {**selectors[0], POOL_LABEL: "interactive"}
    # Single-pool policies render the mixed pool only.
    single = by_kind(render_all(service(autoscaling={"policy": "utilization"}), IMAGES))
    assert [k for k in single if k[0] == "Deployment"] == [
        ("Deployment", "svc-engine"),
        ("Deployment", "svc-gateway"),
    ]


def deployment(replicas: int = 2, ready: int = 0, updated: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": 1, "readyReplicas": ready, "updatedReplicas": updated, **extra},
    }


def conds(dep: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in deployment_conditions(dep)}


def test_conditions_follow_the_deployment() -> None:
    assert conds(None) == {
        "Ready": ("False", "Creating"),
        "Progressing": ("True", "Creating"),
        "Degraded": ("False", "AsExpected"),
    }
    assert conds(deployment(ready=0, updated=2))["Ready"] == ("False", "NoReadyReplicas")
    assert conds(deployment(ready=1, updated=2)) == {
        "Ready": ("True", "Serving"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
    }
    assert conds(deployment(ready=2, updated=2))["Progressing"] == ("False", "Complete")
    assert conds(deployment(replicas=0))["Ready"] == ("False", "ScaledToZero")
    stuck = deployment(
        ready=1,
        updated=1,
        conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
    )
    assert conds(stuck)["Degraded"] == ("True", "ProgressDeadlineExceeded")
    quota = deployment(
        conditions=[
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota"}
        ]
    )
    assert conds(quota)["Degraded"] == ("True", "FailedCreate")


def test_status_keeps_transition_times_and_is_stable() -> None:
    kwargs: dict[str, Any] = {"observed_generation": 3, "selector": "a=b", "endpoint": "http://x"}
    first = build_status(
        previous=None,
        conditions=deployment_conditions(deployment(ready=1)),
        deployment=deployment(ready=1),
        now="2026-01-01T00:00:00Z",
        **kwargs,
    )
    assert first["observedGeneration"] == 3 and first["readyReplicas"] == 1
    assert all(c["observedGeneration"] == 3 for c in first["conditions"])
    again = build_status(
        previous=first,
        conditions=deployment_conditions(deployment(ready=1)),
        deployment=deployment(ready=1),
        now="2026-01-01T00:05:00Z",
        **kwargs,
    )
    assert again == first and not status_changed(first, again)
    broken = build_status(
        previous=first,
        conditions=invalid_conditions("InvalidSpec", "spec.x: bad"),
        deployment=deployment(ready=1),
        now="2026-01-01T00:09:00Z",
        **kwargs,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in broken["conditions"]}
    assert times["Degraded"] == "2026-01-01T00:09:00Z"  # flipped False -> True
    assert times["Progressing"] == "2026-01-01T00:09:00Z"  # flipped True -> False
    assert times["Ready"] == "2026-01-01T00:09:00Z"  # flipped True -> False
    assert status_changed(first, broken)
    # Keys the operator does not own (the control loop's) never count as a change.
    assert not status_changed({**again, "batchQueueDepth": 7}, again)


def test_render_cli_prints_every_object(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slofleet.cli", "render", "-f", str(ROOT / "deploy/samples/tiny-cpu.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = list(yaml.safe_load_all(out))
    svc = load_llmservice_file(ROOT / "deploy/samples/tiny-cpu.yaml")
    assert docs == render_all(dataclasses.replace(svc, uid=None), Images.from_env())
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "deploy/samples/tiny-cpu.yaml").read_text().replace("gpu: 0", "gpu: -1"))
    result = subprocess.run(
        [sys.executable, "-m", "slofleet.cli", "render", "-f", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "spec.engine.resources.gpu: must be >= 0" in result.stderr


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_engine_and_sidecar_share_the_kv_control_socket_for_migration() -> None:
    pod = by_kind(render_all(service(), IMAGES))[("Deployment", "svc-engine")]["spec"]["template"]["spec"]
    c = containers({"spec": {"template": {"spec": pod}}})
    kv = json.loads(_arg(c["engine"]["args"], "--kv-transfer-config"))
    socket = kv["kv_connector_extra_config"]["control_socket"]
    assert kv["kv_connector"] == "SlofleetMigrationConnector" and kv["kv_role"] == "kv_both"
    assert kv["kv_connector_module_path"] == "slofleet.sidecar.vllm_ext.kv_connector"
    assert _arg(c["sidecar"]["args"], "--kv-control-socket") == socket
    # Both containers see the socket's folder on the same pod-local shared memory volume.
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    for name in ("engine", "sidecar"):
        mounts = {m["mountPath"]: m["name"] for m in c[name]["volumeMounts"]}
        assert mounts["/dev/shm"] == "dshm" and socket.startswith("/dev/shm/")
    # The sidecar's user reaches the socket through the volume's group.
    assert pod["securityContext"]["fsGroup"] == c["sidecar"]["securityContext"]["runAsUser"]
    # The engine aborts a migrated request through its dev-mode endpoint.
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in c["engine"]["env"]


def test_migration_disabled_renders_no_connector_and_no_migration_service() -> None:
    objs = by_kind(render_all(service(migration={"enabled": False}), IMAGES))
    c = containers(objs[("Deployment", "svc-engine")])
    assert "--kv-transfer-config" not in c["engine"]["args"]
    assert _arg(c["sidecar"]["args"], "--kv-control-socket") == ""
