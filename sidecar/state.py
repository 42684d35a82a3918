"""The sidecar's picture of its instance: latest engine sample, windowed stats, the requests the
gateway reported, the limit and drain flag; and the `InstanceLoad` snapshot built from them.

Everything here is synchronous and runs on the sidecar's one event loop, so no locks: the poller
writes, the gRPC handlers and the metrics exporter read the latest immutable snapshot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from slofleet.instance import InstanceLoad, Pool, RequestInfo
from slofleet.policies.freeness import DRAINING_FREENESS, Freeness, compute_freeness
from slofleet.sidecar.enginemetrics import EngineSample
from slofleet.sidecar.window import SampleWindow

# The most requests the sidecar tracks from gateway reports; beyond it the oldest are dropped (a
# gateway that never reports FINISHED must not grow the sidecar without bound).
MAX_TRACKED_REQUESTS = 100_000


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The engine's KV cache as its workers report it (`slofleet_kv_layout` worker method)."""

    num_blocks: int
    block_size_tokens: int
    bytes_per_block: int
    dtype: str
    layout: str
    num_layers: int
    num_kv_heads: int
    head_size: int


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What `Info` returns; fetched from the engine once it is healthy, again after a restart."""

    model: str
    engine_version: str
    max_model_len_tokens: int
    kv: KVLayout


class SidecarState:
    def __init__(
        self,
        instance_id: str,
        *,
        concurrency_limit: int,
        pool: Pool = Pool.MIXED,
        window: SampleWindow | None = None,
        request_ttl_seconds: float = 3600.0,
        high_priority_below: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self.pool = pool
        self.concurrency_limit = concurrency_limit
        self.draining = False
        self.healthy = False
        # Set by the memory service after each drop/restore; None: every layer is resident.
        self.layers_resident: int | None = None
        self.info: EngineInfo | None = None
        self.window = window or SampleWindow()
        self.request_ttl_seconds = request_ttl_seconds
        self.high_priority_below = high_priority_below
        self.sample: EngineSample | None = None
        self.sample_monotonic = 0.0
        self.sample_unix_nanos = 0
        self.samples_total = 0
        # request id -> (info, last update monotonic); insertion order = arrival order.
        self._requests: OrderedDict[str, tuple[RequestInfo, float]] = OrderedDict()
        self.freeness: Freeness | None = None
        self.snapshot: InstanceLoad = self._build(time.monotonic())
        self.snapshot_unix_nanos = time.time_ns()
        # Bumped when a snapshot differs in what consumers act on; WatchLoad waits on it.
        self.version = 0
        self._changed = asyncio.Event()

    # -- writers -------------------------------------------------------------------------------

    def observe(
        self, sample: EngineSample, now: float | None = None, read_unix_nanos: int | None = None
    ) -> None:
        """A new engine sample; `read_unix_nanos` is when its scrape was sent (the data's age)."""
        now = time.monotonic() if now is None else now
        self.sample = sample
        self.sample_monotonic = now
        self.sample_unix_nanos = time.time_ns() if read_unix_nanos is None else read_unix_nanos
        self.samples_total += 1
        self.healthy = True
        self.window.add(now, sample)
        self._publish(now)

    def engine_down(self, now: float | None = None) -> None:
        """The engine stopped answering: unhealthy, and its counts are unknown (not zero)."""
        now = time.monotonic() if now is None else now
        self.healthy = False
        self.info = None
        self._publish(now)

    def set_limit(self, limit: int) -> None:
        self.concurrency_limit = limit
        self._publish(time.monotonic())

    def set_layers_resident(self, resident: int) -> None:
        self.layers_resident = resident
        self._publish(time.monotonic())

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self._publish(time.monotonic())

    def request_admitted(self, req: RequestInfo, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._requests[req.request_id] = (req, now)
        self._requests.move_to_end(req.request_id)
        while len(self._requests) > MAX_TRACKED_REQUESTS:
            self._requests.popitem(last=False)

    def request_progress(self, req: RequestInfo, now: float | None = None) -> None:
        """Update a tracked request in place (keeps its arrival position); unknown ids are
        admitted, because the gateway may have restarted its stream after ADMITTED."""
        now = time.monotonic() if now is None else now
        if req.request_id in self._requests:
            self._requests[req.request_id] = (req, now)
        else:
            self.request_admitted(req, now)

    def request_finished(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def requests_reported(self) -> None:
        """Call after a batch of request events: recompute once, not per event."""
        self._publish(time.monotonic())

    # -- readers -------------------------------------------------------------------------------

    @property
    def tracked_requests(self) -> tuple[RequestInfo, ...]:
        return tuple(r for r, _ in self._requests.values())

    @property
    def in_flight(self) -> int:
        """Requests in the engine, or reported by the gateway and not yet finished (the larger)."""
        s = self.snapshot
        return max(s.running_requests + s.waiting_requests, len(self._requests))

    async def wait_changed(self) -> None:
        """Return at the next published change (callers bound it with `asyncio.timeout`)."""
        await self._changed.wait()

    # -- internals -----------------------------------------------------------------------------

    def _expire_requests(self, now: float) -> None:
        horizon = now - self.request_ttl_seconds
        while self._requests:
            _, (_, updated) = next(iter(self._requests.items()))
            if updated >= horizon:
                break
            self._requests.popitem(last=False)

    def _build(self, now: float) -> InstanceLoad:
        self._expire_requests(now)
        s = self.sample if self.healthy else None
        requests = self.tracked_requests
        layers = self.info.kv.num_layers if self.info else 0
        resident = layers if self.layers_resident is None else self.layers_resident
        if s is None:
            # An engine we cannot see takes no requests: the same "fake infinite" usage as draining.
            self.freeness = Freeness(DRAINING_FREENESS, math.inf, 0, 0, 0)
            return InstanceLoad(
                instance_id=self.instance_id, running_requests=0, waiting_requests=0,
                kv_usage_fraction=0.0, kv_total_blocks=0, kv_free_blocks=0, block_size_tokens=0,
                concurrency_limit=self.concurrency_limit, draining=self.draining, healthy=False,
                pool=self.pool, freeness=self.freeness.freeness, requests=requests,
            )  # fmt: skip
        used = round(s.num_gpu_blocks * s.kv_usage_fraction)
        self.freeness = compute_freeness(
            total_blocks=s.num_gpu_blocks,
            used_blocks=used,
            running_requests=s.running_requests,
            block_size_tokens=s.block_size_tokens,
            requests=requests,
            draining=self.draining,
            high_priority_below=self.high_priority_below,
        )
        stats = self.window.stats()
        return InstanceLoad(
            instance_id=self.instance_id,
            running_requests=s.running_requests,
            waiting_requests=s.waiting_requests,
            kv_usage_fraction=s.kv_usage_fraction,
            kv_total_blocks=s.num_gpu_blocks,
            kv_free_blocks=s.num_gpu_blocks - used,
            block_size_tokens=s.block_size_tokens,
            concurrency_limit=self.concurrency_limit,
            draining=self.draining,
            healthy=True,
            pool=self.pool,
            prompt_tokens_per_second=stats.prompt_tokens_per_second,
            generation_tokens_per_second=stats.generation_tokens_per_second,
            preemptions_total=int(s.preemptions_total),
            ttft_p50_seconds=stats.ttft_p50_seconds,
            ttft_p99_seconds=stats.ttft_p99_seconds,
            itl_p50_seconds=stats.itl_p50_seconds,
            itl_p99_seconds=stats.itl_p99_seconds,
            freeness=self.freeness.freeness,
            layers_resident=resident,
            layers_total=layers,
            requests=requests,
        )

    @staticmethod
    def _change_key(s: InstanceLoad) -> tuple:
        """What consumers act on; throughput and latency drift every sample and are not in it."""
        return (
            s.healthy, s.draining, s.running_requests, s.waiting_requests, s.kv_free_blocks,
            s.kv_total_blocks, s.concurrency_limit, s.preemptions_total, s.layers_resident,
            tuple(r.request_id for r in s.requests),
        )  # fmt: skip

    def _publish(self, now: float) -> None:
        new = self._build(now)
        changed = self._change_key(new) != self._change_key(self.snapshot)
        self.snapshot = new
        # A snapshot is as old as the engine sample it describes (when that scrape was sent); a
        # snapshot without one (engine down) is as of now.
        self.snapshot_unix_nanos = self.sample_unix_nanos if new.healthy else time.time_ns()
        if changed:
            self.version += 1
            self._changed.set()
            self._changed = asyncio.Event()
