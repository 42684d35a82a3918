"""The destination's inbound-memory bound: committed segments count only while they exist.

A committed segment belongs to the engine (its KV connector removes it when the resumed request
ends); it must stop counting against `max_inbound_bytes` then, or a busy destination refuses every
migration for the TTL after its budget's worth of moves (the benchmark hit this at 8k tokens).
The engine's side is stood in for by its two answers the accept path needs (layout, free blocks);
the full path with real engines is in test_migration_engine.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from slofleet.api.v1 import migration_pb2 as pb
from slofleet.sidecar.migration import segment as seg
from slofleet.sidecar.migration.service import MigrationMetrics, MigrationService

LAYOUT = seg.KVLayout(16, "torch.float32", ("l0", "l1"), (2, 16, 64), 8192)


class ConnectorAnswers:
    async def layout(self) -> seg.KVLayout:
        return LAYOUT

    async def call(self, op: str, seconds: float = 30.0, **args: Any) -> dict[str, Any]:
        assert op == "capacity", op
        return {"free_blocks": 10_000, "total_blocks": 10_000}


def accept(mid: str, blocks: int) -> pb.AcceptMigrationRequest:
    return pb.AcceptMigrationRequest(
        migration_id=mid,
        request_id=f"r-{mid}",
        layout_json=json.dumps(LAYOUT.to_json()),
        max_blocks=blocks,
        current_blocks=1,
    )


def inbound_service(shm_dir: Path, max_blocks: int) -> MigrationService:
    return MigrationService(
        ConnectorAnswers(),  # type: ignore[arg-type]
        shm_dir=shm_dir,
        metrics=MigrationMetrics(CollectorRegistry()),
        max_inbound_bytes=max_blocks * LAYOUT.block_bytes,
    )


async def test_a_committed_segment_counts_until_the_engine_removes_it(tmp_path: Path) -> None:
    service = inbound_service(tmp_path, max_blocks=150)
    first = await service.AcceptMigration(accept("m1", 100), None)  # type: ignore[arg-type]
    assert first.accepted
    commit = await service.CommitMigration(
        pb.CommitMigrationRequest(migration_id="m1", valid_blocks=0),
        None,  # type: ignore[arg-type]
    )
    path = Path(json.loads(commit.kv_transfer_params_json)["slofleet_migration"]["segment"])
    assert await asyncio.to_thread(path.exists)
    # The resumed request still holds the segment: a second one of the same size does not fit.
    full = await service.AcceptMigration(accept("m2", 100), None)  # type: ignore[arg-type]
    assert not full.accepted and "destination full" in full.reason
    await asyncio.to_thread(path.unlink)  # what the engine's connector does when the resumed request ends
    again = await service.AcceptMigration(accept("m3", 100), None)  # type: ignore[arg-type]
    assert again.accepted, again.reason


async def chunks(mid: str, blocks: int) -> AsyncIterator[pb.KVChunk]:
    data = bytes(blocks * LAYOUT.block_bytes)
    yield pb.KVChunk(migration_id=mid, first_block=0, num_blocks=blocks, data=data)


class AbortingContext:
    """What grpc.aio's context does on abort: the handler stops with the status."""

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


async def test_a_commit_takes_a_partial_last_block_and_names_a_wrong_token_count(tmp_path: Path) -> None:
    service = inbound_service(tmp_path, max_blocks=1000)
    context: Any = AbortingContext()
    block = LAYOUT.block_size
    counts = {"short": 2 * block, "long": 3 * block + 1, "partial": 2 * block + 5}
    for mid in counts:
        assert (await service.AcceptMigration(accept(mid, 10), context)).accepted
        await service.PushKV(chunks(mid, 3), context)
    for mid in ("short", "long"):
        commit = pb.CommitMigrationRequest(migration_id=mid, valid_blocks=3, token_ids=[1] * counts[mid])
        with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT: token_ids: \d+ for 3 blocks of 16 tokens"):
            await service.CommitMigration(commit, context)
    tokens = list(range(counts["partial"]))
    reply = await service.CommitMigration(
        pb.CommitMigrationRequest(migration_id="partial", valid_blocks=3, token_ids=tokens), context
    )
    path = json.loads(reply.kv_transfer_params_json)["slofleet_migration"]["segment"]
    assert seg.read_header(path)["token_ids"] == tokens
