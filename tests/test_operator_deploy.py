"""deploy/: `kubectl kustomize deploy/` renders, RBAC is exactly what the operator calls, the operator
pod is locked down, and the NetworkPolicies guard the sidecar's gRPC port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slofleet.operator.kube import KINDS
from slofleet.operator.render import OPERATOR_NAMESPACE, OPERATOR_POD_LABELS, SIDECAR_GRPC_PORT, Images
from slofleet.operator.tokens import KEY_SECRET_NAME

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot run `kubectl kustomize deploy/`")
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy")], capture_output=True, text=True, check=True
    )
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


def test_kustomize_renders_every_part(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(rendered) == {
        ("Namespace", OPERATOR_NAMESPACE),
        ("CustomResourceDefinition", "llmservices.slofleet.io"),
        ("ServiceAccount", "slofleet-operator"),
        ("ClusterRole", "slofleet-operator"),
        ("ClusterRoleBinding", "slofleet-operator"),
        ("Role", "slofleet-operator-key"),
        ("RoleBinding", "slofleet-operator-key"),
        ("Deployment", "slofleet-operator"),
        ("NetworkPolicy", "slofleet-operator"),
        ("NetworkPolicy", "slofleet-sidecar-grpc"),
    }
    for (kind, _), doc in rendered.items():
        if kind in ("ServiceAccount", "Deployment", "NetworkPolicy", "Role", "RoleBinding"):
            assert doc["metadata"]["namespace"] == OPERATOR_NAMESPACE
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    assert rendered["CustomResourceDefinition", "llmservices.slofleet.io"]["spec"] == crd["spec"]
    binding = rendered["ClusterRoleBinding", "slofleet-operator"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "slofleet-operator", "namespace": OPERATOR_NAMESPACE}
    ]


def _verbs(role: dict[str, Any], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in role["rules"]
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_is_least_privilege(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    role = rendered["ClusterRole", "slofleet-operator"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"delete", "deletecollection", "update"} & set(rule["verbs"]) or rule["resources"] == [
            "llmservices/finalizers"
        ]
    # Every kind the operator writes (operator/kube.py) is granted get/create/patch, and no more
    # than list/watch on top where kopf watches it.
    for kind in KINDS.values():
        group = kind.api_version.rpartition("/")[0]
        verbs = _verbs(role, group, kind.plural)
        if kind.kind == "LLMService":
            assert verbs == {"get", "list", "watch", "patch"}
        elif kind.kind == "Deployment":
            assert verbs == {"get", "list", "watch", "create", "patch"}
        elif kind.kind == "Secret":
            assert verbs == {"create"}  # the generated token; reading Secrets is never needed
        else:
            assert verbs == {"get", "create", "patch"}, kind
    # status, finalizers and events are rules of their own (kubebuilder's shape).
    assert _verbs(role, "slofleet.io", "llmservices/status") == {"get", "patch"}
    assert _verbs(role, "slofleet.io", "llmservices/finalizers") == {"update"}
    assert _verbs(role, "", "events") == {"create"}
    assert _verbs(role, "", "pods") == {"get", "list", "watch", "patch"}
    assert not _verbs(role, "coordination.k8s.io", "leases")  # kopf runs standalone: no peering
    # The one Secret the operator reads: its token key, by name, in its own namespace.
    key_role = rendered["Role", "slofleet-operator-key"]
    assert key_role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [KEY_SECRET_NAME], "verbs": ["get"]}
    ]
    key_binding = rendered["RoleBinding", "slofleet-operator-key"]
    assert key_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "slofleet-operator", "namespace": OPERATOR_NAMESPACE}
    ]


def test_operator_pod_is_non_root_read_only_and_probed(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    dep = rendered["Deployment", "slofleet-operator"]
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["serviceAccountName"] == "slofleet-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["args"][0] == "operator"
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    probe = container["livenessProbe"]["httpGet"]
    assert liveness.endswith(f":8080{probe['path']}")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert set(env) == {"SLOFLEET_IMAGE", "SLOFLEET_ENGINE_IMAGE", "SLOFLEET_ENGINE_CPU_IMAGE"}
    pod_namespace = next(e for e in container["env"] if e["name"] == "POD_NAMESPACE")
    assert pod_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert Images.from_env(env) == Images()  # deploy/ pins the images the operator defaults to
    assert container["image"] == env["SLOFLEET_IMAGE"]
    # The operator pods are the ones the rendered NetworkPolicies let reach the sidecars.
    assert OPERATOR_POD_LABELS.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_sidecar_grpc_network_policy(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    policy = rendered["NetworkPolicy", "slofleet-sidecar-grpc"]["spec"]
    grpc_rule = policy["ingress"][0]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": SIDECAR_GRPC_PORT}]
    assert {"podSelector": {"matchLabels": OPERATOR_POD_LABELS}} in grpc_rule["from"]
    assert all(SIDECAR_GRPC_PORT != p["port"] for rule in policy["ingress"][1:] for p in rule["ports"])
    assert rendered["NetworkPolicy", "slofleet-operator"]["spec"]["ingress"] == []
