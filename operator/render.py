"""Pure builders of the Kubernetes objects that one LLMService owns.

No I/O here: `render_all` maps (service, images, current replicas per pool) to plain dicts, so
every field the operator writes is unit-tested without a cluster, and `slofleet render` prints
exactly what the operator would apply.

Pools are Deployments: one engine Deployment per pool the autoscaling policy uses (`chiron`:
interactive, mixed, batch; the single-pool policies: mixed only). A Deployment per pool is what
lets the control loop set each pool's replicas independently (`spec.replicas` is the one knob a
Deployment has) and lets each pool's pods carry `--pool` for their sidecar, which tells the
gateway and the local autoscaler how to treat the instance. (Pool as a label on pods of a single
Deployment would need relabelling live pods, and a Deployment cannot say "3 of these, 2 of those".)
The mixed pool keeps the name and the selector of the original single engine Deployment
(`<name>-engine`): selectors are immutable, so renaming it would mean creating a second fleet and
deleting the first (twice the GPUs during the move); keeping it makes the upgrade a plain rolling
update. The other pools are `<name>-engine-interactive` and `<name>-engine-batch`, whose selectors
add the pool label. The mixed Deployment's selector therefore also matches their pods; that is
harmless since Kubernetes 1.6 (controllers only act on objects whose controller ownerReference
names them, and each ReplicaSet's selector carries its own pod-template-hash). The headless
Service, the PDB and the NetworkPolicy select every engine pod, whatever its pool.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slofleet import __version__
from slofleet.instance import Pool
from slofleet.operator.control_loop import autoscaler_from_spec, initial_replicas, pool_bounds
from slofleet.policies.global_autoscaler import PoolBounds
from slofleet.spec import API_GROUP, API_VERSION, KIND, LLMService, LLMServiceSpec

ENGINE_HTTP_PORT = 8000
SIDECAR_GRPC_PORT = 50051
SIDECAR_METRICS_PORT = 9090
GATEWAY_HTTP_PORT = 8080
GATEWAY_TOKEN_DIR = "/var/run/secrets/slofleet"
GATEWAY_DATA_DIR = "/var/lib/slofleet"
MANAGED_BY = "slofleet-operator"
SERVICE_LABEL = f"{API_GROUP}/service"
# The pool an engine pod serves; the fleet backend reads it back from the pods.
POOL_LABEL = f"{API_GROUP}/pool"
# Where the operator runs (deploy/default); its pods may reach every sidecar's gRPC port.
OPERATOR_NAMESPACE = "slofleet-system"
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "slofleet", "app.kubernetes.io/component": "operator"}

# Unlimited startup time would hide a broken engine; a 70B model on a slow volume loads in ~15 min.
ENGINE_STARTUP_SECONDS = 30 * 60
NON_ROOT_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class Images:
    """Images the operator puts in pods; set by its environment so that deploy/ can pin them."""

    slofleet: str = f"ghcr.io/slofleet/slofleet:{__version__}"
    # vLLM's CUDA image plus our plugin (docker/engine.Dockerfile): pods with GPUs.
    engine: str = f"ghcr.io/slofleet/slofleet-engine:{__version__}"
    # vLLM's CPU build plus our plugin (docker/engine-cpu.Dockerfile): pods with resources.gpu 0.
    engine_cpu: str = f"ghcr.io/slofleet/slofleet-engine-cpu:{__version__}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Images:
        env = os.environ if env is None else env
        default = cls()
        return cls(
            slofleet=env.get("SLOFLEET_IMAGE") or default.slofleet,
            engine=env.get("SLOFLEET_ENGINE_IMAGE") or default.engine,
            engine_cpu=env.get("SLOFLEET_ENGINE_CPU_IMAGE") or default.engine_cpu,
        )

    def engine_for(self, spec: LLMServiceSpec) -> str:
        if spec.engine.image:
            return spec.engine.image
        return self.engine if spec.engine.resources.gpu > 0 else self.engine_cpu


def engine_name(service: LLMService) -> str:
    """The headless Service of every engine pod, and the mixed pool's Deployment."""
    return f"{service.name}-engine"


def pool_deployment_name(service_name: str, pool: Pool) -> str:
    """The mixed pool keeps the original single engine Deployment's name (module docstring)."""
    return f"{service_name}-engine" if pool == Pool.MIXED else f"{service_name}-engine-{pool.value}"


def engine_pools(spec: LLMServiceSpec) -> tuple[Pool, ...]:
    """The pools the spec's autoscaling policy uses, each one engine Deployment."""
    return autoscaler_from_spec(spec).pools if spec.autoscaling.policy == "chiron" else (Pool.MIXED,)


def engine_pool_bounds(spec: LLMServiceSpec) -> dict[Pool, PoolBounds]:
    """The bounds the policy itself enforces: Chiron's per pool (spec.pools), the single-pool
    policies' spec.replicas. Reconcile clamps with the same bounds, so it never undoes a decision."""
    if spec.autoscaling.policy == "chiron":
        return pool_bounds(spec)
    return {Pool.MIXED: PoolBounds(spec.replicas.min, spec.replicas.max)}


def gateway_name(service: LLMService) -> str:
    return f"{service.name}-gateway"  # gateway_endpoint() relies on this name


def selector_labels(service_name: str, component: str) -> dict[str, str]:
    """Labels that select one component's pods; never change them (Deployment selectors are immutable).
    They depend on the name alone, so that status can name them even for an invalid spec."""
    return {SERVICE_LABEL: service_name, "app.kubernetes.io/component": component}


def engine_selector(service_name: str) -> str:
    """The engine pods' label selector as a string (status.selector, for the scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(service_name, "engine").items())


def gateway_endpoint(service_name: str, namespace: str) -> str:
    return f"http://{service_name}-gateway.{namespace}.svc"


def labels(service: LLMService, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "slofleet",
        "app.kubernetes.io/instance": service.name,
        "app.kubernetes.io/part-of": "slofleet",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(service.name, component),
    }


def owner_reference(service: LLMService) -> dict[str, Any]:
    """Makes the LLMService the controller of an object, so that the cluster's garbage collector
    deletes the object with it (same namespace, uid-matched)."""
    if not service.uid:
        raise ValueError(
            f"LLMService {service.namespace}/{service.name} has no metadata.uid to own objects with"
        )
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": service.name,
        "uid": service.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(service: LLMService, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": service.namespace,
        "labels": labels(service, component),
    }
    if service.uid:
        meta["ownerReferences"] = [owner_reference(service)]
    return meta


def desired_pool_replicas(spec: LLMServiceSpec, current: Mapping[Pool, int | None]) -> dict[Pool, int]:
    """Replicas per pool Deployment, given what each has now (None: it does not exist).

    `static` pins the count to spec.replicas.initial. Other policies start a new service at
    replicas.initial spread over their pools (the control loop's `initial_replicas`) and then own
    the counts: reconcile only clamps them into the policy's bounds, never fights the autoscaler.
    A pool Deployment that is missing while another exists (an upgrade from one engine Deployment,
    a policy change) starts at its minimum and the control loop takes it from there, so an upgrade
    never adds a fleet on top of the running one.
    """
    pools = engine_pools(spec)
    if spec.autoscaling.policy == "static":
        return {Pool.MIXED: spec.initial_replicas}
    bounds = engine_pool_bounds(spec)
    fresh = all(current.get(p) is None for p in pools)
    start = initial_replicas(spec, autoscaler_from_spec(spec)) if fresh else {p: bounds[p].min for p in pools}
    out = {}
    for pool in pools:
        now = current.get(pool)
        out[pool] = start.get(pool, bounds[pool].min) if now is None else bounds[pool].clamp(now)
    return out


# slofleet's methods on every vLLM worker (KV layout, layer drop/restore); the sidecar calls them.
ENGINE_EXTENSION_ARGS = ("--worker-extension-cls", "slofleet.sidecar.vllm_ext.worker.SlofleetWorkerExtension")


# Live migration: vLLM loads slofleet's KV connector, which serves the sidecar on a Unix socket in the
# pod's shared /dev/shm (the `dshm` volume both containers mount).
KV_CONTROL_SOCKET = "/dev/shm/slofleet/kv.sock"
KV_CONNECTOR = "SlofleetMigrationConnector"
KV_CONNECTOR_MODULE = "slofleet.sidecar.vllm_ext.kv_connector"


def kv_transfer_config_args(control_socket: str) -> list[str]:
    """vLLM's `--kv-transfer-config` loading the migration connector on `control_socket`."""
    config = {
        "kv_connector": KV_CONNECTOR,
        "kv_role": "kv_both",
        "kv_connector_module_path": KV_CONNECTOR_MODULE,
        "kv_connector_extra_config": {"control_socket": control_socket},
    }
    return ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]


def migration_engine_args(spec: LLMServiceSpec, control_socket: str = KV_CONTROL_SOCKET) -> list[str]:
    return kv_transfer_config_args(control_socket) if spec.migration.enabled else []


def migration_sidecar_args(spec: LLMServiceSpec, control_socket: str = KV_CONTROL_SOCKET) -> list[str]:
    """The sidecar serves the Migration service on the engine's socket, or not at all ('')."""
    return ["--kv-control-socket", control_socket if spec.migration.enabled else ""]


def vllm_args(spec: LLMServiceSpec, extra: Sequence[str] = ()) -> list[str]:
    """The vLLM server's arguments from the spec; `extra` goes before the user's spec.engine.args,
    which come last so that they win."""
    args = [
        "--model",
        spec.model,
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_HTTP_PORT),
        "--tensor-parallel-size",
        str(spec.engine.tensor_parallel_size),
        # The gateway sends interactive requests with a higher priority than batch ones.
        "--scheduling-policy",
        "priority",
    ]
    if spec.engine.max_model_len is not None:
        args += ["--max-model-len", str(spec.engine.max_model_len)]
    return [*args, *extra, *spec.engine.args]


def engine_env(spec: LLMServiceSpec) -> list[dict[str, str]]:
    """vLLM's environment: ours first, the user's spec.engine.env overriding any of ours by name."""
    env = {
        # Dev-mode endpoints (sleep/wake, cache reset) are how the sidecar acts on the engine.
        "VLLM_SERVER_DEV_MODE": "1",
        "SLOFLEET_SIDECAR_ADDRESS": f"127.0.0.1:{SIDECAR_GRPC_PORT}",
    }
    if spec.model_is_path:
        env["HF_HUB_OFFLINE"] = "1"
    if spec.engine.resources.gpu == 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    for var in spec.engine.env:
        env[var.name] = var.value
    return [{"name": name, "value": value} for name, value in env.items()]


def _pod_identity_env() -> list[dict[str, Any]]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]


def _engine_container(spec: LLMServiceSpec, images: Images) -> dict[str, Any]:
    res = spec.engine.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpu > 0:
        requests["nvidia.com/gpu"] = res.gpu
        limits["nvidia.com/gpu"] = res.gpu
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.model_volume is not None:
        mounts.append({"name": "model", "mountPath": spec.model_volume.mount_path, "readOnly": True})
    health = {"httpGet": {"path": "/health", "port": "http"}}
    return {
        "name": "engine",
        "image": images.engine_for(spec),
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(spec, [*ENGINE_EXTENSION_ARGS, *migration_engine_args(spec)]),
        "env": engine_env(spec),
        "ports": [{"name": "http", "containerPort": ENGINE_HTTP_PORT, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": ENGINE_STARTUP_SECONDS // 10},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def local_autoscaler_args(spec: LLMServiceSpec) -> list[str]:
    """Chiron's local autoscaler runs in each sidecar, against the service's interactive SLO."""
    if spec.autoscaling.policy != "chiron":
        return []
    slo = spec.slo.interactive
    return ["--local-autoscaler", "--ttft-slo-seconds", str(slo.ttft_seconds),
            "--itl-slo-ms", str(slo.itl_milliseconds)]  # fmt: skip


def sidecar_args(spec: LLMServiceSpec, pool: Pool = Pool.MIXED) -> list[str]:
    """`slofleet sidecar` beside the engine; $(POD_NAME) is expanded by the kubelet from the env."""
    return [
        "sidecar",
        "--pool",
        pool.value,
        "--engine-url",
        f"http://127.0.0.1:{ENGINE_HTTP_PORT}",
        "--instance-id",
        "$(POD_NAME)",
        "--grpc-port",
        str(SIDECAR_GRPC_PORT),
        "--metrics-port",
        str(SIDECAR_METRICS_PORT),
        *local_autoscaler_args(spec),
        *migration_sidecar_args(spec),
    ]


def sidecar_token_ref(service: LLMService) -> tuple[str, str]:
    """(Secret name, key) of the sidecars' gRPC bearer token: the user's, else one the operator
    generates once per LLMService (the sidecar refuses to run without a token)."""
    ref = service.spec.sidecar.token_secret_ref
    return (ref.name, ref.key) if ref is not None else (f"{service.name}-sidecar-token", "token")


def render_token_secret(service: LLMService) -> dict[str, Any] | None:
    """The operator-managed token Secret, without its data: reconcile creates it once with a random
    token and never reads or rewrites it (RBAC grants `create` on secrets, nothing else)."""
    if service.spec.sidecar.token_secret_ref is not None:
        return None
    name, _ = sidecar_token_ref(service)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(service, name, "engine"),
    }


def _sidecar_container(service: LLMService, images: Images, pool: Pool) -> dict[str, Any]:
    secret, key = sidecar_token_ref(service)
    env = [
        *_pod_identity_env(),
        {"name": "SLOFLEET_SIDECAR_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
    ]
    grpc_probe = {"grpc": {"port": SIDECAR_GRPC_PORT}}
    return {
        "name": "sidecar",
        "image": images.slofleet,
        "args": sidecar_args(service.spec, pool),
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": SIDECAR_GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": SIDECAR_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "readinessProbe": {**grpc_probe, "periodSeconds": 5},
        "livenessProbe": {**grpc_probe, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {**NON_ROOT_CONTAINER, "runAsUser": 10001},
    }


def _model_volume(spec: LLMServiceSpec) -> dict[str, Any] | None:
    volume = spec.model_volume
    if volume is None:
        return None
    if volume.claim_name is not None:
        return {"name": "model", "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": True}}
    return {"name": "model", "hostPath": {"path": volume.host_path, "type": "Directory"}}


def pool_selector_labels(service_name: str, pool: Pool) -> dict[str, str]:
    """A pool Deployment's selector (immutable; the mixed pool's is the original one)."""
    base = selector_labels(service_name, "engine")
    return base if pool == Pool.MIXED else {**base, POOL_LABEL: pool.value}


def render_engine_deployment(
    service: LLMService, images: Images, pool: Pool, replicas: int
) -> dict[str, Any]:
    spec = service.spec
    # Shared memory for NCCL/torch workers and the engine<->sidecar KV channel; capped at the
    # pod's memory so that it can never take the node down.
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.engine.resources.memory}}
    ]
    model = _model_volume(spec)
    if model is not None:
        volumes.append(model)
    pod_spec: dict[str, Any] = {
        "containers": [_engine_container(spec, images), _sidecar_container(service, images, pool)],
        "volumes": volumes,
        # Time to drain: the sidecar migrates running requests away before the engine stops.
        "terminationGracePeriodSeconds": 120,
        "enableServiceLinks": False,
        # Volumes (the shared /dev/shm) belong to this group: the sidecar (uid 10001) reaches the
        # engine's KV control socket and migration segments through it, whatever user vLLM runs as.
        "securityContext": {"fsGroup": 10001},
    }
    if spec.engine.resources.gpu > 0:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    metadata = _metadata(service, pool_deployment_name(service.name, pool), "engine")
    metadata["labels"][POOL_LABEL] = pool.value
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": pool_selector_labels(service.name, pool)},
            # Never below the serving count during a rollout: a new pod first, then an old one goes.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {**labels(service, "engine"), POOL_LABEL: pool.value}},
                "spec": pod_spec,
            },
        },
    }


def render_engine_service(service: LLMService) -> dict[str, Any]:
    """Headless: the gateway and the operator address each engine pod, never a load-balanced VIP."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service, engine_name(service), "engine"),
        "spec": {
            "clusterIP": "None",
            # Starting and draining pods still answer the operator's gRPC (load, drain, migrate).
            "publishNotReadyAddresses": True,
            "selector": selector_labels(service.name, "engine"),
            "ports": [
                {"name": "http", "port": ENGINE_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": SIDECAR_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": SIDECAR_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def render_gateway_deployment(service: LLMService, images: Images) -> dict[str, Any]:
    gateway = service.spec.gateway
    secret, key = sidecar_token_ref(service)
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "gateway",
        "image": gateway.image or images.slofleet,
        "args": [
            "gateway",
            "--port",
            str(GATEWAY_HTTP_PORT),
            # The engine pods' headless Service: every address it resolves to is one instance's
            # sidecar, re-resolved as pods come and go; the gateway learns each instance's load
            # from its sidecar's WatchLoad stream.
            "--sidecar-dns",
            f"{engine_name(service)}.{service.namespace}.svc:{SIDECAR_GRPC_PORT}",
            "--sidecar-token-file",
            f"{GATEWAY_TOKEN_DIR}/token",
            "--db",
            f"{GATEWAY_DATA_DIR}/gateway.sqlite3",
        ],
        "ports": [{"name": "http", "containerPort": GATEWAY_HTTP_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {**NON_ROOT_CONTAINER, "runAsUser": 10001},
        "volumeMounts": [
            {"name": "token", "mountPath": GATEWAY_TOKEN_DIR, "readOnly": True},
            {"name": "data", "mountPath": GATEWAY_DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes = [
        {"name": "token", "secret": {"secretName": secret, "items": [{"key": key, "path": "token"}]}},
        # The batch queue's SQLite file; an emptyDir survives container restarts, not pod loss.
        {"name": "data", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(service, gateway_name(service), "gateway"),
        "spec": {
            "replicas": gateway.replicas,
            "selector": {"matchLabels": selector_labels(service.name, "gateway")},
            "template": {
                "metadata": {"labels": labels(service, "gateway")},
                "spec": {"containers": [container], "volumes": volumes, "enableServiceLinks": False},
            },
        },
    }


def render_gateway_service(service: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service, gateway_name(service), "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(service.name, "gateway"),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_pdb(service: LLMService) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one engine pod at a time, so the rest keep serving
    while its requests migrate."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(service, engine_name(service), "engine"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(service.name, "engine")}},
    }


def render_network_policy(service: LLMService) -> dict[str, Any]:
    """The sidecar's gRPC port (which can drain or migrate requests) only for this service's
    gateway and engine peers and for the operator; HTTP and metrics stay open to the namespace's
    usual policy."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(service, f"{service.name}-sidecar-grpc", "engine"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(service.name, "engine")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "ports": [{"protocol": "TCP", "port": SIDECAR_GRPC_PORT}],
                    "from": [
                        {"podSelector": {"matchLabels": selector_labels(service.name, "gateway")}},
                        {"podSelector": {"matchLabels": selector_labels(service.name, "engine")}},
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}
                            },
                            "podSelector": {"matchLabels": OPERATOR_POD_LABELS},
                        },
                    ],
                },
                {
                    "ports": [
                        {"protocol": "TCP", "port": ENGINE_HTTP_PORT},
                        {"protocol": "TCP", "port": SIDECAR_METRICS_PORT},
                    ]
                },
            ],
        },
    }


def render_all(
    service: LLMService, images: Images, current_replicas: Mapping[Pool, int | None] | None = None
) -> list[dict[str, Any]]:
    """Every object the operator keeps for one LLMService, in apply order (the token first: the
    pods cannot start without it). `current_replicas`: each pool Deployment's spec.replicas now."""
    secret = render_token_secret(service)
    replicas = desired_pool_replicas(service.spec, current_replicas or {})
    return [
        *([secret] if secret is not None else []),
        render_engine_service(service),
        *(render_engine_deployment(service, images, pool, n) for pool, n in replicas.items()),
        render_pdb(service),
        render_network_policy(service),
        render_gateway_service(service),
        render_gateway_deployment(service, images),
    ]
