"""The relay's migration cut-over, against fake engines (no vLLM): what the client sees and what the
next engine is asked, for each answer of the source sidecar's ResolveMigration, and static mode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from slofleet.gateway.instances import Instance, InstancePool, MigrationResolution
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.gateway.relay import Relay, RequestState
from slofleet.gateway.requests import new_state
from slofleet.gateway.scheduler import Scheduler
from slofleet.gateway.validate import parse_request
from slofleet.instance import RequestClass
from slofleet.policies.dispatch import DispatchParams

PROMPT = [7, 8, 9]


@dataclass
class FakeEngine:
    """Streams `tokens` one per chunk, then ends with `finish` (vLLM's shape, return_token_ids)."""

    tokens: list[int]
    finish: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.request_ids.append(request.headers["X-Request-Id"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rid = "cmpl-" + request.headers["X-Request-Id"]
        for i, tok in enumerate(self.tokens):
            last = i == len(self.tokens) - 1
            choice = {"index": 0, "text": f"<{tok}>", "logprobs": None, "token_ids": [tok],
                      "finish_reason": self.finish if last and self.finish != "abort" else None}  # fmt: skip
            if i == 0:
                choice["prompt_token_ids"] = body["prompt"]
            chunk = {"id": rid, "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if self.finish == "abort":
            # vLLM's end of an aborted request: an empty chunk with finish_reason "abort".
            choice = {"index": 0, "text": "", "logprobs": None, "token_ids": [], "finish_reason": "abort"}
            chunk = {"id": rid, "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@dataclass
class Harness:
    relay: Relay
    pool: InstancePool
    engines: dict[str, FakeEngine]
    metrics: GatewayMetrics

    def state(self, max_tokens: int = 5) -> RequestState:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "return_token_ids": True}  # fmt: skip
        parsed = parse_request("completions", body, {"m": 2048})
        return new_state("req1", parsed, RequestClass.INTERACTIVE, 0, 2048, 512)

    async def run(self, state: RequestState) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []

        async def sink(chunk: dict[str, Any], raw: bytes | None = None) -> None:
            chunks.append(json.loads(raw) if raw is not None else chunk)

        target = self.pool.instances["a"]
        state.engine_request_id = ""
        self.relay.engine_id(state)
        self.relay.scheduler.place_on(target, state.placement, state.engine_request_id)
        await self.relay.execute(state, sink, target)
        return chunks


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    engines = {"a": FakeEngine([1, 2, 3], "abort"), "b": FakeEngine([4, 5], "length")}
    runners = []
    pool = InstancePool()
    for name, engine in engines.items():
        app = web.Application()
        app.router.add_post("/v1/completions", engine.completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
        pool.instances[name] = Instance(
            instance_id=name, url=f"http://127.0.0.1:{port}", model="m", max_model_len=2048,
            kv_total_blocks=1000, concurrency_limit=8, healthy=True,
        )  # fmt: skip
    metrics = GatewayMetrics()
    scheduler = Scheduler(pool, DispatchParams(), metrics, max_queued=8, queue_timeout_s=5, retry_after_s=1)
    async with aiohttp.ClientSession() as session:
        yield Harness(Relay(pool, scheduler, session, metrics, max_resumes=4), pool, engines, metrics)
    for runner in runners:
        await runner.cleanup()


def tokens_and_finishes(chunks: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
    toks = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    return toks, finishes


def resolver(answer: MigrationResolution, asked: list[str]) -> Any:
    async def resolve(engine_request_id: str) -> MigrationResolution:
        asked.append(engine_request_id)
        return answer

    return resolve


async def test_stop_resolved_with_kv_resumes_on_the_destination_with_the_copied_kv(harness: Harness) -> None:
    asked: list[str] = []
    params = {"slofleet_migration": {"segment": "/dev/shm/seg", "id": "m1"}}
    harness.pool.instances["a"].resolve_migration = resolver(MigrationResolution("kv", "b", params), asked)
    chunks = await harness.run(harness.state())
    assert tokens_and_finishes(chunks) == ([1, 2, 3, 4, 5], ["length"])
    assert asked == ["req1"]
    body = harness.engines["b"].bodies[0]
    assert body["prompt"] == [*PROMPT, 1, 2, 3] and body["max_tokens"] == 2
    assert body["kv_transfer_params"] == params
    assert harness.engines["b"].request_ids == ["req1-m1"]
    assert harness.metrics.resumes.labels("move")._value.get() == 1
    assert harness.pool.instances["a"].healthy and not harness.pool.instances["a"].tracked


async def test_stop_resolved_by_recompute_resumes_elsewhere_without_kv_and_the_source_stays(
    harness: Harness,
) -> None:
    asked: list[str] = []
    harness.pool.instances["a"].resolve_migration = resolver(MigrationResolution("recompute"), asked)
    chunks = await harness.run(harness.state())
    assert tokens_and_finishes(chunks) == ([1, 2, 3, 4, 5], ["length"])
    body = harness.engines["b"].bodies[0]
    assert body["prompt"] == [*PROMPT, 1, 2, 3] and "kv_transfer_params" not in body
    assert harness.metrics.resumes.labels("migration_recompute")._value.get() == 1
    assert harness.pool.instances["a"].healthy  # the copy failed, not the instance


async def test_a_stop_no_migration_explains_reaches_the_client_as_abort(harness: Harness) -> None:
    asked: list[str] = []
    harness.pool.instances["a"].resolve_migration = resolver(MigrationResolution("none"), asked)
    chunks = await harness.run(harness.state())
    assert tokens_and_finishes(chunks) == ([1, 2, 3], ["abort"])
    assert asked == ["req1"] and harness.engines["b"].bodies == []


async def test_a_sidecar_that_does_not_answer_means_the_instance_is_lost(harness: Harness) -> None:
    async def down(engine_request_id: str) -> MigrationResolution:
        raise ConnectionError("ResolveMigration: UNAVAILABLE")

    harness.pool.instances["a"].resolve_migration = down
    chunks = await harness.run(harness.state())
    assert tokens_and_finishes(chunks) == ([1, 2, 3, 4, 5], ["length"])
    assert harness.metrics.resumes.labels("instance_lost")._value.get() == 1


async def test_static_mode_relays_an_engine_abort_unchanged(harness: Harness) -> None:
    assert harness.pool.instances["a"].resolve_migration is None
    chunks = await harness.run(harness.state())
    assert tokens_and_finishes(chunks) == ([1, 2, 3], ["abort"])
    assert harness.engines["b"].bodies == []
