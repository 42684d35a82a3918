"""Pure builders of an LLMService's status: replica counts from the engine Deployment and the
Ready/Progressing/Degraded conditions.

Conditions follow the Kubernetes convention (metav1.Condition): a `lastTransitionTime` changes
only when `status` flips, so `kubectl describe` tells how long a state has lasted, and an
unchanged status renders identically, so the operator writes nothing when nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], wanted: Sequence[Condition], generation: int | None, now: str
) -> list[dict[str, Any]]:
    """Render `wanted`, keeping each condition's lastTransitionTime while its status is unchanged."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in wanted:
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        item: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out


def invalid_conditions(reason: str, message: str) -> list[Condition]:
    """A spec that cannot run: nothing is applied until it is fixed, and the message names the field."""
    return [
        Condition("Ready", "False", reason, message),
        Condition("Progressing", "False", reason, "waiting for a valid spec"),
        Condition("Degraded", "True", reason, message),
    ]


def _deployment_failure(deployment: Mapping[str, Any]) -> tuple[str, str] | None:
    for cond in deployment.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("reason") or "ReplicaFailure", cond.get(
                "message"
            ) or "the engine pods cannot be created"
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "ProgressDeadlineExceeded", cond.get("message") or "the engine rollout is stuck"
    return None


def combine_deployments(deployments: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The pool Deployments seen as one engine Deployment (counts summed, rolling if any rolls,
    every failure condition kept), so that conditions and counts cover the whole fleet."""
    found = [d for d in deployments if d is not None]
    if not found:
        return None

    def total(section: str, key: str) -> int:
        return sum(int((d.get(section, {}) or {}).get(key, 0) or 0) for d in found)

    def lagging(d: Mapping[str, Any]) -> bool:
        observed = (d.get("status", {}) or {}).get("observedGeneration")
        return observed is not None and observed < d.get("metadata", {}).get("generation", 0)

    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": total("spec", "replicas")},
        "status": {
            "observedGeneration": 0 if any(lagging(d) for d in found) else 1,
            "replicas": total("status", "replicas"),
            "readyReplicas": total("status", "readyReplicas"),
            "updatedReplicas": total("status", "updatedReplicas"),
            "conditions": [c for d in found for c in (d.get("status", {}) or {}).get("conditions", []) or []],
        },
    }


def deployment_conditions(deployment: Mapping[str, Any] | None) -> list[Condition]:
    """Conditions of a valid LLMService from its engine Deployment (None: not created yet)."""
    if deployment is None:
        return [
            Condition("Ready", "False", "Creating", "the engine Deployment does not exist yet"),
            Condition("Progressing", "True", "Creating", "creating the engine Deployment"),
            Condition("Degraded", "False", "AsExpected", ""),
        ]
    desired = int(deployment.get("spec", {}).get("replicas", 1) or 0)
    st = deployment.get("status", {}) or {}
    ready = int(st.get("readyReplicas", 0) or 0)
    updated = int(st.get("updatedReplicas", 0) or 0)
    observed = st.get("observedGeneration")
    generation = deployment.get("metadata", {}).get("generation")
    counts = f"{ready}/{desired} engine replicas ready"

    if desired == 0:
        ready_cond = Condition("Ready", "False", "ScaledToZero", "spec.replicas allows 0 and no engine runs")
    elif ready > 0:
        ready_cond = Condition("Ready", "True", "Serving", counts)
    else:
        ready_cond = Condition("Ready", "False", "NoReadyReplicas", counts)

    rolling = (observed is not None and generation is not None and observed < generation) or updated < desired
    if rolling or ready < desired:
        progressing = Condition("Progressing", "True", "RollingOut", f"{updated}/{desired} updated, {counts}")
    else:
        progressing = Condition("Progressing", "False", "Complete", counts)

    failure = _deployment_failure(deployment)
    degraded = (
        Condition("Degraded", "True", failure[0], failure[1])
        if failure
        else Condition("Degraded", "False", "AsExpected", "")
    )
    return [ready_cond, progressing, degraded]


def build_status(
    *,
    previous: Mapping[str, Any] | None,
    conditions: Sequence[Condition],
    observed_generation: int | None,
    deployment: Mapping[str, Any] | None,
    selector: str | None,
    endpoint: str | None,
    now: str,
) -> dict[str, Any]:
    """The status subresource's content that the operator owns; other keys (slo, pools,
    lastScale, written by the control loop) are left as they are by the merge patch."""
    previous = previous or {}
    st = (deployment or {}).get("status", {}) or {}
    status: dict[str, Any] = {
        "replicas": int(st.get("replicas", 0) or 0),
        "readyReplicas": int(st.get("readyReplicas", 0) or 0),
        "conditions": merge_conditions(
            previous.get("conditions", []) or [], conditions, observed_generation, now
        ),
    }
    if observed_generation is not None:
        status["observedGeneration"] = observed_generation
    if selector is not None:
        status["selector"] = selector
    if endpoint is not None:
        status["endpoint"] = endpoint
    return status


def status_changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything (keys the operator does not own are ignored)."""
    previous = previous or {}
    return any(previous.get(key) != value for key, value in new.items())


def condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in (status or {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return cond
    return None


def pools_status(targets: Mapping[str, int]) -> dict[str, int]:
    """status.pools: replicas each pool is driven to, every pool named (0 for unused ones)."""
    return {pool: int(targets.get(pool, 0)) for pool in ("interactive", "mixed", "batch")}


def scale_status(
    current: Mapping[str, int], targets: Mapping[str, int], reason: str, now: str
) -> dict[str, Any]:
    """status.lastScale and status.pools after a scaling decision; from/to are fleet totals (the
    per-pool split is in `pools` and in `reason`)."""
    return {
        "lastScale": {
            "time": now,
            "from": sum(int(n) for n in current.values()),
            "to": sum(int(n) for n in targets.values()),
            "reason": reason,
        },
        "pools": pools_status(targets),
    }
