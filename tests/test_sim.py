"""The simulator: trace parsers on the shipped files, workload shaping, the instance model, and
whole-fleet runs (determinism, conservation of requests, the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slofleet.calibration import EngineCalibration, builtin_names, load_calibration
from slofleet.cli import main
from slofleet.instance import Pool
from slofleet.policies.baselines import HpaConfig, StaticAutoscaler, UtilizationAutoscaler
from slofleet.policies.global_autoscaler import ChironAutoscaler, PoolBounds
from slofleet.sim.simulator import SimConfig, Simulator, SloSpec
from slofleet.sim.sizing import peak_instances
from slofleet.sim.traces import Trace, load_trace, shape
from slofleet.sim.workload import make_batch_jobs

CAL = load_calibration("llama3-8b-h100")


# ---- traces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows", "span_s", "mean_prompt", "mean_output"),
    [
        # row counts, spans and means as recorded in slofleet/data/traces/SOURCES.md's origin note
        ("azure-code", 8819, 3435.9, 2047.8, 27.9),
        ("azure-conv", 19366, 3501.7, 1154.7, 211.1),
        ("mooncake-conv", 12031, 3537.0, 12035.1, 342.6),
    ],
)
def test_shipped_traces_parse(
    name: str, rows: int, span_s: float, mean_prompt: float, mean_output: float
) -> None:
    t = load_trace(name)
    assert len(t) == rows
    assert t.arrival_s[0] == 0.0
    assert np.all(np.diff(t.arrival_s) >= 0)
    assert t.duration_s == pytest.approx(span_s, abs=0.1)
    assert t.prompt_tokens.mean() == pytest.approx(mean_prompt, abs=0.1)
    assert t.output_tokens.mean() == pytest.approx(mean_output, abs=0.1)


def test_shipped_traces_carry_their_licenses() -> None:
    root = Path(load_trace.__code__.co_filename).parent.parent / "data" / "traces"
    names = {p.name for p in root.iterdir()}
    assert {
        "LICENSE.AzurePublicDataset.CC-BY-4.0.txt",
        "LICENSE.Mooncake.Apache-2.0.txt",
        "SOURCES.md",
    } <= names
    assert sum(p.stat().st_size for p in root.iterdir()) < 5_000_000


def test_bad_trace_files_name_the_problem(tmp_path: Path) -> None:
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="TIMESTAMP"):
        load_trace(str(bad_csv))
    bad_jsonl = tmp_path / "x.jsonl"
    bad_jsonl.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: .*output_length"):
        load_trace(str(bad_jsonl))
    with pytest.raises(ValueError, match="not shipped"):
        load_trace("no-such-trace")


def test_shaping_slices_scales_and_is_seeded() -> None:
    t = load_trace("azure-conv")
    part = shape(t, start_s=600, duration_s=600)
    assert part.duration_s < 600 and part.arrival_s[0] >= 0
    fast = shape(part, time_scale=2.0)
    assert len(fast) == len(part) and fast.duration_s == pytest.approx(part.duration_s / 2)
    big = shape(part, load_scale=3.5, seed=1)
    assert len(big) == pytest.approx(3.5 * len(part), rel=0.05)
    assert np.all(np.diff(big.arrival_s) >= 0)
    again = shape(part, load_scale=3.5, seed=1)
    assert np.array_equal(big.arrival_s, again.arrival_s)
    # the per-minute shape survives load scaling
    ratio = big.per_minute_rate()[:9] / part.per_minute_rate()[:9]
    assert np.all(np.abs(ratio - 3.5) < 0.6)


# ---- calibration ---------------------------------------------------------------------------------


def test_builtin_calibration_states_its_source() -> None:
    assert {"llama3-8b-h100", "tiny-cpu"} <= set(builtin_names())
    assert "ESTIMATE" in CAL.source
    assert "MEASURED" in load_calibration("tiny-cpu").source
    # roofline: batch-1 decode is bound by reading the weights, big batches by compute
    assert CAL.step_s(1, 0) == pytest.approx(CAL.overhead_s + CAL.weight_read_s)
    assert CAL.step_s(2048, 0) > CAL.step_s(64, 0) > 0


def test_calibration_file_errors_name_the_field(tmp_path: Path) -> None:
    data = json.loads(CAL.to_json())
    data["typo_s"] = 1
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="typo_s"):
        load_calibration(str(path))
    data.pop("typo_s")
    data["per_ctx_token_s"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="per_ctx_token_s"):
        load_calibration(str(path))


# ---- instance model ------------------------------------------------------------------------------


def one_request_trace(prompt: int, output: int) -> Trace:
    return Trace("one", np.array([0.0]), np.array([prompt]), np.array([output]))


def test_single_request_latency_follows_the_calibration() -> None:
    cfg = SimConfig(calibration=CAL, initial_replicas={Pool.MIXED: 1})
    res = Simulator(one_request_trace(1000, 101), (), StaticAutoscaler(1), cfg).run()
    # prefill of 1000 tokens in one chunk, then 100 decode steps of one sequence
    assert res.ttft[0] == pytest.approx(CAL.step_s(1000, 0), rel=1e-6)
    assert res.itl[0] == pytest.approx(CAL.step_s(1, 1001), rel=0.01)
    assert res.interactive_attainment == 1.0


def test_kv_exhaustion_preempts_and_still_finishes_everything() -> None:
    small = EngineCalibration(
        **{**json.loads(CAL.to_json()), "name": "small-kv", "kv_capacity_tokens": 20_000}
    )
    n = 60
    trace = Trace("burst", np.zeros(n), np.full(n, 300), np.full(n, 400))
    cfg = SimConfig(calibration=small, initial_replicas={Pool.MIXED: 1})
    res = Simulator(trace, (), StaticAutoscaler(1), cfg).run()
    assert res.preemptions > 0
    assert len(res.ttft) == n


# ---- fleet runs ----------------------------------------------------------------------------------


def small_run(policy_factory, seed: int = 0):
    base = shape(load_trace("azure-conv"), start_s=300, duration_s=240, load_scale=8, seed=seed)
    jobs = make_batch_jobs(
        jobs=2,
        requests_per_job=400,
        deadline_s=400,
        first_submit_s=0,
        last_submit_s=60,
        lengths_from=base,
        seed=seed,
    )
    initial = (
        {Pool.INTERACTIVE: 2, Pool.MIXED: 1}
        if isinstance(policy_factory(), ChironAutoscaler)
        else {Pool.MIXED: 3}
    )
    cfg = SimConfig(calibration=CAL, slo=SloSpec(1.0, 0.1), initial_replicas=initial)
    return base, jobs, Simulator(base, jobs, policy_factory(), cfg).run()


def test_simulation_is_deterministic() -> None:
    _, _, a = small_run(ChironAutoscaler)
    _, _, b = small_run(ChironAutoscaler)
    assert np.array_equal(a.ttft, b.ttft) and np.array_equal(a.itl, b.itl)
    assert a.gpu_hours == b.gpu_hours
    assert a.scale_events == b.scale_events
    _, _, c = small_run(ChironAutoscaler, seed=1)
    assert not np.array_equal(a.ttft, c.ttft)


@pytest.mark.parametrize("factory", [ChironAutoscaler, lambda: StaticAutoscaler(3)])
def test_every_request_is_served_exactly_once(factory) -> None:
    base, jobs, res = small_run(factory)
    assert len(res.ttft) == len(base) == res.interactive_total
    assert res.batch_unfinished == 0 and res.batch_total == sum(len(j) for j in jobs)
    assert np.all(res.ttft > 0) and np.all(res.itl >= 0)
    assert res.gpu_hours > 0
    assert res.migrations == 0


def test_chiron_keeps_batch_on_time_and_records_reasons() -> None:
    _, _, res = small_run(ChironAutoscaler)
    assert res.batch_on_time_fraction == 1.0
    assert res.scale_events and all(reason for *_, reason in res.scale_events)


def test_cli_prints_the_comparison_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "simulate", "--trace", "azure-conv", "--start", "600", "--duration", "120",
            "--load-scale", "4", "--capacity-rps", "16", "--batch-jobs", "1", "--batch-requests", "100",
            "--batch-deadline", "300", "--policy", "all", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("static-peak", "hpa-utilization", "keda-queue", "llumnix-freeness", "chiron"):
        assert name in out
        assert (tmp_path / f"sim_{name}.png").stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["policy"] == "static-peak" and rows[0]["gpu_hours_vs_static"] == 1.0


def test_cli_rejects_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--policy", "magic", "--capacity-rps", "1"]) == 2
    assert "magic" in capsys.readouterr().err


def test_dispatch_index_gives_the_same_choices_as_dispatch_over_the_whole_fleet() -> None:
    """The simulator answers the freeness dispatch from its incremental index; that must not change
    a single decision against `dispatch.choose` over every instance."""
    base = shape(load_trace("azure-conv"), start_s=900, duration_s=90, load_scale=10, seed=3)
    results = []
    for indexed in (True, False):
        cfg = SimConfig(calibration=CAL, initial_replicas={Pool.MIXED: 8}, dispatch_index=indexed)
        results.append(Simulator(base, (), StaticAutoscaler(8), cfg).run())
    assert np.array_equal(results[0].ttft, results[1].ttft)
    assert np.array_equal(results[0].itl, results[1].itl)


# Metrics of fixed seeded runs as the simulator produced them before its speed-ups (commit 225b6a1):
# optimizations of the event loop must not change a single result.
PINNED = {
    "static": (7574, 7574, 1600, 0, 0, 1.0, 534.49443939278, 101.3944914618832),
    "static-small-kv": (7574, 4496, 1600, 3421, 0, 1.0, 82765.37209448376, 92.07529043380397),
    "hpa": (7574, 3894, 1600, 0, 3, 2.9138888888888888, 31087.383581889902, 197.41273369798543),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_results_are_pinned_across_simulator_optimizations(name: str) -> None:
    base = shape(load_trace("azure-conv"), start_s=300, duration_s=120)
    trace = shape(base, load_scale=14.0, seed=3)
    jobs = make_batch_jobs(
        jobs=2, requests_per_job=800, deadline_s=300, first_submit_s=0, last_submit_s=60,
        lengths_from=base, seed=1,
    )  # fmt: skip
    cal = (
        EngineCalibration(**{**json.loads(CAL.to_json()), "kv_capacity_tokens": 30_000})
        if "kv" in name
        else CAL
    )
    policy, initial = (
        (UtilizationAutoscaler("running", 20.0, HpaConfig(bounds=PoolBounds(1, 30))), 4)
        if name == "hpa"
        else (StaticAutoscaler(10), 10)
    )
    r = Simulator(
        trace, jobs, policy, SimConfig(calibration=cal, initial_replicas={Pool.MIXED: initial})
    ).run()
    got = (r.interactive_total, r.interactive_met, r.batch_on_time, r.preemptions, len(r.scale_events))
    assert got == PINNED[name][:5]
    assert r.gpu_hours == pytest.approx(PINNED[name][5], rel=1e-12)
    assert float(r.ttft.sum()) == pytest.approx(PINNED[name][6], rel=1e-12)
    assert float(r.itl.sum()) == pytest.approx(PINNED[name][7], rel=1e-12)


def test_static_is_sized_for_the_busiest_window_with_a_batch_partition() -> None:
    """The busiest 10 s of a bursty trace run above its busiest minute, and batch work gets its
    own instances: that is the fleet that holds the SLO at the peak."""
    t = np.concatenate([np.linspace(0, 60, 120, endpoint=False), 60 + np.linspace(0, 5, 100, endpoint=False)])
    trace = Trace("burst", t, np.full(len(t), 100), np.full(len(t), 10))
    jobs = make_batch_jobs(
        jobs=1, requests_per_job=100, deadline_s=100, first_submit_s=0, last_submit_s=0, lengths_from=trace
    )
    minute = peak_instances(trace, jobs, capacity_rps=2.0, window_s=60.0)
    peak = peak_instances(trace, jobs, capacity_rps=2.0)
    assert peak.interactive_peak_rps == pytest.approx(10.0)  # 100 requests in the 10 s from 60 s
    assert minute.interactive_peak_rps == pytest.approx(2.0)
    assert peak.batch_instances == 1 and peak.instances == 5 + 1 > minute.instances
