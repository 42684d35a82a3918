"""Sidecar mode: each instance's load from its sidecar's WatchLoad stream; requests reported back.

One task per sidecar keeps a WatchLoad stream open and reconnects with backoff; while it is down
the instance is not dispatched to (its load is unknown). The engine URL and served model come
from `Info` and the engine itself. Every request the gateway admits or finishes on the instance
goes to the sidecar over one long-lived ReportRequests stream, re-announced after a reconnect,
because only the gateway knows each request's future KV demand (max_tokens) for freeness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc

from slofleet.api.v1 import sidecar_pb2, sidecar_pb2_grpc
from slofleet.gateway.instances import Instance, InstancePool, discover_engine
from slofleet.instance import InstanceLoad, Pool, RequestClass, RequestInfo

log = logging.getLogger("slofleet.gateway.sidecar")

_CLASS_TO_PB = {
    RequestClass.INTERACTIVE: sidecar_pb2.REQUEST_CLASS_INTERACTIVE,
    RequestClass.BATCH: sidecar_pb2.REQUEST_CLASS_BATCH,
}
_POOL_FROM_PB = {sidecar_pb2.POOL_INTERACTIVE: Pool.INTERACTIVE, sidecar_pb2.POOL_BATCH: Pool.BATCH}
_KIND = {
    "admitted": sidecar_pb2.RequestEvent.KIND_ADMITTED,
    "finished": sidecar_pb2.RequestEvent.KIND_FINISHED,
}
Metadata = tuple[tuple[str, str], ...] | None


def request_from_pb(r: sidecar_pb2.RequestInfo) -> RequestInfo:
    cls = (
        RequestClass.BATCH if r.request_class == sidecar_pb2.REQUEST_CLASS_BATCH else RequestClass.INTERACTIVE
    )
    return RequestInfo(r.request_id, cls, r.priority, r.prompt_tokens, r.max_tokens, r.generated_tokens)


def request_to_pb(r: RequestInfo) -> sidecar_pb2.RequestInfo:
    return sidecar_pb2.RequestInfo(
        request_id=r.request_id,
        request_class=_CLASS_TO_PB[r.request_class],
        priority=r.priority,
        prompt_tokens=r.prompt_tokens,
        max_tokens=r.max_tokens,
        generated_tokens=r.generated_tokens,
    )


def load_from_pb(m: sidecar_pb2.InstanceLoad) -> InstanceLoad:
    return InstanceLoad(
        instance_id=m.instance_id,
        running_requests=m.running_requests,
        waiting_requests=m.waiting_requests,
        kv_usage_fraction=m.kv_usage_fraction,
        kv_total_blocks=m.kv_total_blocks,
        kv_free_blocks=m.kv_free_blocks,
        block_size_tokens=m.block_size_tokens,
        concurrency_limit=m.concurrency_limit,
        draining=m.draining,
        healthy=m.healthy,
        pool=_POOL_FROM_PB.get(m.pool, Pool.MIXED),
        prompt_tokens_per_second=m.prompt_tokens_per_second,
        generation_tokens_per_second=m.generation_tokens_per_second,
        preemptions_total=m.preemptions_total,
        ttft_p50_seconds=m.ttft_p50_seconds,
        ttft_p99_seconds=m.ttft_p99_seconds,
        itl_p50_seconds=m.itl_p50_seconds,
        itl_p99_seconds=m.itl_p99_seconds,
        freeness=m.freeness,
        layers_resident=m.layers_resident,
        layers_total=m.layers_total,
        requests=tuple(request_from_pb(r) for r in m.requests),
    )


class Reporter:
    """Feeds ReportRequests; events queue up while the stream reconnects."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.queue: asyncio.Queue[tuple[str, RequestInfo]] = asyncio.Queue()

    def report(self, kind: str, info: RequestInfo) -> None:
        self.queue.put_nowait((kind, info))

    async def _events(self) -> AsyncIterator[sidecar_pb2.RequestEvent]:
        for info in list(self.inst.tracked.values()):
            yield sidecar_pb2.RequestEvent(kind=_KIND["admitted"], request=request_to_pb(info))
        while True:
            kind, info = await self.queue.get()
            yield sidecar_pb2.RequestEvent(kind=_KIND[kind], request=request_to_pb(info))

    async def run(self, stub: sidecar_pb2_grpc.SidecarStub, metadata: Metadata) -> None:
        while True:
            try:
                await stub.ReportRequests(self._events(), metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                log.warning("instance=%s event=report_stream_lost code=%s", self.inst.instance_id, exc.code())
            await asyncio.sleep(1.0)


async def watch_sidecar(
    address: str,
    token: str | None,
    pool: InstancePool,
    session: aiohttp.ClientSession,
    on_restart: Callable[[str], None],
    interval_ms: int = 200,
) -> None:
    metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else None
    backoff = 0.5
    while True:
        inst: Instance | None = None
        reporter_task: asyncio.Task[None] | None = None
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = sidecar_pb2_grpc.SidecarStub(channel)
                info = await stub.Info(sidecar_pb2.InfoRequest(), metadata=metadata, timeout=5)
                inst = pool.instances.get(info.instance_id)
                if inst is None:
                    inst = Instance(instance_id=info.instance_id, url=info.engine_url.rstrip("/"))
                    pool.instances[inst.instance_id] = inst
                inst.url = info.engine_url.rstrip("/")
                inst.block_size = info.block_size_tokens or inst.block_size
                inst.kv_total_blocks = int(info.kv_total_blocks)
                await discover_engine(session, inst)
                on_restart(inst.instance_id)
                reporter = Reporter(inst)
                inst.report = reporter.report
                reporter_task = asyncio.create_task(reporter.run(stub, metadata))
                log.info("instance=%s event=sidecar_connected address=%s", inst.instance_id, address)
                request = sidecar_pb2.WatchLoadRequest(interval_milliseconds=interval_ms)
                async for msg in stub.WatchLoad(request, metadata=metadata):
                    load = load_from_pb(msg)
                    inst.snapshot = load
                    inst.healthy = load.healthy
                    inst.draining = load.draining
                    inst.concurrency_limit = load.concurrency_limit
                    inst.pool = load.pool
                    backoff = 0.5
                    pool.changed()
        except (grpc.aio.AioRpcError, aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            log.warning("sidecar=%s event=watch_lost error=%s", address, exc)
        finally:
            if reporter_task is not None:
                reporter_task.cancel()
            if inst is not None:
                inst.healthy = False
                inst.snapshot = None
                inst.report = None
                pool.changed()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
