"""A small async Kubernetes API client (aiohttp), sharing its credentials with kopf.

Why not the official client: it is synchronous (kubernetes_asyncio is not a dependency) and the
operator only needs get/create/merge-patch of a handful of kinds. One `kubernetes.client.
Configuration` (in-cluster, kubeconfig, or a plain URL in tests) feeds both this client and kopf's
login, so the two can never talk to different clusters or with different identities.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
import kubernetes.client
import kubernetes.config

from slofleet.spec import API_GROUP, API_VERSION, KIND, PLURAL


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def collection(self, namespace: str) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


LLMSERVICE = Kind(f"{API_GROUP}/{API_VERSION}", KIND, PLURAL)
KINDS = {
    k.kind: k
    for k in (
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("v1", "Service", "services"),
        Kind("v1", "Secret", "secrets"),
        Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
        LLMSERVICE,
    )
}


# Read and annotated by the fleet backend (scale-in), never created: not in KINDS, which lists the
# kinds the operator writes (tests/test_operator_deploy.py checks the RBAC against it).
POD = Kind("v1", "Pod", "pods")


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


def load_configuration(
    kubeconfig: str | None = None, context: str | None = None
) -> kubernetes.client.Configuration:
    """In-cluster service account when running in a pod (and no kubeconfig or context was asked
    for), else the kubeconfig (explicit or default)."""
    config = kubernetes.client.Configuration()
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
            return config
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=config)
    return config


def _authorization(config: kubernetes.client.Configuration) -> str | None:
    # In-cluster configurations re-read the rotating service-account token through this hook.
    if config.refresh_api_key_hook is not None:
        config.refresh_api_key_hook(config)
    return config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials, in the shape kopf's @kopf.on.login expects."""
    header = _authorization(config)
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


class KubeClient:
    """get / create / merge-patch of namespaced objects, returning plain dicts."""

    def __init__(self, config: kubernetes.client.Configuration) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.host.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.config.ssl_ca_cert)
        if self.config.cert_file:
            ctx.load_cert_chain(self.config.cert_file, self.config.key_file)
        if not self.config.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl()), timeout=aiohttp.ClientTimeout(total=30)
            )
        headers = {"Accept": "application/json"}
        auth = _authorization(self.config)
        if auth:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = content_type
        basic = (
            aiohttp.BasicAuth(self.config.username, self.config.password) if self.config.username else None
        )
        url = self.config.host.rstrip("/") + path
        async with self._session.request(method, url, data=data, headers=headers, auth=basic) as resp:
            text = await resp.text()
            payload = json.loads(text) if text else None
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, payload if payload is not None else text)
            return payload

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", f"{kind.collection(namespace)}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of `kind` in `namespace` whose labels match `label_selector` (k=v,...)."""
        query = urllib.parse.urlencode({"labelSelector": label_selector})
        found = await self._request("GET", f"{kind.collection(namespace)}?{query}")
        return list((found or {}).get("items") or [])

    async def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", kind.collection(namespace), body)

    async def patch(
        self, kind: Kind, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch: lists in `patch` replace the object's lists (the desired state is whole)."""
        path = f"{kind.collection(namespace)}/{name}" + (f"/{subresource}" if subresource else "")
        return await self._request("PATCH", path, patch, "application/merge-patch+json")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
