"""The issue-8 target experiment: the Azure conversation trace scaled so that its busiest minute
needs >= 50 instances, a batch workload mixed in, every policy in the same run.

Policies run in parallel processes (one per policy; each simulation is single-threaded), so the
wall time is that of the slowest policy. Prints the comparison table with GPU-hours relative to
static peak provisioning measured in the same run, and whether Chiron meets the targets
(interactive attainment >= 99 %, batch on time >= 99 %, >= 30 % fewer GPU-hours than static).

    python bench/sim_target.py --out /tmp/sim-target
    python bench/sim_target.py --duration 1200 --chiron target_fill=0.85   # a variant
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

from slofleet.calibration import load_calibration
from slofleet.policies.global_autoscaler import ChironConfig
from slofleet.policies.local_autoscaler import LocalAutoscalerConfig
from slofleet.sim import experiment, report
from slofleet.sim.simulator import SloSpec
from slofleet.sim.sizing import instance_capacity, peak_instances
from slofleet.sim.traces import load_trace, shape
from slofleet.sim.workload import make_batch_jobs


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default="azure-conv")
    p.add_argument("--calibration", default="llama3-8b-h100")
    p.add_argument("--duration", type=float, default=None, help="trace seconds (default: all)")
    p.add_argument("--peak-instances", type=int, default=50)
    p.add_argument("--batch-jobs", type=int, default=6)
    p.add_argument("--batch-requests", type=int, default=40000)
    p.add_argument("--batch-deadline", type=float, default=3000.0)
    p.add_argument("--batch-last-submit", type=float, default=600.0)
    p.add_argument("--policies", default=",".join(experiment.POLICIES))
    p.add_argument("--chiron", action="append", default=[], help="ChironConfig override key=value")
    p.add_argument("--local", action="append", default=[], help="LocalAutoscalerConfig override key=value")
    p.add_argument(
        "--local-window", type=float, default=5.0, help="seconds of latency the local autoscaler sees"
    )
    p.add_argument("--capacity-rps", type=float, default=0.0)
    p.add_argument("--concurrency", type=float, default=0.0)
    p.add_argument(
        "--jitter", type=float, default=1.0, help="seconds over which copies of a scaled request spread"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    cal = load_calibration(args.calibration)
    slo = SloSpec()
    base = shape(load_trace(args.trace), duration_s=args.duration, seed=args.seed)
    cap, conc = args.capacity_rps, args.concurrency
    if not cap or not conc:
        cap, conc = instance_capacity(base, cal, slo, seed=args.seed)
    load_scale = args.peak_instances * cap / float(base.per_minute_rate().max())
    trace = shape(base, load_scale=load_scale, jitter_s=args.jitter, seed=args.seed)
    jobs = make_batch_jobs(
        jobs=args.batch_jobs, requests_per_job=args.batch_requests, deadline_s=args.batch_deadline,
        first_submit_s=0.0, last_submit_s=args.batch_last_submit, lengths_from=base, seed=args.seed,
    )  # fmt: skip
    chiron = ChironConfig()
    for kv in args.chiron:
        key, _, value = kv.partition("=")
        chiron = replace(chiron, **{key: type(getattr(chiron, key))(value)})
    local = LocalAutoscalerConfig(ttft_slo_s=slo.ttft_s, itl_slo_s=slo.itl_s, max_limit=cal.max_num_seqs)
    for kv in args.local:
        key, _, value = kv.partition("=")
        local = replace(local, **{key: type(getattr(local, key))(value)})
    exp = experiment.Experiment(
        trace=trace, jobs=jobs, calibration=cal, slo=slo, capacity_rps=cap,
        concurrency_at_capacity=conc, chiron=chiron, local_autoscaler=local, local_window_s=args.local_window,
    )  # fmt: skip
    return exp, load_scale


def one(args_and_name: tuple[list[str], str]):
    argv, name = args_and_name
    exp, _ = build(parse_args(argv))
    peak = peak_instances(exp.trace, exp.jobs, exp.capacity_rps, exp.concurrency_at_capacity)
    _, results = experiment.run(exp, [name], peak=peak)
    return results[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    exp, load_scale = build(args)
    if not args.capacity_rps:
        argv = [
            *argv,
            "--capacity-rps",
            repr(exp.capacity_rps),
            "--concurrency",
            repr(exp.concurrency_at_capacity),
        ]
    peak = peak_instances(exp.trace, exp.jobs, exp.capacity_rps, exp.concurrency_at_capacity)
    print(
        f"trace {args.trace} x{load_scale:.2f}: {len(exp.trace)} interactive requests, "
        f"{sum(len(j) for j in exp.jobs)} batch in {len(exp.jobs)} jobs "
        f"(deadline {args.batch_deadline:.0f} s); "
        f"{peak.describe()}",
        flush=True,
    )
    names = args.policies.split(",")
    with mp.get_context("fork").Pool(len(names)) as pool:
        results = pool.map(one, [(argv, n) for n in names])
    print(report.table(results))
    rows = report.rows(results)
    ours = next((r for r in rows if r["policy"] == "chiron"), None)
    if ours is not None and "static-peak" in names:
        ok = (
            ours["interactive_attainment"] >= 0.99
            and ours["batch_on_time"] >= 0.99
            and ours["gpu_hours_vs_static"] <= 0.70
        )
        print(
            f"chiron: interactive {ours['interactive_attainment']:.2%}, "
            f"batch on time {ours['batch_on_time']:.2%}, "
            f"GPU-hours {ours['gpu_hours_vs_static']:.2f}x static -> targets {'MET' if ok else 'NOT met'}"
        )
    print(f"total wall {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps(
                {"argv": argv, "peak": peak.describe(), "load_scale": load_scale, "rows": rows}, indent=2
            )
        )
        report.plot(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
