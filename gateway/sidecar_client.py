"""Sidecar mode: each instance's load from its sidecar's WatchLoad stream; requests reported back.

One task per sidecar keeps a WatchLoad stream open and reconnects with backoff; while it is down
the instance is not dispatched to (its load is unknown). The engine URL and served model come
from `Info` and the engine itself. Every request the gateway admits or finishes on the instance
goes to the sidecar over one long-lived ReportRequests stream, re-announced after a reconnect,
because only the gateway knows each request's future KV demand (max_tokens) for freeness.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import grpc

from slofleet.api.convert import load_from_pb, request_to_pb
from slofleet.api.v1 import migration_pb2, migration_pb2_grpc, sidecar_pb2, sidecar_pb2_grpc
from slofleet.gateway.instances import Instance, InstancePool, MigrationResolution, discover_engine
from slofleet.instance import RequestInfo

log = logging.getLogger("slofleet.gateway.sidecar")

_KIND = {
    "admitted": sidecar_pb2.RequestEvent.KIND_ADMITTED,
    "finished": sidecar_pb2.RequestEvent.KIND_FINISHED,
}
Metadata = tuple[tuple[str, str], ...] | None
_HOW = {
    migration_pb2.ResolveMigrationReply.STATE_RESUME_WITH_KV: "kv",
    migration_pb2.ResolveMigrationReply.STATE_RESUME_BY_RECOMPUTE: "recompute",
}
# How long the gateway waits for the source to finish the tail copy before resuming by recompute.
RESOLVE_WAIT_SECONDS = 15.0


def migration_resolver(
    channel: grpc.aio.Channel, metadata: Metadata
) -> Callable[[str], Awaitable[MigrationResolution]]:
    """`Instance.resolve_migration` over the sidecar's Migration service (same channel and token).

    A sidecar that does not answer raises ConnectionError: the relay treats the instance as lost.
    """
    stub = migration_pb2_grpc.MigrationStub(channel)

    async def resolve(engine_request_id: str) -> MigrationResolution:
        try:
            reply = await stub.ResolveMigration(
                migration_pb2.ResolveMigrationRequest(
                    request_id=engine_request_id, wait_seconds=RESOLVE_WAIT_SECONDS
                ),
                metadata=metadata,
                timeout=RESOLVE_WAIT_SECONDS + 5.0,
            )
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(f"ResolveMigration: {exc.code().name}: {exc.details()}") from exc
        params = json.loads(reply.kv_transfer_params_json) if reply.kv_transfer_params_json else None
        return MigrationResolution(_HOW.get(reply.state, "none"), reply.target_instance, params)

    return resolve


def reachable_engine_url(engine_url: str, sidecar_address: str) -> str:
    """The engine as the gateway can reach it. A sidecar knows its engine as loopback (same pod);
    from outside the pod the engine is at the sidecar's host, on the engine's own port."""
    parts = urlsplit(engine_url.rstrip("/"))
    sidecar_host = sidecar_address.rpartition(":")[0].strip("[]")
    if parts.hostname in ("127.0.0.1", "localhost", "::1") and sidecar_host not in (
        "127.0.0.1",
        "localhost",
        "::1",
    ):
        host = f"[{sidecar_host}]" if ":" in sidecar_host else sidecar_host
        return urlunsplit((parts.scheme, f"{host}:{parts.port or 80}", parts.path, "", ""))
    return engine_url.rstrip("/")


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
                url = reachable_engine_url(info.engine_url, address)
                inst = pool.instances.get(info.instance_id)
                if inst is None:
                    inst = Instance(instance_id=info.instance_id, url=url)
                    pool.instances[inst.instance_id] = inst
                inst.url = url
                inst.block_size = info.block_size_tokens or inst.block_size
                inst.kv_total_blocks = int(info.kv_total_blocks)
                await discover_engine(session, inst)
                on_restart(inst.instance_id)
                reporter = Reporter(inst)
                inst.report = reporter.report
                inst.resolve_migration = migration_resolver(channel, metadata)
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
                inst.resolve_migration = None
                pool.changed()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
