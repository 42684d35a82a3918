"""Sidecar pieces without an engine: metrics page parsing, windowed rates/percentiles, state,
request validation. The engine-backed behaviour is in test_sidecar_engine.py."""

from __future__ import annotations

import asyncio
import math
import os

import pytest

from slofleet.api.v1 import sidecar_pb2 as pb
from slofleet.instance import RequestClass, RequestInfo
from slofleet.policies.local_autoscaler import LocalAutoscalerConfig
from slofleet.sidecar.enginemetrics import EngineMetricsError, EngineSample, Histogram, parse_engine_metrics
from slofleet.sidecar.local_limit import LocalLimitController
from slofleet.sidecar.service import (
    InvalidArgument,
    SidecarService,
    request_from_pb,
    validate_drain_timeout,
    validate_limit,
    validate_watch_interval,
)
from slofleet.sidecar.state import SidecarState
from slofleet.sidecar.window import SampleWindow, histogram_quantile

LABELS = 'engine="0",model_name="m"'


def page(running=3, waiting=1, usage=0.25, prompt=100.0, gen=50.0, ttft=(0, 2, 4, 4), blocks=1000) -> str:
    """A vLLM-shaped /metrics page (names, labels and families as vLLM 0.32 writes them)."""
    bounds = ("0.1", "0.5", "1.0", "+Inf")
    lines = [
        "# HELP python_gc_objects_collected_total noise",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 5.0',
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{LABELS}}} {running}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{LABELS}}} {waiting}",
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        f'vllm:num_requests_waiting_by_reason{{{LABELS},reason="capacity"}} 99',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{LABELS}}} {usage}",
        "# TYPE vllm:prompt_tokens counter",
        f"vllm:prompt_tokens_total{{{LABELS}}} {prompt}",
        f"vllm:prompt_tokens_created{{{LABELS}}} 1.7e9",
        "# TYPE vllm:prompt_tokens_by_source counter",
        f'vllm:prompt_tokens_by_source_total{{{LABELS},source="local_compute"}} 12345',
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{LABELS}}} {gen}",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{LABELS}}} 2",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        *(
            f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="{b}"}} {c}'
            for b, c in zip(bounds, ttft, strict=True)
        ),
        f"vllm:time_to_first_token_seconds_count{{{LABELS}}} {ttft[-1]}",
        f"vllm:time_to_first_token_seconds_sum{{{LABELS}}} 1.0",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="{blocks}"}} 1.0',
    ]
    return "\n".join(lines) + "\n"


def test_parse_reads_exactly_the_families_it_needs():
    s = parse_engine_metrics(page())
    assert (s.running_requests, s.waiting_requests, s.kv_usage_fraction) == (3, 1, 0.25)
    assert (s.num_gpu_blocks, s.block_size_tokens) == (1000, 16)
    assert (s.prompt_tokens_total, s.generation_tokens_total, s.preemptions_total) == (100, 50, 2)
    assert s.ttft.upper_bounds == (0.1, 0.5, 1.0, math.inf) and s.ttft.cumulative_counts == (0, 2, 4, 4)
    assert s.itl.count == 0  # absent family: empty histogram, not an error


@pytest.mark.parametrize(
    "drop", ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"]
)
def test_parse_names_a_missing_family(drop):
    text = "\n".join(line for line in page().splitlines() if drop not in line) + "\n"
    with pytest.raises(EngineMetricsError, match=drop):
        parse_engine_metrics(text)


def test_parse_rejects_garbage_with_a_value_error():
    with pytest.raises(ValueError):
        parse_engine_metrics("<html>502 Bad Gateway</html>")


def test_histogram_quantile_interpolates_like_prometheus():
    bounds = (0.1, 0.5, 1.0, math.inf)
    assert histogram_quantile(0.5, bounds, (0, 2, 4, 4)) == pytest.approx(0.5)
    assert histogram_quantile(0.25, bounds, (0, 2, 4, 4)) == pytest.approx(0.3)
    assert histogram_quantile(0.99, bounds, (0, 0, 0, 3)) == 1.0  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, bounds, (0, 0, 0, 0)) == 0.0


def sample(prompt: float, gen: float, ttft: tuple[float, ...]) -> EngineSample:
    h = Histogram((0.1, 0.5, 1.0, math.inf), ttft)
    return EngineSample(1, 0, 0.1, 100, 16, 0, prompt, gen, h, Histogram((math.inf,), (0.0,)))


def test_window_rates_and_percentiles_use_deltas_not_totals():
    w = SampleWindow(rate_seconds=10, latency_seconds=60)
    # Before the window: many slow first tokens (all in the 1.0 bucket).
    w.add(0.0, sample(1000, 500, (0, 0, 100, 100)))
    w.add(5.0, sample(1500, 1000, (0, 0, 100, 100)))
    # Within it: 10 fast ones.
    w.add(10.0, sample(2000, 1500, (10, 10, 110, 110)))
    st = w.stats()
    assert st.prompt_tokens_per_second == pytest.approx(100.0)
    assert st.generation_tokens_per_second == pytest.approx(100.0)
    assert st.ttft_p50_seconds == pytest.approx(0.05)  # only the 10 new observations count


def test_parse_reads_each_requests_mean_itl():
    text = (
        page()
        + "# TYPE vllm:request_time_per_output_token_seconds histogram\n"
        + "".join(
            f'vllm:request_time_per_output_token_seconds_bucket{{{LABELS},le="{b}"}} {c}\n'
            for b, c in (("0.05", 3), ("0.1", 9), ("+Inf", 10))
        )
    )
    s = parse_engine_metrics(text)
    assert s.tpot.upper_bounds == (0.05, 0.1, math.inf) and s.tpot.cumulative_counts == (3, 9, 10)


def test_local_limit_reads_the_slos_itl_not_one_stalled_token():
    """A host stall makes single tokens slow (per-token ITL p99 0.8 s) while every request's mean
    ITL stays at 40 ms, under the 100 ms SLO: the controller must not cut the limit."""
    bounds = (0.05, 0.1, 1.0, math.inf)
    state = SidecarState("i", concurrency_limit=8)
    ctl = LocalLimitController(
        state, LocalAutoscalerConfig(initial_limit=8, itl_slo_s=0.1, ttft_slo_s=5.0), window_seconds=5.0
    )
    for i in range(6):
        n = 10.0 * i
        stalled_tokens = Histogram(bounds, (0.9 * n * 50, 0.95 * n * 50, n * 50, n * 50))
        mean_itl = Histogram(bounds, (n, n, n, n))
        ctl.observe(
            float(i),
            EngineSample(8, 0, 0.3, 100, 16, 0, 100.0 * i, 500.0 * i,
                         Histogram(bounds, (n, n, n, n)), stalled_tokens, mean_itl),
        )  # fmt: skip
    assert state.window is not ctl.window and ctl.window.stats().itl_p99_seconds > 0.5
    assert state.concurrency_limit >= 8, ctl.policy_state.reason


def test_window_restarts_when_engine_counters_reset():
    w = SampleWindow(rate_seconds=10, latency_seconds=60)
    w.add(0.0, sample(5000, 5000, (0, 0, 10, 10)))
    w.add(1.0, sample(10, 10, (0, 0, 0, 0)))  # engine restarted
    assert len(w) == 1
    w.add(2.0, sample(20, 30, (1, 1, 1, 1)))
    assert w.stats().prompt_tokens_per_second == pytest.approx(10.0)


def test_window_drops_old_samples_but_spans_the_horizon():
    w = SampleWindow(rate_seconds=1, latency_seconds=2)
    for i in range(100):
        w.add(i * 0.1, sample(i, i, (0, 0, 0, 0)))
    assert len(w) <= 23


def info(rid: str, **kw) -> RequestInfo:
    return RequestInfo(rid, RequestClass.BATCH, kw.get("priority", 0), kw.get("prompt", 10), 20, 0)


def test_state_snapshot_counts_engine_and_reported_requests():
    st = SidecarState("i", concurrency_limit=8)
    assert not st.snapshot.healthy and st.snapshot.freeness == -math.inf
    st.observe(parse_engine_metrics(page(running=2, waiting=0, usage=0.5, blocks=100)))
    s = st.snapshot
    assert s.healthy and (s.kv_total_blocks, s.kv_free_blocks) == (100, 50)
    assert s.freeness == pytest.approx((100 - 50) / 2)
    st.request_admitted(info("a"))
    st.request_admitted(info("b"))
    st.request_admitted(info("c", prompt=16 * 4))  # queued head: 4 blocks
    st.requests_reported()
    assert st.snapshot.freeness == pytest.approx((100 - 50 - 4) / 2)
    st.request_finished("c")
    st.requests_reported()
    assert [r.request_id for r in st.snapshot.requests] == ["a", "b"]


async def test_reported_requests_reach_the_load_while_the_report_stream_stays_open():
    """The gateway keeps one ReportRequests stream open per sidecar for as long as it runs; a
    request it reports must show in Load (what the rescheduler picks migrations from) at once, not
    when the stream closes or at the next engine scrape."""
    st = SidecarState("i", concurrency_limit=8)
    st.observe(parse_engine_metrics(page(running=0, waiting=0, usage=0.0, blocks=100)))
    service = SidecarService(st, engine_url="http://engine")
    sent, release = asyncio.Event(), asyncio.Event()

    async def events():
        for rid in ("r1", "r2"):
            yield pb.RequestEvent(
                kind=pb.RequestEvent.KIND_ADMITTED,
                request=pb.RequestInfo(
                    request_id=rid, request_class=pb.REQUEST_CLASS_INTERACTIVE, prompt_tokens=10,
                    max_tokens=20,
                ),
            )  # fmt: skip
        sent.set()
        await release.wait()
        yield pb.RequestEvent(kind=pb.RequestEvent.KIND_FINISHED, request=pb.RequestInfo(request_id="r1"))
        sent.set()
        await release.wait()

    stream = asyncio.create_task(service.ReportRequests(events(), None))
    await asyncio.wait_for(sent.wait(), 5)
    for _ in range(3):
        await asyncio.sleep(0)
    assert [r.request_id for r in st.snapshot.requests] == ["r1", "r2"]
    sent.clear()
    release.set()
    await asyncio.wait_for(sent.wait(), 5)
    for _ in range(3):
        await asyncio.sleep(0)
    assert [r.request_id for r in st.snapshot.requests] == ["r2"]
    reply = await asyncio.wait_for(stream, 5)
    assert reply.events_accepted == 3


def test_state_publishes_changes_not_drift():
    st = SidecarState("i", concurrency_limit=8)
    st.observe(parse_engine_metrics(page(prompt=1)))
    v = st.version
    st.observe(parse_engine_metrics(page(prompt=2)))  # throughput drift only
    assert st.version == v
    st.observe(parse_engine_metrics(page(running=4)))
    assert st.version == v + 1
    st.set_draining(True)
    assert st.version == v + 2 and st.snapshot.freeness == -math.inf


def test_state_expires_requests_the_gateway_never_finished():
    st = SidecarState("i", concurrency_limit=8, request_ttl_seconds=10)
    st.request_admitted(info("old"), now=0.0)
    st.request_admitted(info("new"), now=5.0)
    st.observe(parse_engine_metrics(page()), now=12.0)
    assert [r.request_id for r in st.snapshot.requests] == ["new"]


@pytest.mark.parametrize("limit", [0, -1, 100_001, 2**31 - 1])
def test_limit_out_of_range_names_the_field(limit):
    with pytest.raises(InvalidArgument, match=r"^concurrency_limit: "):
        validate_limit(pb.SetLimitsRequest(concurrency_limit=limit))


@pytest.mark.parametrize("t", [-1.0, math.nan, math.inf, 1e9])
def test_drain_timeout_out_of_range_names_the_field(t):
    with pytest.raises(InvalidArgument, match=r"^timeout_seconds: "):
        validate_drain_timeout(pb.DrainRequest(timeout_seconds=t))


@pytest.mark.parametrize("ms", [-5, 1, 9, 3_600_001])
def test_watch_interval_out_of_range_names_the_field(ms):
    with pytest.raises(InvalidArgument, match=r"^interval_milliseconds: "):
        validate_watch_interval(pb.WatchLoadRequest(interval_milliseconds=ms), 1.0)
    assert validate_watch_interval(pb.WatchLoadRequest(), 1.5) == 1.5


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (pb.RequestInfo(request_class=pb.REQUEST_CLASS_BATCH, prompt_tokens=3), "request_id"),
        (pb.RequestInfo(request_id="x" * 300, request_class=1, prompt_tokens=3), "request_id"),
        (pb.RequestInfo(request_id="r", prompt_tokens=3), "request_class"),
        (pb.RequestInfo(request_id="r", request_class=1, prompt_tokens=0), "prompt_tokens"),
        (pb.RequestInfo(request_id="r", request_class=1, prompt_tokens=3, max_tokens=-1), "max_tokens"),
        (
            pb.RequestInfo(request_id="r", request_class=1, prompt_tokens=3, generated_tokens=-2),
            "generated_tokens",
        ),
    ],
)
def test_request_info_validation_names_the_field(msg, field):
    with pytest.raises(InvalidArgument, match=rf"^events\[0\]\.request\.{field}: "):
        request_from_pb(msg, "events[0].request")


async def test_engine_reader_falls_back_to_the_full_page_when_the_filter_is_not_served():
    from aiohttp import web

    from slofleet.sidecar.engine import FILTERED_METRICS_PATH, EngineError, VllmEngine

    served = {"full": page(running=5), "filtered": None}

    async def metrics(request: web.Request) -> web.Response:
        body = served["filtered"] if request.path == "/metrics/" else served["full"]
        return web.Response(text=body) if body is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/metrics/", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    engine = VllmEngine(f"http://127.0.0.1:{port}")
    await engine.start()
    try:
        assert engine.metrics_path == FILTERED_METRICS_PATH
        assert (await engine.scrape()).running_requests == 5
        assert engine.metrics_path == "/metrics"
        served["full"] = "<html>502</html>"
        with pytest.raises(EngineError, match="/metrics"):
            await engine.scrape()
    finally:
        await engine.close()
        await runner.cleanup()


def test_expected_token_follows_its_file(tmp_path):
    from slofleet.sidecar.service import ExpectedToken

    path = tmp_path / "token"
    path.write_text("one\n")
    token = ExpectedToken("one", path, check_seconds=0)
    assert token.header() == b"Bearer one"
    path.write_text("two\n")
    os.utime(path, ns=(1, 10**18))  # a rotation: new content, new mtime
    assert token.header() == b"Bearer two"
    path.write_text("")
    os.utime(path, ns=(1, 2 * 10**18))
    assert token.header() == b"Bearer two"  # an empty file never opens the door
    path.unlink()
    assert token.header() == b"Bearer two"
    with pytest.raises(ValueError, match="token"):
        ExpectedToken("")
