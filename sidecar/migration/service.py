"""The sidecar's `slofleet.v1.Migration` gRPC service: both ends of a live request migration.

Source (`MigrateOut`, called by the operator or the local control loop), Llumnix's multi-stage
protocol: the destination accepts (layout and room checked) and pre-allocates a segment; stage k
exports the blocks the request completed since stage k-1 while it keeps decoding and pushes them;
once a stage moved at most `cutover_blocks` new blocks (or after `max_stages`) the source stops the
request (its blocks held by the connector), pushes the last blocks and commits. The gateway, whose
stream from the source just ended, asks `ResolveMigration` where to resume: on the destination
with `kv_transfer_params` naming the segment, so the engine there computes only the last token
(the tail copy includes the partial last block). `max_stages=0` is blocking stop-and-copy (the
benchmark's baseline).

Every exit is an outcome: before the stop, a failure leaves the request running on the source
(REJECTED, SOURCE_FINISHED, SOURCE_LOST, PEER_FAILED); after it, the gateway resumes by recompute
(RECOMPUTE). Transfers stream `chunk_bytes` at a time, and inbound segments are bounded by
`max_inbound_bytes`, so memory stays bounded however long the request is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from slofleet.api.v1 import migration_pb2 as pb
from slofleet.api.v1 import migration_pb2_grpc as pb_grpc
from slofleet.sidecar.migration import segment as seg
from slofleet.sidecar.migration.engine_link import EngineLinkError, KVControl

log = logging.getLogger("slofleet.sidecar.migration")

Outcome = pb.MigrationOutcome
PARAMS_KEY = "slofleet_migration"
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class MigrationMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.outcomes = Counter(
            "slofleet_migrations",
            "Request migrations by outcome (source side)",
            ["outcome"],
            registry=registry,
        )
        self.stop_seconds = Histogram(
            "slofleet_migration_stop_seconds",
            "Source stop to destination commit: the copy the request waits for (source side)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.duration = Histogram(
            "slofleet_migration_duration_seconds",
            "Whole migration, accept to commit (source side)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.stages = Histogram(
            "slofleet_migration_stages",
            "Pre-copy stages before the stop",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=registry,
        )
        self.bytes = Counter(
            "slofleet_migration_bytes", "KV bytes moved by migrations", ["direction"], registry=registry
        )


@dataclass
class _Resolution:
    """What the gateway needs to resume a stopped request; set once the cut-over is decided."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    state: int = pb.ResolveMigrationReply.STATE_NONE
    target_instance: str = ""
    kv_transfer_params_json: str = ""
    migration_id: str = ""


@dataclass
class _Inbound:
    path: Path
    layout: seg.KVLayout
    max_blocks: int
    bytes_reserved: int
    received_blocks: int = 0
    created: float = field(default_factory=time.monotonic)
    committed: bool = False


class _Aborted(Exception):
    def __init__(self, outcome: int, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class MigrationService(pb_grpc.MigrationServicer):
    def __init__(
        self,
        control: KVControl,
        *,
        shm_dir: str | Path = "/dev/shm",
        metrics: MigrationMetrics | None = None,
        chunk_bytes: int = 4 << 20,
        max_inbound_bytes: int = 2 << 30,
        inbound_ttl_seconds: float = 300.0,
        channel_credentials: grpc.ChannelCredentials | None = None,
        peer_token: str | None = None,
    ) -> None:
        self.control = control
        self.shm_dir = Path(shm_dir)
        self.metrics = metrics or MigrationMetrics()
        self.chunk_bytes = chunk_bytes
        self.max_inbound_bytes = max_inbound_bytes
        self.inbound_ttl_seconds = inbound_ttl_seconds
        self._credentials = channel_credentials
        # Peers are sidecars of the same service, whose gRPC port wants the service's bearer token.
        self._metadata = (("authorization", f"Bearer {peer_token}"),) if peer_token else None
        self._inbound: dict[str, _Inbound] = {}
        self._resolutions: dict[str, _Resolution] = {}
        self._layout: seg.KVLayout | None = None

    async def _own_layout(self) -> seg.KVLayout:
        if self._layout is None:
            self._layout = await self.control.layout()
        return self._layout

    def _channel(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=GRPC_OPTIONS)
        return grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)

    # ------------------------------------------------------------------ source side

    async def MigrateOut(
        self, request: pb.MigrateOutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigrationProgress]:
        if not request.request_id or not request.target_sidecar:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "MigrateOutRequest: request_id and target_sidecar (host:port) are required",
            )
        if request.max_stages < 0 or request.cutover_blocks < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "max_stages and cutover_blocks must be >= 0"
            )
        async for progress in self.migrate_out(request):
            yield progress

    async def migrate_out(self, req: pb.MigrateOutRequest) -> AsyncIterator[pb.MigrationProgress]:
        """The protocol itself (the gRPC method validates and forwards): yields one message a stage."""
        mid = uuid.uuid4().hex[:16]
        started = time.monotonic()
        timeout = req.timeout_seconds or 60.0
        cutover = req.cutover_blocks or 2
        path = self.shm_dir / f"slofleet-kv-out-{mid}"
        stage, sent, nbytes, stop_seconds = 0, 0, 0, 0.0
        tokens: list[int] = []
        stopped = False
        resolution: _Resolution | None = None
        outcome, message = Outcome.MIGRATION_OUTCOME_MIGRATED, ""
        channel = self._channel(req.target_sidecar)
        peer = pb_grpc.MigrationStub(channel)
        log.info("migration %s: request %s to %s starts", mid, req.request_id, req.target_sidecar)
        try:
            async with asyncio.timeout(timeout):
                layout = await self._own_layout()
                try:
                    info = await self.control.call("info", request_id=req.request_id)
                except EngineLinkError as e:
                    raise _Aborted(Outcome.MIGRATION_OUTCOME_SOURCE_LOST, str(e)) from e
                max_blocks = math.ceil((info["num_prompt_tokens"] + info["max_tokens"]) / layout.block_size)
                seg.create(path, layout, max_blocks)
                try:
                    reply = await peer.AcceptMigration(
                        pb.AcceptMigrationRequest(
                            migration_id=mid,
                            request_id=req.request_id,
                            layout_json=json.dumps(layout.to_json()),
                            max_blocks=max_blocks,
                            current_blocks=math.ceil(info["num_tokens"] / layout.block_size),
                        ),
                        timeout=10,
                        metadata=self._metadata,
                    )
                except grpc.aio.AioRpcError as e:
                    raise _Aborted(
                        Outcome.MIGRATION_OUTCOME_PEER_FAILED, f"AcceptMigration: {e.details()}"
                    ) from e
                if not reply.accepted:
                    raise _Aborted(Outcome.MIGRATION_OUTCOME_REJECTED, reply.reason)
                yield pb.MigrationProgress(migration_id=mid, stage=0)
                while stage < req.max_stages:
                    stage += 1
                    try:
                        r = await self.control.call(
                            "export", request_id=req.request_id, segment=str(path), first_block=sent
                        )
                    except EngineLinkError as e:
                        kind = (
                            Outcome.MIGRATION_OUTCOME_SOURCE_FINISHED
                            if e.state == "finished"
                            else Outcome.MIGRATION_OUTCOME_SOURCE_LOST
                        )
                        raise _Aborted(kind, str(e)) from e
                    new = int(r["blocks"]) - sent
                    nbytes += await self._push(peer, mid, path, layout, sent, new)
                    tokens += r["token_ids"]
                    sent += new
                    yield pb.MigrationProgress(
                        migration_id=mid, stage=stage, blocks_copied=sent, bytes_copied=nbytes
                    )
                    if new <= cutover:
                        break
                # The stop: from here on the request is no longer on the source.
                try:
                    armed = await self.control.call(
                        "arm", request_id=req.request_id, segment=str(path), first_block=sent
                    )
                except EngineLinkError as e:
                    raise _Aborted(Outcome.MIGRATION_OUTCOME_SOURCE_FINISHED, str(e)) from e
                resolution = self._resolutions.setdefault(req.request_id, _Resolution())
                resolution.done.clear()
                resolution.migration_id = mid
                stop_at = time.monotonic()
                stopped = True
                await self.control.abort(armed["abort_id"])
                final = await self.control.call("final", request_id=req.request_id, seconds=10.0)
                if final["state"] != "finished_aborted":
                    # It ended by itself (length/stop) before the abort landed: the client has it all.
                    resolution.state = pb.ResolveMigrationReply.STATE_NONE
                    raise _Aborted(Outcome.MIGRATION_OUTCOME_SOURCE_FINISHED, f"request {final['state']}")
                new = int(final["blocks"]) - sent
                try:
                    nbytes += await self._push(peer, mid, path, layout, sent, new)
                    sent += new
                    tokens += final["token_ids"]
                    commit = await peer.CommitMigration(
                        pb.CommitMigrationRequest(migration_id=mid, valid_blocks=sent, token_ids=tokens),
                        timeout=10,
                        metadata=self._metadata,
                    )
                except grpc.aio.AioRpcError as e:
                    raise _Aborted(Outcome.MIGRATION_OUTCOME_RECOMPUTE, f"tail copy: {e.details()}") from e
                stop_seconds = time.monotonic() - stop_at
                resolution.state = pb.ResolveMigrationReply.STATE_RESUME_WITH_KV
                resolution.target_instance = req.target_instance
                resolution.kv_transfer_params_json = commit.kv_transfer_params_json
                resolution.done.set()
        except (_Aborted, TimeoutError, EngineLinkError, grpc.aio.AioRpcError) as e:
            if isinstance(e, _Aborted):
                outcome, message = e.outcome, str(e)
            else:
                outcome = (
                    Outcome.MIGRATION_OUTCOME_RECOMPUTE if stopped else Outcome.MIGRATION_OUTCOME_PEER_FAILED
                )
                message = f"{type(e).__name__}: {e}"
            if stopped and outcome != Outcome.MIGRATION_OUTCOME_SOURCE_FINISHED:
                outcome = Outcome.MIGRATION_OUTCOME_RECOMPUTE
            if not stopped:
                with contextlib.suppress(EngineLinkError):
                    await self.control.call("disarm", request_id=req.request_id, seconds=5.0)
            if resolution is not None:
                if outcome == Outcome.MIGRATION_OUTCOME_RECOMPUTE:
                    # The destination may be what failed: the gateway picks where to recompute.
                    resolution.state = pb.ResolveMigrationReply.STATE_RESUME_BY_RECOMPUTE
                    resolution.target_instance = ""
                resolution.done.set()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await peer.AbortMigration(
                    pb.AbortMigrationRequest(migration_id=mid), timeout=5, metadata=self._metadata
                )
            log.warning("migration %s of %s: %s: %s", mid, req.request_id, Outcome.Name(outcome), message)
        finally:
            seg.remove(path)
            await channel.close()
        total = time.monotonic() - started
        name = Outcome.Name(outcome).removeprefix("MIGRATION_OUTCOME_").lower()
        self.metrics.outcomes.labels(name).inc()
        self.metrics.bytes.labels("out").inc(nbytes)
        self.metrics.stages.observe(stage)
        if outcome == Outcome.MIGRATION_OUTCOME_MIGRATED:
            self.metrics.stop_seconds.observe(stop_seconds)
            self.metrics.duration.observe(total)
            log.info(
                "migration %s: request %s moved, %d blocks in %d stages, stop %.3f s, total %.3f s",
                mid,
                req.request_id,
                sent,
                stage,
                stop_seconds,
                total,
            )
        yield pb.MigrationProgress(
            migration_id=mid,
            stage=-1,
            blocks_copied=sent,
            bytes_copied=nbytes,
            done=True,
            outcome=outcome,
            message=message,
            stop_seconds=stop_seconds,
            total_seconds=total,
        )

    async def _push(
        self, peer: pb_grpc.MigrationStub, mid: str, path: Path, layout: seg.KVLayout, first: int, count: int
    ) -> int:
        """Stream blocks [first, first+count) to the peer, a bounded chunk at a time."""
        if count <= 0:
            return 0
        per_chunk = max(1, self.chunk_bytes // layout.block_bytes)

        async def chunks() -> AsyncIterator[pb.KVChunk]:
            for start in range(first, first + count, per_chunk):
                n = min(per_chunk, first + count - start)
                data = await asyncio.to_thread(seg.read_blocks, path, layout, start, n)
                yield pb.KVChunk(migration_id=mid, first_block=start, num_blocks=n, data=data)

        await peer.PushKV(chunks(), timeout=60, metadata=self._metadata)
        return count * layout.block_bytes

    async def ResolveMigration(
        self, request: pb.ResolveMigrationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveMigrationReply:
        res = self._resolutions.get(request.request_id)
        if res is None:
            return pb.ResolveMigrationReply(state=pb.ResolveMigrationReply.STATE_NONE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(res.done.wait(), request.wait_seconds or 10.0)
        if not res.done.is_set():
            # The copy did not finish in time: the gateway must not wait longer, recompute is safe.
            return pb.ResolveMigrationReply(
                state=pb.ResolveMigrationReply.STATE_RESUME_BY_RECOMPUTE, migration_id=res.migration_id
            )
        self._resolutions.pop(request.request_id, None)
        return pb.ResolveMigrationReply(
            state=res.state,
            target_instance=res.target_instance,
            kv_transfer_params_json=res.kv_transfer_params_json,
            migration_id=res.migration_id,
        )

    # ------------------------------------------------------------------ destination side

    def _reap(self) -> None:
        """Forget inbound segments that are gone or expired, so that they stop counting against
        `max_inbound_bytes`: a committed one belongs to the engine, whose connector removes it
        when the resumed request ends; one never resumed expires after the TTL."""
        now = time.monotonic()
        for mid, inbound in list(self._inbound.items()):
            if inbound.committed and not inbound.path.exists():
                del self._inbound[mid]
            elif now - inbound.created > self.inbound_ttl_seconds:
                seg.remove(inbound.path)
                del self._inbound[mid]

    async def AcceptMigration(
        self, request: pb.AcceptMigrationRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcceptMigrationReply:
        self._reap()
        try:
            theirs = seg.KVLayout.from_json(json.loads(request.layout_json))
        except (ValueError, KeyError) as e:
            return pb.AcceptMigrationReply(accepted=False, reason=f"layout_json: {e}")
        try:
            mine = await self._own_layout()
        except EngineLinkError as e:
            return pb.AcceptMigrationReply(accepted=False, reason=f"destination engine: {e}")
        problem = mine.mismatch(theirs)
        if problem:
            return pb.AcceptMigrationReply(accepted=False, reason=problem)
        if request.max_blocks <= 0 or not request.migration_id:
            return pb.AcceptMigrationReply(
                accepted=False, reason="migration_id and max_blocks > 0 are required"
            )
        try:
            cap = await self.control.call("capacity", seconds=10.0)
        except EngineLinkError as e:
            return pb.AcceptMigrationReply(accepted=False, reason=f"destination engine: {e}")
        if cap["free_blocks"] < request.current_blocks + 1:
            return pb.AcceptMigrationReply(
                accepted=False,
                reason=f"destination out of KV blocks: {cap['free_blocks']} free, "
                f"{request.current_blocks + 1} needed",
            )
        need = request.max_blocks * mine.block_bytes
        in_use = sum(i.bytes_reserved for i in self._inbound.values())
        if in_use + need > self.max_inbound_bytes:
            return pb.AcceptMigrationReply(
                accepted=False,
                reason=f"destination full: {in_use + need} inbound KV bytes would exceed "
                f"{self.max_inbound_bytes}",
            )
        path = self.shm_dir / f"slofleet-kv-in-{request.migration_id}"
        seg.create(path, mine, request.max_blocks)
        self._inbound[request.migration_id] = _Inbound(path, mine, request.max_blocks, need)
        return pb.AcceptMigrationReply(accepted=True)

    async def PushKV(
        self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext
    ) -> pb.PushKVReply:
        received = 0
        inbound: _Inbound | None = None
        async for chunk in request_iterator:
            inbound = self._inbound.get(chunk.migration_id)
            if inbound is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"migration_id {chunk.migration_id!r} was not accepted here"
                )
            assert inbound is not None
            if len(chunk.data) != chunk.num_blocks * inbound.layout.block_bytes:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"KVChunk.data: {len(chunk.data)} bytes for {chunk.num_blocks} blocks of "
                    f"{inbound.layout.block_bytes}",
                )
            if chunk.first_block < 0 or chunk.first_block + chunk.num_blocks > inbound.max_blocks:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"KVChunk.first_block {chunk.first_block}: beyond {inbound.max_blocks}",
                )
            await asyncio.to_thread(
                seg.write_blocks, inbound.path, inbound.layout, chunk.first_block, chunk.data
            )
            inbound.received_blocks = max(inbound.received_blocks, chunk.first_block + chunk.num_blocks)
            received += len(chunk.data)
        self.metrics.bytes.labels("in").inc(received)
        return pb.PushKVReply(
            blocks_received=inbound.received_blocks if inbound else 0, bytes_received=received
        )

    async def CommitMigration(
        self, request: pb.CommitMigrationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitMigrationReply:
        inbound = self._inbound.get(request.migration_id)
        if inbound is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"migration_id {request.migration_id!r} unknown")
        assert inbound is not None
        if request.valid_blocks > inbound.received_blocks:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"valid_blocks {request.valid_blocks} > blocks received {inbound.received_blocks}",
            )
        # The last block may be partial: the source's final copy ends at its last computed token.
        block, n = inbound.layout.block_size, len(request.token_ids)
        lowest = max(0, (request.valid_blocks - 1) * block + 1) if request.valid_blocks else 0
        if not lowest <= n <= request.valid_blocks * block:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids: {n} for {request.valid_blocks} blocks of {block} tokens "
                f"(expected {lowest} to {request.valid_blocks * block})",
            )
        header = seg.read_header(inbound.path)
        header.update(valid_blocks=request.valid_blocks, token_ids=list(request.token_ids))
        await asyncio.to_thread(seg.write_header, inbound.path, header)
        inbound.committed = True
        # From here the engine owns the segment: its connector removes it when the resumed request
        # ends; the TTL reaps it if the gateway never resumes.
        return pb.CommitMigrationReply(
            kv_transfer_params_json=json.dumps(
                {PARAMS_KEY: {"segment": str(inbound.path), "id": request.migration_id}}
            )
        )

    async def AbortMigration(
        self, request: pb.AbortMigrationRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortMigrationReply:
        inbound = self._inbound.pop(request.migration_id, None)
        if inbound is not None:
            seg.remove(inbound.path)
        return pb.AbortMigrationReply()


def add_migration_service(server: grpc.aio.Server, service: MigrationService) -> None:
    pb_grpc.add_MigrationServicer_to_server(service, server)
