"""On a real cluster: install the CRD, run `slofleet operator` against it, apply the tiny sample and
wait for the engine Deployment; the API server's own validation (schema + CEL) rejects a bad spec,
and the real garbage collector removes the owned objects with the LLMService.

The operator runs here as a process (the cluster may not be able to pull our images); the pods it
creates may stay Pending or ImagePullBackOff, which this test does not depend on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from e2e.conftest import Cluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[subprocess.Popen[bytes]]:
    cluster.run("apply", "-f", str(ROOT / "crds/llmservice.yaml"))
    cluster.run("wait", "--for=condition=Established", "crd/llmservices.slofleet.io", "--timeout=60s")
    args = [sys.executable, "-m", "slofleet.cli", "operator", "-n", cluster.namespace, "--liveness", ""]
    if cluster.kubeconfig:
        args += ["--kubeconfig", cluster.kubeconfig]
    # The operator keeps its sidecar-token key in its own namespace (operator/tokens.py); run here,
    # that is the test's namespace (slofleet-system may not exist on this cluster).
    env = dict(os.environ, POD_NAMESPACE=cluster.namespace)
    proc = subprocess.Popen(args, start_new_session=True, env=env)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def get(cluster: Cluster, kind: str, name: str) -> dict | None:
    result = cluster.run("get", kind, name, "-n", cluster.namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_tiny_sample_becomes_a_deployment(cluster: Cluster, operator: subprocess.Popen[bytes]) -> None:
    cluster.run("apply", "-n", cluster.namespace, "-f", str(ROOT / "deploy/samples/tiny-cpu.yaml"))
    wait_for(lambda: get(cluster, "deployment", "tiny-engine") is not None, "the engine Deployment")
    engine = get(cluster, "deployment", "tiny-engine")
    llms = get(cluster, "llmservice", "tiny")
    assert engine and llms
    assert engine["metadata"]["ownerReferences"][0]["uid"] == llms["metadata"]["uid"]
    wait_for(
        lambda: bool((get(cluster, "llmservice", "tiny") or {}).get("status", {}).get("conditions")), "status"
    )
    assert operator.poll() is None

    cluster.run("delete", "llmservice", "tiny", "-n", cluster.namespace, "--wait=true")
    wait_for(
        lambda: get(cluster, "deployment", "tiny-engine") is None, "garbage collection of the Deployment"
    )


def test_api_server_rejects_an_invalid_spec_naming_the_field(cluster: Cluster) -> None:
    obj = yaml.safe_load((ROOT / "deploy/samples/tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": "bad", "namespace": cluster.namespace}
    obj["spec"]["replicas"] = {"min": 5, "max": 3}
    result = subprocess.run(
        [
            cluster.kubectl,
            *(["--kubeconfig", cluster.kubeconfig] if cluster.kubeconfig else []),
            "apply",
            "-f",
            "-",
        ],
        input=yaml.safe_dump(obj),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "spec.replicas.min" in result.stderr


def test_deploy_kustomization_passes_server_side_validation(cluster: Cluster) -> None:
    """Everything `kubectl apply -k deploy/` would create, checked by the API server (dry run).
    Namespaced objects go to the test's namespace: a dry run cannot create slofleet-system first."""
    docs = list(yaml.safe_load_all(cluster.run("kustomize", str(ROOT / "deploy")).stdout))
    objs = [d for d in docs if d and d["kind"] != "Namespace"]
    for obj in objs:
        if "namespace" in obj["metadata"]:
            obj["metadata"]["namespace"] = cluster.namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = cluster.namespace
    result = subprocess.run(
        [cluster.kubectl, *(["--kubeconfig", cluster.kubeconfig] if cluster.kubeconfig else []),
         "apply", "--dry-run=server", "-f", "-"],
        input=yaml.safe_dump_all(objs), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
