"""The sidecar token scheme (operator/tokens.py): tokens derived from one operator key, so the
operator never reads a Secret but its own key, which it creates once and then only reads."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import kubernetes.client
import pytest
from cluster_support import Cluster, call, cluster
from test_operator import NS, live

from slofleet.operator.kube import KubeClient
from slofleet.operator.tokens import (
    KEY_SECRET_NAME,
    TokenUnavailable,
    derive_token,
    load_or_create_key,
    read_user_token,
)

pytestmark = pytest.mark.timeout(60)
OPERATOR_NS = "slofleet-system"


@pytest.fixture
async def kube() -> AsyncIterator[tuple[Cluster, str, KubeClient]]:
    async with cluster() as (server, url):
        config = kubernetes.client.Configuration()
        config.host = url
        client = KubeClient(config)
        try:
            yield server, url, client
        finally:
            await client.close()


def test_tokens_are_stable_per_service_and_differ_between_services_and_keys() -> None:
    key = b"k" * 32
    assert derive_token(key, "uid-1") == derive_token(key, "uid-1")
    assert derive_token(key, "uid-1") != derive_token(key, "uid-2")
    assert derive_token(key, "uid-1") != derive_token(b"j" * 32, "uid-1")
    assert len(derive_token(key, "uid-1")) >= 43  # 256 bits, base64url


async def test_the_key_is_created_once_and_then_read(kube: tuple[Cluster, str, KubeClient]) -> None:
    server, _, client = kube
    # Two operator replicas starting at once (a rollout overlap) end with the same key.
    first, second = await asyncio.gather(
        load_or_create_key(client, OPERATOR_NS), load_or_create_key(client, OPERATOR_NS)
    )
    assert first == second and len(first) == 32
    assert await load_or_create_key(client, OPERATOR_NS) == first  # a restart reads it back
    secrets = [obj for _, ns, name, obj in server._live() if ns == OPERATOR_NS and name == KEY_SECRET_NAME]
    assert len(secrets) == 1
    assert base64.b64decode(secrets[0].raw["data"]["key"]) == first


async def test_a_user_token_secret_is_read_and_a_missing_one_named(
    kube: tuple[Cluster, str, KubeClient],
) -> None:
    server, url, client = kube
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mine", "namespace": NS},
        "data": {"t": base64.b64encode(b"s3cret").decode()},
    }
    await call(url, "POST", f"/api/v1/namespaces/{NS}/secrets", body)
    assert await read_user_token(client, NS, "mine", "t") == "s3cret"
    assert "mine" in live(server, "v1/secrets")
    with pytest.raises(
        TokenUnavailable, match=r"spec.sidecar.tokenSecretRef: Secret team-a/mine .* no key 'x'"
    ):
        await read_user_token(client, NS, "mine", "x")
    with pytest.raises(
        TokenUnavailable, match=r"spec\.sidecar\.tokenSecretRef: Secret team-a/absent does not exist"
    ):
        await read_user_token(client, NS, "absent", "t")
