"""The global control loop of each LLMService, run by a kopf daemon (handlers.py).

Why a daemon and not `@kopf.timer`: a kopf timer has one interval for every object, while
spec.autoscaling.intervalSeconds is per LLMService. A daemon is kopf's per-object timer with its
own loop: it sleeps each LLMService's own interval (re-read from the live body, so an edit applies
at the next tick), holds that service's ControlLoop for the object's lifetime and closes its
sidecar channels when the object goes or the operator stops.

State: the autoscaler (Chiron's stabilization history) lives in memory only and is lost on an
operator restart or a change of the scaling spec. That is safe because Chiron restarts
conservatively: it scales in only after observing a full stabilization window
(`ChironState.since_s`), while scale-out needs no history; the replica counts themselves live in
the cluster (the pool Deployments), so a restart resumes from them, not from a default.

The loop idles until the LLMService is Ready (or deliberately scaled to zero): deciding while the
first pods still load the model would only read empty loads. A `static` policy runs no loop; its
count is reconcile's (spec.replicas.initial) and the Deployment controller replaces failed pods.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from slofleet.operator.control_loop import ControlLoop, LoopEvent, SidecarClient, autoscaler_from_spec
from slofleet.operator.fleet_k8s import KubernetesFleet
from slofleet.operator.kube import LLMSERVICE, ApiError, KubeClient
from slofleet.operator.render import engine_pools, gateway_endpoint, sidecar_token_ref
from slofleet.operator.rescheduler import rescheduler_for
from slofleet.operator.standby import standby_config
from slofleet.operator.status import pools_status, scale_status
from slofleet.operator.tokens import TokenUnavailable, derive_token, read_user_token
from slofleet.policies.global_autoscaler import ScaleDecision
from slofleet.spec import LLMService, SpecError, parse_llmservice

log = logging.getLogger(__name__)

# (event type "Normal"/"Warning", reason, message) about the LLMService.
Emit = Callable[[str, str, str], None]
# After a failure that only a person can fix (token access), look again this much later.
RETRY_SECONDS = 60.0


class Stopped(Protocol):
    """kopf's `stopped` flag of a daemon. (Waiting on it is not used: kopf cancels an async
    daemon's task to stop it, which interrupts the sleep between ticks at once.)"""

    def is_set(self) -> bool: ...


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def may_decide(status: Mapping[str, Any] | None) -> bool:
    """Ready, or scaled to zero on purpose (from zero only the loop can bring it back)."""
    for cond in (status or {}).get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True" or cond.get("reason") == "ScaledToZero"
    return False


def scaling_inputs(service: LLMService) -> tuple[Any, ...]:
    """What the ControlLoop is built from; a change rebuilds it (and restarts the policy state)."""
    spec = service.spec
    return (
        service.uid,
        spec.replicas,
        spec.pools,
        spec.autoscaling,
        spec.sidecar,
        spec.migration,
        spec.memory,
    )


class StatusReporter:
    """The control loop's `on_event`: status.lastScale/pools and a Kubernetes Event per decision."""

    def __init__(self, kube: KubeClient, namespace: str, name: str, emit: Emit) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.emit = emit
        self.pools_written: dict[str, int] | None = None
        self.standby_written: int | None = None

    async def _patch_status(self, status: dict[str, Any]) -> None:
        try:
            await self.kube.patch(
                LLMSERVICE, self.namespace, self.name, {"status": status}, subresource="status"
            )
        except ApiError as exc:
            if exc.status != 404:  # deleted meanwhile: the daemon stops next
                raise

    async def on_event(self, event: LoopEvent) -> None:
        if event.kind == "scale" and event.decision is not None:
            d = event.decision
            status = scale_status(
                {p.value: n for p, n in d.current.items()},
                {p.value: n for p, n in d.targets.items()},
                event.message,
                now_rfc3339(),
            )
            await self._patch_status(status)
            self.pools_written = status["pools"]
            self.emit("Normal", event.reason, event.message)
        elif event.kind == "replace":
            self.emit("Warning", event.reason, event.message)
        else:
            self.emit("Normal", event.reason, event.message)

    async def standby(self, parked: int, previous: int | None) -> None:
        """status.standbyReplicas: engine pods parked in warm standby (in replicas, not serving)."""
        written = self.standby_written if self.standby_written is not None else previous
        if parked != written:
            await self._patch_status({"standbyReplicas": parked})
        self.standby_written = parked

    async def decided(self, decision: ScaleDecision, previous: Mapping[str, Any] | None) -> None:
        """Keep status.pools equal to the targets also when nothing changed (first step, restart)."""
        pools = pools_status({p.value: n for p, n in decision.targets.items()})
        written = self.pools_written if self.pools_written is not None else dict(previous or {})
        if pools != written:
            await self._patch_status({"pools": pools})
        self.pools_written = pools


async def sidecar_token(kube: KubeClient, service: LLMService, token_key: bytes) -> str:
    """The token the sidecars of `service` require (see tokens.py for why it is derived)."""
    if service.spec.sidecar.token_secret_ref is None:
        return derive_token(token_key, str(service.uid))
    name, key = sidecar_token_ref(service)
    return await read_user_token(kube, service.namespace, name, key)


class ServiceLoop:
    """One LLMService's ControlLoop over its KubernetesFleet, rebuilt when its inputs change."""

    def __init__(self, kube: KubeClient, token_key: bytes, emit: Emit) -> None:
        self.kube = kube
        self.token_key = token_key
        self.emit = emit
        self.inputs: tuple[Any, ...] | None = None
        self.loop: ControlLoop | None = None
        self.reporter: StatusReporter | None = None
        self.blocked: str | None = None

    async def _build(self, service: LLMService) -> None:
        await self.close()
        token = await sidecar_token(self.kube, service, self.token_key)
        self.reporter = StatusReporter(self.kube, service.namespace, service.name, self.emit)
        name = f"{service.namespace}/{service.name}"
        self.loop = ControlLoop(
            name,
            KubernetesFleet(self.kube, service.namespace, service.name, engine_pools(service.spec)),
            autoscaler_from_spec(service.spec),
            SidecarClient(token),
            gateway_endpoint(service.name, service.namespace),
            self.reporter.on_event,
            max_total_replicas=service.spec.replicas.max,
            rescheduler=rescheduler_for(name, service.spec, token, self.reporter.on_event),
            standby=standby_config(service.spec),
        )

    async def tick(self, body: Mapping[str, Any]) -> float:
        """One step if the LLMService may be scaled now; returns the seconds until the next tick."""
        try:
            service = parse_llmservice(body)
        except SpecError:
            return RETRY_SECONDS  # reconcile reports it; a fixed spec is picked up at the next tick
        interval = float(service.spec.autoscaling.interval_seconds)
        if service.spec.autoscaling.policy == "static" or not may_decide(body.get("status")):
            return interval
        inputs = scaling_inputs(service)
        if self.loop is None or inputs != self.inputs:
            try:
                await self._build(service)
            except TokenUnavailable as exc:
                if self.blocked != str(exc):
                    self.emit("Warning", "AutoscalingBlocked", str(exc))
                self.blocked = str(exc)
                return RETRY_SECONDS
            self.inputs, self.blocked = inputs, None
        assert self.loop is not None and self.reporter is not None
        decision = await self.loop.step()
        previous = body.get("status") or {}
        await self.reporter.decided(decision, previous.get("pools"))
        await self.reporter.standby(self.loop.standby.parked_total, previous.get("standbyReplicas"))
        return interval

    async def close(self) -> None:
        if self.loop is not None:
            await self.loop.close()
            await self.loop.sidecars.close()
        self.loop = None
        self.inputs = None


async def run_service_loop(
    kube: KubeClient, token_key: bytes, body: Mapping[str, Any], emit: Emit, stopped: Stopped
) -> None:
    """The daemon's body: tick at each LLMService's own interval until kopf stops it. A failing
    step is logged and retried at the next tick; it never ends the loop."""
    service_loop = ServiceLoop(kube, token_key, emit)
    meta = body.get("metadata", {})
    try:
        while not stopped.is_set():
            try:
                delay = await service_loop.tick(body)
            except Exception:  # the loop must outlive any one bad step (API hiccup, sidecar restart)
                log.exception(
                    "service=%s/%s event=control_step_failed", meta.get("namespace"), meta.get("name")
                )
                delay = float(body.get("spec", {}).get("autoscaling", {}).get("intervalSeconds", 5))
            await asyncio.sleep(delay)
    finally:
        await service_loop.close()
