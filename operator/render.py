"""Pure builders of the Kubernetes objects that one LLMService owns.

No I/O here: `render_all` maps (service, images, current engine replicas) to plain dicts, so every
field the operator writes is unit-tested without a cluster, and `slofleet render` prints exactly
what the operator would apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slofleet import __version__
from slofleet.spec import API_GROUP, API_VERSION, KIND, LLMService, LLMServiceSpec

ENGINE_HTTP_PORT = 8000
SIDECAR_GRPC_PORT = 50051
SIDECAR_METRICS_PORT = 9090
GATEWAY_HTTP_PORT = 8080
GATEWAY_TOKEN_DIR = "/var/run/secrets/slofleet"
GATEWAY_DATA_DIR = "/var/lib/slofleet"
MANAGED_BY = "slofleet-operator"
SERVICE_LABEL = f"{API_GROUP}/service"
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
    return f"{service.name}-engine"


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


def desired_engine_replicas(spec: LLMServiceSpec, current: int | None) -> int:
    """`static` pins the count to spec.replicas.initial; other policies start there and then own it
    (the control loop scales the Deployment), so reconcile only clamps it into min..max."""
    if spec.autoscaling.policy == "static" or current is None:
        return spec.initial_replicas
    return min(max(current, spec.replicas.min), spec.replicas.max)


# slofleet's methods on every vLLM worker (KV layout, layer drop/restore); the sidecar calls them.
ENGINE_EXTENSION_ARGS = ("--worker-extension-cls", "slofleet.sidecar.vllm_ext.worker.SlofleetWorkerExtension")


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
        "args": vllm_args(spec, ENGINE_EXTENSION_ARGS),
        "env": engine_env(spec),
        "ports": [{"name": "http", "containerPort": ENGINE_HTTP_PORT, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": ENGINE_STARTUP_SECONDS // 10},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def sidecar_args() -> list[str]:
    """`slofleet sidecar` beside the engine; $(POD_NAME) is expanded by the kubelet from the env."""
    return [
        "sidecar",
        "--engine-url",
        f"http://127.0.0.1:{ENGINE_HTTP_PORT}",
        "--instance-id",
        "$(POD_NAME)",
        "--grpc-port",
        str(SIDECAR_GRPC_PORT),
        "--metrics-port",
        str(SIDECAR_METRICS_PORT),
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


def _sidecar_container(service: LLMService, images: Images) -> dict[str, Any]:
    secret, key = sidecar_token_ref(service)
    env = [
        *_pod_identity_env(),
        {"name": "SLOFLEET_SIDECAR_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
    ]
    grpc_probe = {"grpc": {"port": SIDECAR_GRPC_PORT}}
    return {
        "name": "sidecar",
        "image": images.slofleet,
        "args": sidecar_args(),
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


def render_engine_deployment(
    service: LLMService, images: Images, current_replicas: int | None
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
        "containers": [_engine_container(spec, images), _sidecar_container(service, images)],
        "volumes": volumes,
        # Time to drain: the sidecar migrates running requests away before the engine stops.
        "terminationGracePeriodSeconds": 120,
        "enableServiceLinks": False,
    }
    if spec.engine.resources.gpu > 0:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(service, engine_name(service), "engine"),
        "spec": {
            "replicas": desired_engine_replicas(spec, current_replicas),
            "selector": {"matchLabels": selector_labels(service.name, "engine")},
            # Never below the serving count during a rollout: a new pod first, then an old one goes.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels(service, "engine")},
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
            # The engine pods' headless Service: the gateway learns each instance's load from
            # its sidecar's WatchLoad stream.
            "--sidecar",
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
    service: LLMService, images: Images, current_engine_replicas: int | None = None
) -> list[dict[str, Any]]:
    """Every object the operator keeps for one LLMService, in apply order (the token first: the
    pods cannot start without it)."""
    secret = render_token_secret(service)
    return [
        *([secret] if secret is not None else []),
        render_engine_service(service),
        render_engine_deployment(service, images, current_engine_replicas),
        render_pdb(service),
        render_network_policy(service),
        render_gateway_service(service),
        render_gateway_deployment(service, images),
    ]
