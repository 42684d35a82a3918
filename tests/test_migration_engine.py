"""Live migration against two real vLLM CPU engines with slofleet's KV connector.

What is proven: a request moved while it decodes (once, twice, by blocking stop-and-copy) produces
exactly the greedy tokens of an unmigrated run with no token missing or repeated; the destination
computes only the last token (vLLM's prompt_tokens_by_source: everything the source computed,
its partial last block too, arrives as external_kv_transfer; local compute is one token); and
failures before the stop leave the request running on the source, counted by outcome.

fp32 weights: bf16 re-prefill drifts from the decode's numerics after a few dozen tokens on the
random model, for recompute and KV load alike, which would hide what the KV path does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from slofleet.api.v1 import migration_pb2 as pb
from slofleet.tinymodel import ensure_tiny_model
from tests.migration_support import (
    Node,
    complete,
    generate_following_moves,
    migrate,
    prompt_tokens_by_source,
    start_engine,
    start_node,
    stop_node,
    wait_engine_tokens,
)
from tests.throttle import EngineThrottle, throttled

pytestmark = pytest.mark.engine

BLOCK = 128
MAX_LEN = 4096
MAX_TOKENS = 1600


@pytest.fixture(scope="session")
def model() -> str:
    return str(ensure_tiny_model("small"))


@pytest.fixture(scope="session")
async def nodes(model: str) -> AsyncIterator[dict[str, Node]]:
    a, sock_a = start_engine("a", model, ["--dtype", "float32"], MAX_LEN)
    try:
        b, sock_b = start_engine("b", model, ["--dtype", "float32"], MAX_LEN)
    except BaseException:
        a.stop()
        raise
    na = await start_node("a", a, sock_a)
    nb = await start_node("b", b, sock_b)
    try:
        yield {"a": na, "b": nb}
    finally:
        for n in (na, nb):
            await stop_node(n)
            n.server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        yield s


def prompt_of(seed: int, n: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def outcome(progress: list[pb.MigrationProgress]) -> str:
    assert progress and progress[-1].done
    return pb.MigrationOutcome.Name(progress[-1].outcome)


async def test_live_migration_is_exact_and_computes_only_the_last_token(
    nodes: dict[str, Node], session: aiohttp.ClientSession, model: str
) -> None:
    a, b = nodes["a"], nodes["b"]
    prompt = prompt_of(1)
    reference = await complete(session, a.url, model, prompt, MAX_TOKENS)
    before = await prompt_tokens_by_source(session, b.url)
    with EngineThrottle() as throttle:
        gen = asyncio.create_task(
            generate_following_moves(session, nodes, a, model, prompt, MAX_TOKENS, "live-1")
        )
        await wait_engine_tokens(a, "live-1", 300, gen)
        progress = await migrate(a, b, "live-1", max_stages=8)
        result = await gen
    assert throttled(throttle, a.server, b.server)
    assert outcome(progress) == "MIGRATION_OUTCOME_MIGRATED", progress[-1].message
    assert result.tokens == reference, (result.finish_reason, [(g.url, len(g.tokens)) for g in result.legs])
    assert [leg.url for leg in result.legs] == [a.url, b.url]
    after = await prompt_tokens_by_source(session, b.url)
    moved_prompt = len(prompt) + len(result.legs[0].tokens)
    loaded = after["external_kv_transfer"] - before.get("external_kv_transfer", 0)
    computed = after["local_compute"] - before.get("local_compute", 0)
    # Every token the source had computed came over, its last partial block too: vLLM computed
    # only the last token (the one the source sampled but had not run yet).
    assert loaded == moved_prompt - 1
    assert computed == 1
    # Pre-copy moved most blocks while the request was still decoding on the source.
    stages = [p for p in progress if p.stage > 0]
    assert stages and stages[0].blocks_copied >= (len(prompt) + 300) // BLOCK - 1
    assert progress[-1].blocks_copied == -(-loaded // BLOCK)


async def test_migrated_twice_and_stop_and_copy_are_exact(
    nodes: dict[str, Node], session: aiohttp.ClientSession, model: str
) -> None:
    a, b = nodes["a"], nodes["b"]
    prompt = prompt_of(2)
    reference = await complete(session, b.url, model, prompt, MAX_TOKENS)
    with EngineThrottle():
        gen = asyncio.create_task(
            generate_following_moves(session, nodes, a, model, prompt, MAX_TOKENS, "twice")
        )
        await wait_engine_tokens(a, "twice", 200, gen)
        first = await migrate(a, b, "twice", max_stages=8)
        # The resumed request carries the gateway's next id; once b has generated some of it,
        # blocking stop-and-copy back to a.
        await wait_engine_tokens(b, "twice-m1", 100, gen)
        second = await migrate(b, a, "twice-m1", max_stages=0)
        result = await gen
    assert outcome(first) == outcome(second) == "MIGRATION_OUTCOME_MIGRATED", (first[-1], second[-1])
    assert [s.stage for s in second] == [0, -1]
    assert [leg.url for leg in result.legs] == [a.url, b.url, a.url]
    assert result.tokens == reference


async def test_failures_before_the_stop_leave_the_request_on_the_source(
    nodes: dict[str, Node], session: aiohttp.ClientSession, model: str
) -> None:
    a, b = nodes["a"], nodes["b"]
    prompt = prompt_of(3)
    reference = await complete(session, a.url, model, prompt, MAX_TOKENS)
    with EngineThrottle():
        gen = asyncio.create_task(
            generate_following_moves(session, nodes, a, model, prompt, MAX_TOKENS, "stays")
        )
        await wait_engine_tokens(a, "stays", 100, gen)
        limit = b.service.max_inbound_bytes
        b.service.max_inbound_bytes = 1  # destination full
        try:
            full = await migrate(a, b, "stays")
        finally:
            b.service.max_inbound_bytes = limit
        peer_down = await migrate(a, "127.0.0.1:1", "stays")  # nothing listens: destination dead
        unknown = await migrate(a, b, "no-such-request")
        result = await gen
    assert outcome(full) == "MIGRATION_OUTCOME_REJECTED" and "destination full" in full[-1].message
    assert outcome(peer_down) == "MIGRATION_OUTCOME_PEER_FAILED"
    assert outcome(unknown) == "MIGRATION_OUTCOME_SOURCE_LOST"
    assert [leg.url for leg in result.legs] == [a.url]
    assert result.tokens == reference and result.finish_reason == "length"
    finished = await migrate(a, b, "stays")
    assert outcome(finished) in ("MIGRATION_OUTCOME_SOURCE_LOST", "MIGRATION_OUTCOME_SOURCE_FINISHED")
    counts = {
        s.labels["outcome"]: s.value
        for m in a.registry.collect()
        for s in m.samples
        if s.name == "slofleet_migrations_total"
    }
    assert counts["rejected"] >= 1 and counts["peer_failed"] >= 1 and counts["source_lost"] >= 1
