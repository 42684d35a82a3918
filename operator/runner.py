"""Run the kopf operator with slofleet's handlers against one API server."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import kopf
import kubernetes.client

from slofleet.operator.render import Images


async def run_operator(
    kube_config: kubernetes.client.Configuration,
    *,
    namespaces: Collection[str] = (),
    clusterwide: bool = False,
    liveness_endpoint: str | None = None,
    images: Images | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """One API connection (`kube_config`) serves both kopf's watches and the operator's writes.

    Standalone (no kopf peering): deploy/ runs one replica with the Recreate strategy, and
    reconcile is idempotent, so an overlap during a restart cannot duplicate objects.
    """
    import slofleet.operator.handlers  # noqa: F401  (importing registers the handlers with kopf)

    memo = kopf.Memo(kube_config=kube_config, images=images or Images.from_env())
    await kopf.operator(
        namespaces=namespaces,
        clusterwide=clusterwide,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
