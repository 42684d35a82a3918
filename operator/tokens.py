"""The sidecars' bearer tokens, derived so that the operator never needs to read a Secret.

The control loop must present each LLMService's sidecar token on every gRPC call (Load, Drain).
Reading the generated token Secret back would need `get` on Secrets, and RBAC cannot narrow that
to our Secrets: `resourceNames` must be listed up front and these names depend on the
LLMServices, so the grant would cover every Secret of every namespace. Instead the token is
HMAC-SHA256(operator key, LLMService uid): the operator writes it into the Secret once (`create`,
as before) and recomputes it whenever it needs it. The one key lives in a Secret of the
operator's own namespace that the operator creates at its first start and may `get` by its fixed
name (a namespaced Role with resourceNames): the least privilege that survives restarts.

A user-supplied spec.sidecar.tokenSecretRef cannot be derived; the operator reads that Secret only
if the user granted it `get` on exactly that Secret (see `read_user_token`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from slofleet.operator.kube import KINDS, ApiError, KubeClient
from slofleet.operator.render import OPERATOR_NAMESPACE

KEY_SECRET_NAME = "slofleet-operator-key"
KEY_FIELD = "key"


class TokenUnavailable(Exception):
    """The sidecar token cannot be had; the message names the field and the fix."""


def operator_namespace() -> str:
    """Where the operator runs: its pod's namespace (downward API), else deploy/'s default."""
    return os.environ.get("POD_NAMESPACE") or OPERATOR_NAMESPACE


def derive_token(key: bytes, service_uid: str) -> str:
    """The sidecar token of the LLMService with this uid (a recreated service gets a new one)."""
    digest = hmac.new(key, f"slofleet-sidecar-token/{service_uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def load_or_create_key(kube: KubeClient, namespace: str) -> bytes:
    """The operator's token key: read it, or create it with 32 random bytes on the first start.
    A concurrent creator (409) wins and its key is read back, so all replicas agree."""
    kind = KINDS["Secret"]
    current = await kube.get(kind, namespace, KEY_SECRET_NAME)
    if current is None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": KEY_SECRET_NAME,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "slofleet", "app.kubernetes.io/component": "operator"},
            },
            "data": {KEY_FIELD: base64.b64encode(secrets.token_bytes(32)).decode()},
        }
        try:
            current = await kube.create(kind, namespace, body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            current = await kube.get(kind, namespace, KEY_SECRET_NAME)
    data = (current or {}).get("data") or {}
    if KEY_FIELD not in data:
        raise RuntimeError(
            f"Secret {namespace}/{KEY_SECRET_NAME} has no data.{KEY_FIELD}; delete it so the operator "
            f"creates a new one (every generated sidecar token changes with it)"
        )
    return base64.b64decode(data[KEY_FIELD])


async def read_user_token(kube: KubeClient, namespace: str, name: str, key: str) -> str:
    """A user-supplied token Secret. Raises TokenUnavailable naming the grant that is missing."""
    try:
        secret = await kube.get(KINDS["Secret"], namespace, name)
    except ApiError as exc:
        if exc.status == 403:
            raise TokenUnavailable(
                f"spec.sidecar.tokenSecretRef: the operator may not read Secret {namespace}/{name}; "
                f"grant it `get` on that Secret (a Role with resourceNames: [{name}]) or omit "
                f"tokenSecretRef to let the operator generate the token"
            ) from exc
        raise
    value = ((secret or {}).get("data") or {}).get(key)
    if value is None:
        raise TokenUnavailable(
            f"spec.sidecar.tokenSecretRef: Secret {namespace}/{name} does not exist or has no key {key!r}"
        )
    return base64.b64decode(value).decode()
