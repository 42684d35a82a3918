"""Prometheus metrics of the gateway (`slofleet_gateway_*`, base units, one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slofleet_gateway_requests",
            "Requests finished by the gateway, by class and outcome "
            "(success, client_error, rejected, failed, cancelled).",
            ["request_class", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "slofleet_gateway_rejected",
            "Requests answered 429 because the interactive queue was full.",
            ["request_class"],
            registry=r,
        )
        self.ttft = Histogram(
            "slofleet_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first token relayed, by class.",
            ["request_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "slofleet_gateway_inter_token_latency_seconds",
            "Time between relayed token chunks, by class.",
            ["request_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "slofleet_gateway_queue_depth",
            "Requests waiting: interactive (in memory, for a slot) and batch (durable, not yet sent).",
            ["queue"],
            registry=r,
        )
        self.batch_slack = Gauge(
            "slofleet_gateway_batch_deadline_slack_seconds",
            "Earliest deadline among pending batch requests minus now (negative: late).",
            registry=r,
        )
        self.dispatch = Counter(
            "slofleet_gateway_dispatch_decisions",
            "Dispatch decisions by policy and result (dispatched, burst: over the local limit, no_capacity).",
            ["policy", "result"],
            registry=r,
        )
        self.resumes = Counter(
            "slofleet_gateway_resumes",
            "Requests moved to another instance mid-flight, by reason "
            "(instance_lost, migration_recompute, move).",
            ["reason"],
            registry=r,
        )
        # Every reason exists from the start at 0: a healthy fleet may never resume a request, and
        # a series that appears only at the first failure leaves dashboards and rate() alerts
        # blank until then instead of showing 0.
        for reason in ("instance_lost", "migration_recompute", "move"):
            self.resumes.labels(reason)
        self.in_flight = Gauge(
            "slofleet_gateway_requests_in_flight",
            "Requests the gateway is relaying now, by class.",
            ["request_class"],
            registry=r,
        )
        self.instances_ready = Gauge(
            "slofleet_gateway_instances_ready", "Instances that can take requests.", registry=r
        )
