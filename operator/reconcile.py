"""Reconcile one LLMService: read it, apply what `render_all` wants, write status, report events.

Plain async functions (no kopf decorators; handlers.py calls them). Level-triggered: every call
reads the LLMService and its objects afresh and converges from whatever it finds, so a restart
mid-way, a concurrent call or a deleted Deployment all end in the same state, and an object is
written only when it differs from the desired one (no duplicates, no churn).
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from kubernetes.utils.quantity import parse_quantity

from slofleet.instance import Pool
from slofleet.operator.kube import KINDS, LLMSERVICE, ApiError, KubeClient
from slofleet.operator.metrics import observe_reconcile
from slofleet.operator.render import (
    Images,
    desired_pool_replicas,
    engine_pools,
    engine_selector,
    gateway_endpoint,
    pool_deployment_name,
    render_all,
)
from slofleet.operator.status import (
    Condition,
    build_status,
    combine_deployments,
    condition,
    deployment_conditions,
    invalid_conditions,
    status_changed,
)
from slofleet.operator.tokens import derive_token
from slofleet.spec import LLMServiceSpec, SpecError, parse_llmservice, semantic_problems

log = logging.getLogger(__name__)

# (event type "Normal"/"Warning", reason, message) about the LLMService.
Emit = Callable[[str, str, str], None]
Action = Literal["created", "updated", "unchanged"]


class OwnershipConflict(Exception):
    """An object with the name we need exists and belongs to someone else: never take it over."""


@dataclass
class Outcome:
    actions: list[str] = field(default_factory=list)
    # Set when the spec cannot run: the reason and the message that names the field.
    invalid: tuple[str, str] | None = None


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _same_scalar(desired: Any, current: Any) -> bool:
    if desired == current:
        return True
    # The API server returns resource quantities in canonical form ("0.5" -> "500m", 2 -> "2").
    if isinstance(desired, str | int) and isinstance(current, str | int) and not isinstance(desired, bool):
        try:
            return bool(parse_quantity(desired) == parse_quantity(current))
        except ValueError:
            return False
    return False


def is_subset(desired: Any, current: Any) -> bool:
    """Whether `current` already holds every field of `desired`, as the API server returns it: it
    adds defaults, drops empty values (omitempty) and canonicalizes quantities. Comparing any less
    loosely would patch on every reconcile, and every patch triggers the next reconcile."""
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(
            is_subset(value, current[key]) if key in current else value in ("", [], {}, None, False, 0)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(desired) == len(current)
            and all(is_subset(d, c) for d, c in zip(desired, current, strict=True))
        )
    return _same_scalar(desired, current)


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


async def create_secret_once(
    kube: KubeClient, desired: dict[str, Any], token: str
) -> tuple[Action, dict[str, Any]]:
    """Create the generated token Secret if it does not exist; never read or rewrite it (the
    operator holds no permission to read Secrets: it derives the same token, see tokens.py)."""
    meta = desired["metadata"]
    body = {**desired, "data": {"token": base64.b64encode(token.encode()).decode()}}
    try:
        await kube.create(KINDS["Secret"], meta["namespace"], body)
    except ApiError as exc:
        if exc.status == 409:
            return "unchanged", desired
        raise
    return "created", desired


async def apply_object(
    kube: KubeClient,
    desired: dict[str, Any],
    owner_uid: str,
    refresh: Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Action, dict[str, Any]]:
    """Create `desired` or merge-patch it into the existing object; no write when nothing differs.

    `refresh(desired, live)` re-derives fields that another writer owns from the object as read
    right before the patch (an engine pool's spec.replicas, which the control loop sets): a value
    rendered from an earlier read would undo a decision made since, a lost update."""
    kind = KINDS[desired["kind"]]
    meta = desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current = await kube.get(kind, namespace, name)
    if current is None:
        try:
            return "created", await kube.create(kind, namespace, desired)
        except ApiError as exc:
            if exc.status != 409:  # 409: a concurrent reconcile created it first; patch it below
                raise
            current = await kube.get(kind, namespace, name)
            if current is None:
                raise
    if _controller_uid(current) != owner_uid:
        raise OwnershipConflict(
            f"{kind.kind} {namespace}/{name} exists and is not controlled by this LLMService; "
            f"delete or rename it"
        )
    if refresh is not None:
        desired = refresh(desired, current)
    if is_subset(desired, current):
        return "unchanged", current
    return "updated", await kube.patch(kind, namespace, name, desired)


def _live_replicas(
    spec: LLMServiceSpec, pool: Pool, desired: dict[str, Any], live: Mapping[str, Any]
) -> dict[str, Any]:
    """`desired` with the replicas reconcile wants given the pool Deployment's replicas *now*."""
    now = live.get("spec", {}).get("replicas")
    replicas = desired_pool_replicas(spec, {pool: None if now is None else int(now)})[pool]
    return {**desired, "spec": {**desired["spec"], "replicas": replicas}}


def _report_transitions(before: Mapping[str, Any] | None, after: Mapping[str, Any], emit: Emit) -> None:
    """One event per condition change, never one per reconcile: events stay readable."""
    for cond in after.get("conditions", []):
        old = condition(before, cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        if cond["type"] == "Degraded" and cond["status"] == "True":
            emit("Warning", cond["reason"], cond["message"])
        elif cond["type"] == "Ready" and cond["status"] == "True":
            emit("Normal", "Ready", cond["message"])


async def _write_status(
    kube: KubeClient,
    obj: Mapping[str, Any],
    conditions: list[Condition],
    deployment: Mapping[str, Any] | None,
    emit: Emit,
) -> dict[str, Any]:
    meta = obj["metadata"]
    previous = obj.get("status") or {}
    service_name = meta["name"]
    status = build_status(
        previous=previous,
        conditions=conditions,
        observed_generation=meta.get("generation"),
        deployment=deployment,
        selector=engine_selector(service_name),
        endpoint=gateway_endpoint(service_name, meta["namespace"]),
        now=now_rfc3339(),
    )
    if status_changed(previous, status):
        try:
            await kube.patch(
                LLMSERVICE, meta["namespace"], service_name, {"status": status}, subresource="status"
            )
        except ApiError as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to report on
                return status
            raise
        _report_transitions(previous, status, emit)
    return status


async def _engine_deployments(
    kube: KubeClient, namespace: str, name: str
) -> dict[Pool, dict[str, Any] | None]:
    """Every pool's engine Deployment as it is now (None where it does not exist)."""
    kind = KINDS["Deployment"]
    return {pool: await kube.get(kind, namespace, pool_deployment_name(name, pool)) for pool in Pool}


@observe_reconcile
async def reconcile(
    kube: KubeClient,
    namespace: str,
    name: str,
    images: Images,
    emit: Callable[[Mapping[str, Any]], Emit],
    token_key: bytes,
) -> Outcome:
    """Bring the objects of LLMService namespace/name to their desired state and update its status.

    `emit(obj)` gives the event reporter for the freshly read object; `token_key` derives the
    generated sidecar token. Returns what was done; an invalid spec is reported in status and
    events and returned, never raised.
    """
    obj = await kube.get(LLMSERVICE, namespace, name)
    if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
        # Gone or going: its objects go with it through their ownerReferences.
        return Outcome()
    report = emit(obj)
    pools = await _engine_deployments(kube, namespace, name)
    engine = combine_deployments(list(pools.values()))
    try:
        service = parse_llmservice(obj)
        problems = semantic_problems(service.spec)
    except SpecError as exc:
        invalid = ("InvalidSpec", str(exc))
    else:
        invalid = ("UnsupportedSpec", "; ".join(str(p) for p in problems)) if problems else None
    if invalid is not None:
        await _write_status(kube, obj, invalid_conditions(*invalid), engine, report)
        return Outcome(invalid=invalid)

    outcome = Outcome()
    current = {pool: (dep or {}).get("spec", {}).get("replicas") for pool, dep in pools.items()}
    used = {pool_deployment_name(name, pool): pool for pool in engine_pools(service.spec)}
    for desired in render_all(service, images, current):
        try:
            if desired["kind"] == "Secret":
                token = derive_token(token_key, str(service.uid))
                action, result = await create_secret_once(kube, desired, token)
            else:
                pool = used.get(desired["metadata"]["name"]) if desired["kind"] == "Deployment" else None
                refresh = None if pool is None else partial(_live_replicas, service.spec, pool)
                action, result = await apply_object(kube, desired, str(service.uid), refresh)
        except OwnershipConflict as exc:
            conflict = ("OwnershipConflict", str(exc))
            await _write_status(kube, obj, invalid_conditions(*conflict), engine, report)
            return Outcome(actions=outcome.actions, invalid=conflict)
        what = f"{desired['kind']} {desired['metadata']['name']}"
        if action != "unchanged":
            outcome.actions.append(f"{action} {what}")
            report("Normal", action.capitalize(), f"{action} {what}")
            log.info("%s/%s: %s %s", namespace, name, action, what)
        if desired["kind"] == "Deployment" and desired["metadata"]["name"] in used:
            pools[used[desired["metadata"]["name"]]] = result
    engine = combine_deployments([dep for pool, dep in pools.items() if pool in used.values()])
    await _write_status(kube, obj, deployment_conditions(engine), engine, report)
    return outcome
