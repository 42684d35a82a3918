"""e2e fixtures: a real Kubernetes cluster from KUBECONFIG (or ~/.kube/config), or a skip that
says why there is none."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Cluster:
    kubectl: str
    kubeconfig: str | None
    namespace: str

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [self.kubectl, *(["--kubeconfig", self.kubeconfig] if self.kubeconfig else []), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A reachable cluster and a fresh namespace in it (deleted afterwards)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no cluster: kubectl is not installed")
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig and not (Path.home() / ".kube/config").exists():
        pytest.skip("no cluster: KUBECONFIG is not set and ~/.kube/config does not exist")
    probe = Cluster(kubectl, kubeconfig, "")
    try:
        probe.run("version", "--request-timeout=5s", timeout=15)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = (getattr(exc, "stderr", "") or str(exc)).strip()[:200]
        where = kubeconfig or "~/.kube/config"
        pytest.skip(f"no cluster: the API server in {where} is unreachable: {detail}")
    namespace = f"slofleet-e2e-{uuid.uuid4().hex[:6]}"
    probe.run("create", "namespace", namespace)
    try:
        yield Cluster(kubectl, kubeconfig, namespace)
    finally:
        probe.run("delete", "namespace", namespace, "--wait=false", check=False)
