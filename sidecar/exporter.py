"""The sidecar's own Prometheus metrics (`slofleet_instance_*`): everything in `Load`, plus its own
health (auth failures, engine scrapes).

Load values are exported by a collector that reads the state's latest snapshot at scrape time,
so the page and `Load` can never disagree and nothing is copied on every engine poll. Names follow
Prometheus conventions: base units (seconds, ratio), `_total` only on counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slofleet.sidecar.state import SidecarState

PREFIX = "slofleet_instance_"


class LoadCollector(Collector):
    def __init__(self, state: SidecarState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        s = state.snapshot
        fr = state.freeness

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        ident = GaugeMetricFamily(
            PREFIX + "info",
            "This sidecar's instance and pool (value is always 1).",
            labels=["instance_id", "pool"],
        )
        ident.add_metric([state.instance_id, str(s.pool)], 1.0)
        yield ident
        yield gauge("healthy", "1 while the engine answers /health and /metrics.", float(s.healthy))
        yield gauge("draining", "1 while the instance takes no new requests (Drain).", float(s.draining))
        yield gauge("running_requests", "Requests in the engine's running batch.", s.running_requests)
        yield gauge("waiting_requests", "Requests queued in the engine.", s.waiting_requests)
        yield gauge("kv_usage_ratio", "Fraction of KV cache blocks in use (0..1).", s.kv_usage_fraction)
        yield gauge("kv_blocks", "KV cache blocks of the engine.", s.kv_total_blocks)
        yield gauge("kv_free_blocks", "KV cache blocks not in use.", s.kv_free_blocks)
        yield gauge("block_size_tokens", "Tokens per KV cache block.", s.block_size_tokens)
        yield gauge(
            "concurrency_limit",
            "Requests in flight the gateway may send here (SetLimits).",
            s.concurrency_limit,
        )
        yield gauge(
            "prompt_tokens_per_second", "Prompt tokens processed per second (sliding window).",
            s.prompt_tokens_per_second,
        )  # fmt: skip
        yield gauge(
            "generation_tokens_per_second", "Tokens generated per second (sliding window).",
            s.generation_tokens_per_second,
        )  # fmt: skip
        yield CounterMetricFamily(
            PREFIX + "preemptions",
            "Requests the engine preempted since it started.",
            value=s.preemptions_total,
        )
        yield gauge("ttft_p50_seconds", "Median time to first token (sliding window).", s.ttft_p50_seconds)
        yield gauge(
            "ttft_p99_seconds", "99th percentile time to first token (sliding window).", s.ttft_p99_seconds
        )
        yield gauge("itl_p50_seconds", "Median inter-token latency (sliding window).", s.itl_p50_seconds)
        yield gauge(
            "itl_p99_seconds", "99th percentile inter-token latency (sliding window).", s.itl_p99_seconds
        )
        yield gauge(
            "freeness_blocks",
            "Llumnix freeness: free KV blocks per running request after queued and priority demand "
            "(-Inf when draining or unhealthy).",
            s.freeness,
        )
        if fr is not None:
            yield gauge(
                "virtual_usage_blocks", "Llumnix virtual usage: used + head-of-line + priority headroom.",
                fr.virtual_usage_blocks,
            )  # fmt: skip
        yield gauge("layers_resident", "Model layers whose weights are in memory.", s.layers_resident)
        yield gauge("layers", "Model layers in total.", s.layers_total)
        yield gauge("tracked_requests", "Requests the gateway reported in flight here.", len(s.requests))
        info = state.info
        if info is not None:
            family = GaugeMetricFamily(
                PREFIX + "engine_info", "The engine beside this sidecar (value is always 1).",
                labels=["model", "engine_version", "kv_dtype", "kv_layout"],
            )  # fmt: skip
            family.add_metric([info.model, info.engine_version, info.kv.dtype, info.kv.layout], 1.0)
            yield family
            yield gauge(
                "kv_block_bytes", "Bytes of one KV block across all layers, K and V.", info.kv.bytes_per_block
            )


class SidecarMetrics:
    """The registry the sidecar serves, with its own counters next to the Load collector."""

    def __init__(self, state: SidecarState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LoadCollector(state))
        self.auth_failures = Counter(
            PREFIX + "grpc_auth_failures",
            "gRPC calls refused for a missing or invalid bearer token.",
            ["reason"],
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            PREFIX + "engine_scrape_errors", "Failed reads of the engine's /metrics.", registry=self.registry
        )
        self.scrape_duration = Histogram(
            PREFIX + "engine_scrape_duration_seconds",
            "Time to fetch and parse the engine's /metrics.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        for reason in ("missing", "invalid"):
            self.auth_failures.labels(reason)
