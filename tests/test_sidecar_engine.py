"""The sidecar next to a real vLLM CPU server (tiny model): load, info, commands, auth, health.

The sidecar runs in-process on the test's event loop (its gRPC and metrics ports are real
sockets); the engine is the session's shared `vllm_server`, except for the health test, which
stops and restarts its own engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from enginectl import PROJECT_ENGINE_ARGS, StreamLoad, VllmServer, free_port, start_streams
from grpc_health.v1 import health_pb2, health_pb2_grpc
from throttle import EngineThrottle

from slofleet.api.v1 import sidecar_pb2 as pb
from slofleet.api.v1 import sidecar_pb2_grpc as pb_grpc
from slofleet.sidecar.enginemetrics import parse_engine_metrics
from slofleet.sidecar.runtime import Sidecar, SidecarConfig

pytestmark = pytest.mark.engine

TOKEN = "test-token-7f3a"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
STREAMS = 16


async def start_sidecar(engine_url: str) -> Sidecar:
    sidecar = Sidecar(
        SidecarConfig(
            engine_url=engine_url, instance_id="engine-test", token=TOKEN, grpc_host="127.0.0.1",
            metrics_host="127.0.0.1", concurrency_limit=64,
        )
    )  # fmt: skip
    await sidecar.start()
    return sidecar


@pytest.fixture(scope="module")
async def sidecar(vllm_server: VllmServer) -> AsyncIterator[Sidecar]:
    sc = await start_sidecar(vllm_server.url)
    try:
        await wait_for(lambda: sc.state.info is not None and sc.state.healthy, 30, "sidecar sees the engine")
        yield sc
    finally:
        await sc.stop()


@pytest.fixture(scope="module")
async def stub(sidecar: Sidecar) -> AsyncIterator[pb_grpc.SidecarStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        yield pb_grpc.SidecarStub(channel)


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting until {what}")
        await asyncio.sleep(0.05)


async def engine_scrape(http: aiohttp.ClientSession, url: str):
    async with http.get(url + "/metrics") as resp:
        return parse_engine_metrics(await resp.text())


async def engine_control(http: aiohttp.ClientSession, url: str, path: str) -> None:
    async with http.post(url + path) as resp:
        assert resp.status == 200, f"POST {path}: {resp.status} {await resp.text()}"


async def freeze_with_in_flight(
    http: aiohttp.ClientSession, server: VllmServer, count: int, max_tokens: int = 900
) -> StreamLoad:
    """Start `count` streams and return with the engine paused (`/pause?mode=keep`) while all of
    them are in it (running or waiting); the caller resumes.

    The tiny model finishes 16 x 900 tokens in ~2 s, and while it streams its API server is too
    busy to answer a `/pause` quickly, so catching the batch mid-flight is a race: hold the
    requests paused until sent, let the engine step ~0.1 s (throttled, so that those are few
    steps on any box), pause, and check; on a miss let that batch finish and try a fresh one.
    """
    with EngineThrottle():
        for _ in range(5):
            await engine_control(http, server.url, "/pause?mode=keep")
            streams = start_streams(server.url, server.model, count, max_tokens)
            try:
                await asyncio.sleep(3)  # the load process starts and sends them (held while paused)
                await engine_control(http, server.url, "/resume")
                await asyncio.sleep(0.1)
                await engine_control(http, server.url, "/pause?mode=keep")
                await asyncio.sleep(0.2)
                s = await engine_scrape(http, server.url)
            except BaseException:
                await engine_control(http, server.url, "/resume")
                streams.stop()
                raise
            if s.running_requests + s.waiting_requests == count:
                return streams
            await engine_control(http, server.url, "/resume")
            await asyncio.to_thread(streams.wait)
    raise AssertionError(f"could not freeze the engine with {count} requests in flight")


async def test_info_reports_the_engine_kv_layout(stub, vllm_server, http):
    info = await stub.Info(pb.InfoRequest(), metadata=AUTH)
    sample = await engine_scrape(http, vllm_server.url)
    async with http.get(vllm_server.url + "/version") as resp:
        version = (await resp.json())["version"]
    assert info.engine == "vllm" and info.engine_version == version
    assert info.model == vllm_server.model and info.max_model_len_tokens == 1024
    assert (
        info.kv_total_blocks == sample.num_gpu_blocks and info.block_size_tokens == sample.block_size_tokens
    )
    # Tiny model: 2 layers, 2 KV heads of 32 dims, bf16 on the CPU build; K and V.
    assert (info.layers_total, info.num_kv_heads, info.head_size, info.kv_dtype) == (2, 2, 32, "bfloat16")
    assert info.kv_bytes_per_block == 2 * info.layers_total * info.block_size_tokens * 2 * 32 * 2
    assert info.kv_layout == "LBHNC"
    # The whole cache (VLLM_CPU_KVCACHE_SPACE=1 GiB) is blocks x bytes per block.
    assert info.kv_total_blocks * info.kv_bytes_per_block == 1 << 30


async def test_load_matches_the_engine_under_16_streams(stub, sidecar, vllm_server, http):
    """Load equals what vLLM's own /metrics shows at the same moment, under 16 concurrent streams.

    The tiny model finishes 16 x 900 tokens in ~2 s while its API server is saturated, so the
    requests are first held (`/pause?mode=keep`) until all 16 are sent, and frozen again once the
    sidecar sees them run: frozen, nothing changes and Load must *equal* a direct scrape.
    Unfrozen, the engine changes between any two reads, and on this shared 2-core machine one
    scrape can take over a second. The sidecar read the engine between its snapshot's timestamp
    (scrape sent) and the moment Load answered; direct scrapes that finished before that interval,
    lie inside it, and started after it bracket the engine's state then. Running and waiting
    counts must lie within the range the bracket saw; KV usage too while no request finished in
    the bracket (it only grows during decode, so the bracket bounds it).
    """
    direct: list[tuple[int, int, int, int, float]] = []  # (sent ns, received ns, running, waiting, kv usage)
    loads: list[tuple[pb.InstanceLoad, int]] = []  # (Load, unix ns when it answered)
    done = asyncio.Event()

    async def scrape_direct() -> None:
        while not done.is_set():
            sent = time.time_ns()
            s = await engine_scrape(http, vllm_server.url)
            direct.append((sent, time.time_ns(), s.running_requests, s.waiting_requests, s.kv_usage_fraction))
            await asyncio.sleep(0.02)

    async def read_load() -> None:
        while not done.is_set():
            load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
            loads.append((load, time.time_ns()))
            await asyncio.sleep(0.05)

    async def frozen_matches() -> pb.InstanceLoad:
        await asyncio.sleep(0.4)  # > poll interval + scrape: the sidecar has sampled the frozen engine
        frozen = await engine_scrape(http, vllm_server.url)
        load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
        assert (load.running_requests, load.waiting_requests) == (
            frozen.running_requests,
            frozen.waiting_requests,
        )
        assert load.kv_usage_fraction == frozen.kv_usage_fraction
        assert load.kv_free_blocks == load.kv_total_blocks - round(
            load.kv_total_blocks * load.kv_usage_fraction
        )
        return load

    readers = [asyncio.create_task(scrape_direct()), asyncio.create_task(read_load())]
    streams: StreamLoad | None = None
    paused = False
    try:
        streams = await freeze_with_in_flight(http, vllm_server, STREAMS)
        paused = True
        running = await frozen_matches()
        assert running.running_requests + running.waiting_requests == STREAMS
        assert running.running_requests > 0 and running.kv_usage_fraction > 0
        assert running.kv_free_blocks < running.kv_total_blocks
        assert 0 < running.freeness < running.kv_total_blocks / running.running_requests
        await engine_control(http, vllm_server.url, "/resume")
        paused = False
        assert await asyncio.to_thread(streams.wait) == [900] * STREAMS
    finally:
        if paused:
            await engine_control(http, vllm_server.url, "/resume")
        if streams is not None:
            streams.stop()
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*readers, return_exceptions=True)

    checked = busy = 0
    for ld, answered in loads:
        before = [d for d in direct if d[1] <= ld.timestamp_unix_nanos]
        after = [d for d in direct if d[0] >= answered]
        if not before or not after:
            continue  # at the edges of the run: no bracket
        bracket = [
            before[-1],
            *(d for d in direct if d[0] >= ld.timestamp_unix_nanos and d[1] <= answered),
            after[0],
        ]
        checked += 1
        busy += ld.running_requests > 0
        for i, value in ((2, ld.running_requests), (3, ld.waiting_requests)):
            assert min(d[i] for d in bracket) <= value <= max(d[i] for d in bracket), (i, ld, bracket)
        if all(d[2] == STREAMS for d in bracket):
            assert min(d[4] for d in bracket) <= ld.kv_usage_fraction <= max(d[4] for d in bracket), (
                ld,
                bracket,
            )
    assert checked >= 3 and busy >= 1, f"only {checked} Load calls bracketed ({busy} busy)"

    # Afterwards everything falls back to zero.
    await wait_for(lambda: sidecar.state.snapshot.running_requests == 0, 10, "the engine is idle")
    idle = await stub.Load(pb.LoadRequest(), metadata=AUTH)
    assert (idle.running_requests, idle.waiting_requests, idle.kv_usage_fraction) == (0, 0, 0.0)
    assert idle.kv_free_blocks == idle.kv_total_blocks
    assert idle.generation_tokens_per_second > 0  # the window still covers the burst
    assert idle.ttft_p99_seconds >= idle.ttft_p50_seconds > 0
    assert idle.itl_p99_seconds >= idle.itl_p50_seconds > 0


async def test_drain_completes_only_when_in_flight_requests_finish(stub, sidecar, vllm_server, http):
    streams = await freeze_with_in_flight(http, vllm_server, 4)
    paused = True
    try:
        await asyncio.sleep(0.3)  # the sidecar has sampled the frozen engine
        short = await stub.Drain(pb.DrainRequest(timeout_seconds=0.5), metadata=AUTH)
        assert not short.drained and short.requests_in_flight == 4
        load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
        assert load.draining and load.freeness == -math.inf

        drain = asyncio.ensure_future(stub.Drain(pb.DrainRequest(timeout_seconds=60), metadata=AUTH))
        await asyncio.sleep(0.5)
        assert not drain.done(), "Drain returned while requests were still in flight"
        await engine_control(http, vllm_server.url, "/resume")
        paused = False
        result = await drain
        # Drain said "empty": the engine must agree, and every stream must have completed.
        assert result.drained and result.requests_in_flight == 0
        after = await engine_scrape(http, vllm_server.url)
        assert (after.running_requests, after.waiting_requests) == (0, 0)
        assert await asyncio.to_thread(streams.wait, 30) == [900] * 4
    finally:
        if paused:
            await engine_control(http, vllm_server.url, "/resume")
        streams.stop()
        await stub.Drain(pb.DrainRequest(cancel=True), metadata=AUTH)
    load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
    assert not load.draining and load.freeness > 0


async def test_report_requests_feed_freeness_and_load(stub, sidecar):
    def event(kind, rid, prompt=1000, priority=0):
        return pb.RequestEvent(
            kind=kind,
            request=pb.RequestInfo(
                request_id=rid, request_class=pb.REQUEST_CLASS_BATCH, priority=priority,
                prompt_tokens=prompt, max_tokens=100,
            ),
        )  # fmt: skip

    before = sidecar.state.snapshot.freeness
    reply = await stub.ReportRequests(
        iter(
            [
                event(pb.RequestEvent.KIND_ADMITTED, "r1"),
                event(pb.RequestEvent.KIND_ADMITTED, "r2", prompt=640),
            ]
        ),
        metadata=AUTH,
    )
    assert reply.events_accepted == 2
    load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
    assert [r.request_id for r in load.requests] == ["r1", "r2"]
    # The engine runs nothing, so both count as queued; the head (r1, 1000 tokens) needs 8 blocks.
    assert load.freeness == pytest.approx(before - 8)
    await stub.ReportRequests(
        iter([event(pb.RequestEvent.KIND_FINISHED, "r1"), event(pb.RequestEvent.KIND_FINISHED, "r2")]),
        metadata=AUTH,
    )
    load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
    assert list(load.requests) == [] and load.freeness == pytest.approx(before)


async def test_watch_load_sends_on_change_and_at_the_set_rate(stub, sidecar):
    call = stub.WatchLoad(pb.WatchLoadRequest(interval_milliseconds=200), metadata=AUTH)
    first = await call.read()
    t0 = time.monotonic()
    periodic = await call.read()
    assert 0.05 <= time.monotonic() - t0 <= 1.0 and periodic.instance_id == first.instance_id
    call.cancel()

    call = stub.WatchLoad(pb.WatchLoadRequest(interval_milliseconds=60_000), metadata=AUTH)
    first = await call.read()
    await stub.SetLimits(pb.SetLimitsRequest(concurrency_limit=7, source="test"), metadata=AUTH)
    t0 = time.monotonic()
    changed = await asyncio.wait_for(call.read(), 2.0)
    assert changed.concurrency_limit == 7 and first.concurrency_limit != 7
    assert time.monotonic() - t0 < 1.0
    call.cancel()
    await stub.SetLimits(pb.SetLimitsRequest(concurrency_limit=64), metadata=AUTH)


async def test_calls_without_the_token_are_refused_and_counted(stub, sidecar, http):
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Load(pb.LoadRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetLimits(pb.SetLimitsRequest(concurrency_limit=1))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WatchLoad(pb.WatchLoadRequest()).read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportRequests(iter([pb.RequestEvent()]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sidecar.state.concurrency_limit == 64  # the refused SetLimits changed nothing
    async with http.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics") as resp:
        text = await resp.text()
    counts = {
        reason: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        for reason in ("missing", "invalid")
        if line.startswith(f'slofleet_instance_grpc_auth_failures_total{{reason="{reason}"}}')
    }
    assert counts["missing"] >= 4 and counts["invalid"] >= 2
    # The health service stays open for kubelet probes, which cannot send a token.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.SetLimits(pb.SetLimitsRequest(concurrency_limit=0), metadata=AUTH), "concurrency_limit"),
        (
            lambda s: s.SetLimits(pb.SetLimitsRequest(concurrency_limit=-3), metadata=AUTH),
            "concurrency_limit",
        ),
        (
            lambda s: s.SetLimits(pb.SetLimitsRequest(concurrency_limit=10**9), metadata=AUTH),
            "concurrency_limit",
        ),
        (
            lambda s: s.SetLimits(pb.SetLimitsRequest(concurrency_limit=4, source="x" * 100), metadata=AUTH),
            "source",
        ),
        (lambda s: s.Drain(pb.DrainRequest(timeout_seconds=-1), metadata=AUTH), "timeout_seconds"),
        (lambda s: s.Drain(pb.DrainRequest(timeout_seconds=math.nan), metadata=AUTH), "timeout_seconds"),
        (
            lambda s: s.WatchLoad(pb.WatchLoadRequest(interval_milliseconds=1), metadata=AUTH).read(),
            "interval_milliseconds",
        ),
        (lambda s: s.ReportRequests(iter([pb.RequestEvent()]), metadata=AUTH), "events[0].kind"),
        (
            lambda s: s.ReportRequests(
                iter(
                    [
                        pb.RequestEvent(
                            kind=pb.RequestEvent.KIND_ADMITTED, request=pb.RequestInfo(request_id="a")
                        )
                    ]
                ),
                metadata=AUTH,
            ),
            "events[0].request.request_class",
        ),
    ],
)
async def test_malformed_requests_get_invalid_argument_naming_the_field(stub, sidecar, call, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stub)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert not sidecar.state.draining and sidecar.state.concurrency_limit == 64
    assert (await stub.Load(pb.LoadRequest(), metadata=AUTH)).healthy


async def test_undecodable_bytes_do_not_hurt_the_sidecar(stub, sidecar):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
        raw = channel.unary_unary("/slofleet.v1.Sidecar/SetLimits")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff\xff garbage", metadata=AUTH)
    # grpc-python fails the call before any handler runs (UNKNOWN: DecodeError); what matters is
    # that the call fails cleanly and the sidecar goes on serving.
    assert err.value.code() in (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (await stub.Load(pb.LoadRequest(), metadata=AUTH)).healthy


async def test_health_follows_the_engine_down_and_back(tiny_model, start_vllm):
    port = free_port()
    engine = start_vllm(tiny_model, port=port, extra_args=PROJECT_ENGINE_ARGS)
    sc = await start_sidecar(engine.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.SidecarStub(channel)

            async def status(service: str = "") -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            serving = health_pb2.HealthCheckResponse.SERVING
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            await wait_for(lambda: sc.health.serving is True, 30, "health is SERVING")
            assert await status() == serving and await status("slofleet.v1.Sidecar") == serving

            await asyncio.to_thread(engine.stop)
            await wait_for(lambda: sc.health.serving is False, 5, "health is NOT_SERVING")
            assert await status() == not_serving
            load = await stub.Load(pb.LoadRequest(), metadata=AUTH)
            assert not load.healthy and load.freeness == -math.inf
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Info(pb.InfoRequest(), metadata=AUTH)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.to_thread(start_vllm, tiny_model, port=port, extra_args=PROJECT_ENGINE_ARGS)
            await wait_for(lambda: sc.health.serving is True, 30, "health is SERVING again")
            assert await status() == serving
            assert (await stub.Load(pb.LoadRequest(), metadata=AUTH)).healthy
            assert (await stub.Info(pb.InfoRequest(), metadata=AUTH)).kv_total_blocks > 0
    finally:
        await sc.stop()


def test_engine_extension_answers_collective_rpc(vllm_server):
    """The worker extension is reachable through the engine's own dev-mode route."""
    import urllib.request

    req = urllib.request.Request(
        vllm_server.url + "/collective_rpc",
        data=json.dumps({"method": "slofleet_kv_layout"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        (layout,) = json.load(resp)["results"]
    assert layout["num_layers"] == len(layout["layer_names"]) == len(layout["tensor_shapes"]) == 2
    assert layout["allocated_bytes"] == layout["num_blocks"] * layout["bytes_per_block"]


def test_engine_loaded_the_general_plugin(vllm_server):
    """The `vllm.general_plugins` entry point ran inside the engine's processes."""
    assert "slofleet vLLM plugin loaded (vllm 0.32." in vllm_server.log_path.read_text(errors="replace")


def test_plugin_refuses_another_vllm_series(monkeypatch):
    from slofleet.sidecar.vllm_ext.plugin import ALLOW_ANY_VERSION_ENV, check_version

    monkeypatch.delenv(ALLOW_ANY_VERSION_ENV, raising=False)
    check_version("0.32.0")
    check_version("0.32.7")
    with pytest.raises(RuntimeError, match=r"vllm version 0\.33\.1: .*supports vLLM 0\.32\.x"):
        check_version("0.33.1")
    monkeypatch.setenv(ALLOW_ANY_VERSION_ENV, "1")
    check_version("0.33.1")
