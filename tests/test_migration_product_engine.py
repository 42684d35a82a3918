"""Live migration end to end through the product's own parts, on two real vLLM CPU engines.

Each engine runs slofleet's KV connector and has a real in-process `Sidecar` (the Migration service
mounted on its authenticated gRPC port, on the engine's control socket); the real `Gateway` runs in
sidecar mode and owns the client streams; migrations are started the way the control loop starts
them (`operator/rescheduler.py`: `MigrationClient.migrate_out`, `Rescheduler.drain`) with request
ids read from the sidecars' `Load`. What is proven:
- a streaming request migrated mid-decode gives the client exactly the tokens of an unmigrated
  greedy run, once each, with one finish; the destination computed only the last token (vLLM's
  prompt_tokens_by_source) and the gateway cut over with the KV (resumes{reason="move"});
- draining an instance under load moves every request off it and every stream completes exactly;
- a destination that rejects leaves the request on the source, and a source that loses its engine
  link after the stop (the stop happened, the tail copy cannot) is resumed by recompute.

fp32 weights: bf16 re-prefill drifts from the decode's numerics on the random model (see
tests/test_migration_engine.py), which would hide what the KV path does.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from slofleet.fleet import InstanceRef, Phase
from slofleet.gateway.config import GatewayConfig
from slofleet.gateway.server import Gateway
from slofleet.instance import InstanceLoad, Pool
from slofleet.operator.control_loop import LoopEvent, SidecarClient
from slofleet.operator.rescheduler import MigrationClient, Rescheduler, ReschedulerConfig
from slofleet.sidecar.migration.engine_link import EngineLinkError
from slofleet.sidecar.runtime import Sidecar, SidecarConfig
from slofleet.tinymodel import ensure_tiny_model
from tests.enginectl import PROJECT_ENGINE_ARGS, VllmServer, free_port, start_vllm
from tests.migration_support import complete, connector_args, prompt_tokens_by_source
from tests.throttle import EngineThrottle, throttled

pytestmark = pytest.mark.engine

BLOCK = 128
MAX_LEN = 4096
TOKEN = "migration-test-token"

# Still flaky here even with the engines throttled (issue 7): on this 2-vCPU VM, processes that wait
# on a socket or a timer (the test's loop, curl in a probe) sometimes do not run for seconds while an
# engine decodes, then catch up in one burst; a request can end inside such a stall before the test
# acts on it. Measured with curl against a bare engine (no slofleet code): about 250 tokens, an 8 s
# stall, then the other 2,750 tokens of the 3,000 at once.
KNOWN_STALL = pytest.mark.xfail(
    strict=False, reason="client-side scheduling stalls on the 2-vCPU test VM while an engine decodes"
)


@dataclass
class Fleet:
    model: str
    servers: dict[str, VllmServer]
    sidecars: dict[str, Sidecar]
    gateway: Gateway
    gateway_url: str
    refs: dict[str, InstanceRef]
    loads_client: SidecarClient
    events: list[LoopEvent] = field(default_factory=list)

    async def loads(self) -> list[InstanceLoad]:
        """Every sidecar's Load; a call that timed out (this process is starved on a busy 2-core
        machine) is asked again, as the control loop asks again at its next step."""
        out = []
        for ref in self.refs.values():
            for _ in range(5):
                load = await self.loads_client.load(ref.sidecar_address)
                if load is not None:
                    break
            assert load is not None, f"sidecar of {ref.instance_id} gave no Load 5 times"
            out.append(load)
        return out

    def rescheduler(self, **config: Any) -> Rescheduler:
        async def on_event(event: LoopEvent) -> None:
            self.events.append(event)

        return Rescheduler("test/migration", ReschedulerConfig(**config), MigrationClient(TOKEN), on_event)

    def gateway_resumes(self, reason: str) -> float:
        return self.gateway.metrics.resumes.labels(reason)._value.get()


@pytest.fixture(scope="session")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    model = str(ensure_tiny_model("small"))
    servers: dict[str, VllmServer] = {}
    sidecars: dict[str, Sidecar] = {}
    runner: web.AppRunner | None = None
    client = SidecarClient(TOKEN, timeout_seconds=10)
    # Each engine's control socket in its own folder of the machine's shared memory.
    dirs = {n: Path(tempfile.mkdtemp(prefix=f"slofleet-{n}-", dir="/dev/shm")) for n in "ab"}
    socks = {n: str(d / "kv.sock") for n, d in dirs.items()}
    try:
        for name, sock in socks.items():
            # What the operator renders: the worker extension the sidecar calls, and the connector.
            args = [*PROJECT_ENGINE_ARGS, *connector_args(sock), "--dtype", "float32"]
            servers[name] = start_vllm(model, extra_args=args, max_model_len=MAX_LEN, wait=False)
        await asyncio.gather(*(asyncio.to_thread(s.wait_healthy) for s in servers.values()))
        for name, server in servers.items():
            sock = socks[name]
            sidecar = Sidecar(
                SidecarConfig(
                    engine_url=server.url, instance_id=name, token=TOKEN, grpc_host="127.0.0.1",
                    metrics_host="127.0.0.1", kv_control_socket=sock, poll_interval_seconds=0.1,
                    weight_store_dir=str(tmp_path_factory.mktemp(f"weights-{name}")),
                )
            )  # fmt: skip
            await sidecar.start()
            sidecars[name] = sidecar
        refs = {
            n: InstanceRef(n, Pool.MIXED, Phase.READY, servers[n].url, f"127.0.0.1:{s.grpc_port}")
            for n, s in sidecars.items()
        }
        gateway = Gateway(
            GatewayConfig(
                host="127.0.0.1", sidecars=tuple(r.sidecar_address for r in refs.values()),
                sidecar_token=TOKEN, db_path=tmp_path_factory.mktemp("gw") / "gw.sqlite3",
            )
        )  # fmt: skip
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        fleet = Fleet(model, servers, sidecars, gateway, f"http://127.0.0.1:{port}", refs, client)
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                async with s.get(fleet.gateway_url + "/health") as r:
                    body = await r.json()
                if r.status == 200 and body.get("instances_ready", 0) == 2:
                    break
                await asyncio.sleep(0.2)
            else:
                raise TimeoutError(f"gateway never saw 2 ready instances: {body}")
        yield fleet
    finally:
        if runner is not None:
            await runner.cleanup()
        await client.close()
        for sidecar in sidecars.values():
            await sidecar.stop()
        for server in servers.values():
            server.stop()
        for d in dirs.values():
            await asyncio.to_thread(shutil.rmtree, d, True)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        yield s


def prompt_of(seed: int, n: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


@dataclass
class ClientStream:
    """What the client of the gateway received: every token, every finish, in order."""

    tokens: list[int] = field(default_factory=list)
    finishes: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    request_id: str = ""

    async def run(
        self, session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], n: int
    ) -> None:
        body = {
            "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True,
        }  # fmt: skip
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            self.request_id = resp.headers["X-Request-Id"]
            self.started.set()
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                for ch in json.loads(line[6:])["choices"]:
                    self.tokens += ch.get("token_ids") or []
                    if ch.get("finish_reason"):
                        self.finishes.append(ch["finish_reason"])


async def start_stream(
    fleet: Fleet, session: aiohttp.ClientSession, prompt: list[int], n: int, wait_for: int
) -> tuple[ClientStream, asyncio.Task[None]]:
    """Start a stream and return once the gateway relayed `wait_for` tokens of it. Counted at the
    gateway, not the client: the client (same event loop) may read far behind what was relayed."""
    assert fleet.gateway.relay is not None
    stream = ClientStream()
    task = asyncio.create_task(stream.run(session, fleet.gateway_url, fleet.model, prompt, n))
    await asyncio.wait_for(stream.started.wait(), 300)
    for _ in range(30000):
        state = fleet.gateway.relay.active.get(stream.request_id)
        assert state is not None, (
            f"the stream ended before the test could act on it: {len(stream.tokens)} tokens, "
            f"finishes {stream.finishes}, error {task.done() and task.exception()}"
        )
        if len(state.token_ids) >= wait_for:
            return stream, task
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{wait_for} tokens not relayed in 300 s")


async def where_running(fleet: Fleet, wanted: Collection[str] = (), seconds: float = 60.0) -> dict[str, str]:
    """Engine request id -> instance, from the sidecars' Load (the gateway reports each request),
    once every `wanted` id shows, and every instance is healthy: on this shared 2-core machine a
    sidecar now and then misses an engine scrape and reports its engine down for a moment (the
    policy moves nothing off an instance it cannot see)."""
    for _ in range(int(seconds / 0.2)):
        loads = await fleet.loads()
        running = {r.request_id: ld.instance_id for ld in loads for r in ld.requests}
        if all(w in running for w in wanted) and all(ld.healthy for ld in loads):
            return running
        await asyncio.sleep(0.2)
    raise AssertionError(f"requests {sorted(wanted)} not all in healthy sidecars' Load: {loads}")


async def located(fleet: Fleet, stream: ClientStream) -> tuple[str, str, str]:
    """(engine request id, its instance, the other instance) of a stream, as the gateway relays it;
    the sidecar that reports it in its Load must agree (that is what the control loop reads)."""
    assert fleet.gateway.relay is not None
    state = fleet.gateway.relay.active[stream.request_id]
    assert state.instance is not None
    rid, source = state.engine_request_id, state.instance.instance_id
    running = await where_running(fleet, [rid])
    assert running[rid] == source, (rid, source, running)
    return rid, source, "b" if source == "a" else "a"


async def emptied(fleet: Fleet, instance: str, seconds: float = 5.0) -> InstanceLoad:
    """The instance's Load once it shows no request (engine scrape and gateway reports lag a bit)."""
    for _ in range(int(seconds / 0.1)):
        load = next(ld for ld in await fleet.loads() if ld.instance_id == instance)
        if load.running_requests == 0 and not load.requests:
            break
        await asyncio.sleep(0.1)
    return load


async def test_migrated_stream_is_exact_and_the_destination_computes_only_the_last_token(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    prompt = prompt_of(11)
    n = 1500
    with EngineThrottle() as throttle:
        stream, task = await start_stream(fleet, session, prompt, n, wait_for=300)
        rid, source, dest = await located(fleet, stream)
        before = await prompt_tokens_by_source(session, fleet.servers[dest].url)
        moves = fleet.gateway_resumes("move")
        result = await MigrationClient(TOKEN).migrate_out(
            fleet.refs[source], fleet.refs[dest], rid, ReschedulerConfig()
        )
        await asyncio.wait_for(task, 300)
    assert throttled(throttle, *fleet.servers.values())
    # The unmigrated run only now, on the source: run on the destination before, it would have left
    # the prefix in the destination's cache, and the resume would not need the copied KV at all.
    reference = await complete(session, fleet.servers[source].url, fleet.model, prompt, n)
    assert result.outcome == "migrated", result
    assert stream.tokens == reference
    assert stream.finishes == ["length"]
    assert fleet.gateway_resumes("move") == moves + 1
    after = await prompt_tokens_by_source(session, fleet.servers[dest].url)
    loaded = after["external_kv_transfer"] - before.get("external_kv_transfer", 0)
    computed = after["local_compute"] - before.get("local_compute", 0)
    # Every computed token of the moved prefix came over, the partial last block too; vLLM
    # computed only the last token.
    assert loaded >= len(prompt) + 300 - 1
    assert computed == 1
    assert result.bytes_copied > 0


@KNOWN_STALL
async def test_drain_moves_every_request_and_loses_none(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    n, count = 1400, 4
    prompts = [prompt_of(100 + i, 200 + 40 * i) for i in range(count)]
    references = await asyncio.gather(
        *(complete(session, fleet.servers["b"].url, fleet.model, p, n) for p in prompts)
    )
    with EngineThrottle():
        started = [await start_stream(fleet, session, p, n, wait_for=40) for p in prompts]
        running = await where_running(fleet, [s.request_id for s, _ in started])
        on = {s.request_id: running[s.request_id] for s, _ in started}
        victim = max(("a", "b"), key=lambda i: sum(1 for v in on.values() if v == i))
        on_victim = sorted(r for r, i in on.items() if i == victim)
        assert on_victim, on
        rescheduler = fleet.rescheduler(max_concurrent=2)
        try:
            counts = await rescheduler.drain([victim], await fleet.loads(), fleet.refs, reload=fleet.loads)
            left = await emptied(fleet, victim)
        finally:
            await rescheduler.close()
        await asyncio.wait_for(asyncio.gather(*(t for _, t in started)), 600)
    assert counts == {"migrated": len(on_victim)}, (counts, [e.message for e in fleet.events])
    # Nothing of the moved requests is left on the victim before the streams end (no engine-side
    # request: the gateway's reports and the engine's own count agree).
    assert left.running_requests == 0 and not left.requests, left
    for (stream, _), ref in zip(started, references, strict=True):
        assert stream.tokens == ref
        assert stream.finishes == ["length"]
    migrated = [e for e in fleet.events if e.kind == "migrate" and e.reason == "Migrated"]
    assert len(migrated) == len(on_victim)


@KNOWN_STALL
async def test_rejected_migration_leaves_the_request_on_the_source(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    prompt = prompt_of(21)
    n = 1500
    reference = await complete(session, fleet.servers["a"].url, fleet.model, prompt, n)
    with EngineThrottle():
        stream, task = await start_stream(fleet, session, prompt, n, wait_for=100)
        rid, source, dest = await located(fleet, stream)
        service = fleet.sidecars[dest].migration
        assert service is not None
        limit, service.max_inbound_bytes = service.max_inbound_bytes, 1  # destination full
        resumes = fleet.gateway_resumes("move") + fleet.gateway_resumes("migration_recompute")
        try:
            result = await MigrationClient(TOKEN).migrate_out(
                fleet.refs[source], fleet.refs[dest], rid, ReschedulerConfig()
            )
        finally:
            service.max_inbound_bytes = limit
        await asyncio.wait_for(task, 300)
    assert result.outcome == "rejected" and "destination full" in result.message
    assert stream.tokens == reference and stream.finishes == ["length"]
    assert fleet.gateway_resumes("move") + fleet.gateway_resumes("migration_recompute") == resumes


@KNOWN_STALL
async def test_source_lost_after_the_stop_is_resumed_by_recompute(
    fleet: Fleet, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = prompt_of(31)
    n = 1500
    reference = await complete(session, fleet.servers["a"].url, fleet.model, prompt, n)
    with EngineThrottle():
        stream, task = await start_stream(fleet, session, prompt, n, wait_for=100)
        rid, source, dest = await located(fleet, stream)
        service = fleet.sidecars[source].migration
        assert service is not None
        real_call = service.control.call

        async def engine_gone_after_stop(op: str, seconds: float = 30.0, **args: Any) -> dict[str, Any]:
            # The request was aborted on the source; then its engine stops answering (as when it is
            # killed): the last blocks can never be copied.
            if op == "final":
                raise EngineLinkError("KV connector control socket: connection refused", "engine_down")
            return await real_call(op, seconds, **args)

        monkeypatch.setattr(service.control, "call", engine_gone_after_stop)
        recomputes = fleet.gateway_resumes("migration_recompute")
        result = await MigrationClient(TOKEN).migrate_out(
            fleet.refs[source], fleet.refs[dest], rid, ReschedulerConfig()
        )
        await asyncio.wait_for(task, 300)
    assert result.outcome == "recompute", result
    assert stream.tokens == reference
    assert stream.finishes == ["length"]
    assert fleet.gateway_resumes("migration_recompute") == recomputes + 1
