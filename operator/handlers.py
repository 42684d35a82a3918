"""kopf handlers: decorators only, each calling a plain function (reconcile.py).

Importing this module registers the handlers in kopf's default registry; `runner.run_operator`
imports it. kopf's own bookkeeping lives in `slofleet.io/` annotations, never in `status`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from slofleet.operator.autoscaling import run_service_loop
from slofleet.operator.kube import KubeClient, connection_info
from slofleet.operator.reconcile import Emit, reconcile
from slofleet.operator.render import MANAGED_BY, SERVICE_LABEL
from slofleet.operator.tokens import load_or_create_key, operator_namespace
from slofleet.spec import API_GROUP, API_VERSION, PLURAL

LLMSERVICES = (API_GROUP, API_VERSION, PLURAL)


def _emitter(obj: Mapping[str, Any]) -> Emit:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(dict(obj), type=type_, reason=reason, message=message)

    return emit


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # Watches end server-side every few minutes and are re-established, so that a silently dropped
    # connection (load balancers, API server restarts) can never stall the operator for long.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # The control-loop daemon needs a finalizer (kopf stops it before the object goes).
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    memo.kube = KubeClient(memo.kube_config)
    memo.token_key = await load_or_create_key(memo.kube, operator_namespace())


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(memo.kube_config)


@kopf.on.resume(*LLMSERVICES)
@kopf.on.create(*LLMSERVICES)
@kopf.on.update(*LLMSERVICES)
async def llmservice_changed(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    outcome = await reconcile(memo.kube, namespace, name, memo.images, _emitter, memo.token_key)
    if outcome.invalid is not None:
        reason, message = outcome.invalid
        if reason == "OwnershipConflict":
            # Someone else's object is in the way: slow retries, since deleting it needs no spec change.
            raise kopf.TemporaryError(message, delay=60)
        # Reported in status and an event already; retrying cannot help until the spec changes,
        # which fires this handler again.
        raise kopf.PermanentError(message)


@kopf.on.event(
    "apps",
    "v1",
    "deployments",
    labels={"app.kubernetes.io/managed-by": MANAGED_BY, SERVICE_LABEL: kopf.PRESENT},
)
async def owned_deployment_changed(
    body: kopf.Body, namespace: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Status follows the Deployments, and a deleted Deployment is recreated (like a controller's
    Owns() watch); an invalid spec was already reported by the LLMService handler."""
    owner = body["metadata"]["labels"][SERVICE_LABEL]
    outcome = await reconcile(memo.kube, namespace, owner, memo.images, _emitter, memo.token_key)
    if outcome.actions:
        logger.info("LLMService %s: %s", owner, ", ".join(outcome.actions))


@kopf.daemon(*LLMSERVICES, cancellation_timeout=10)
async def control_loop(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """The global autoscaler of this LLMService, at its own spec.autoscaling.intervalSeconds
    (autoscaling.py says why a daemon rather than a timer)."""
    await run_service_loop(memo.kube, memo.token_key, body, _emitter(body), stopped)
