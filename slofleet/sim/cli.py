"""`slofleet simulate`: replay a trace through the fleet policies and print the comparison.

    slofleet simulate --trace azure-conv --policy all --peak-instances 50 \
        --batch-jobs 4 --batch-requests 20000 --batch-deadline 3600 --out sim-out/

`--migration` adds Llumnix's live migration (the rescheduler's policy at every control tick, and
drain by migration before a scale-in) to every policy's run.

`--calibrate-cpu URL` instead measures a running vLLM server (the local CPU engine) and writes a
calibration JSON that `--calibration FILE` then uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slofleet.policies.migration import MigrationConfig, Strategy


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        default="azure-conv",
        help="shipped trace (azure-conv, azure-code, mooncake-conv) or a .csv/.jsonl path",
    )
    parser.add_argument(
        "--policy",
        default="all",
        help="all, or comma-separated: static-peak,hpa-utilization,keda-queue,llumnix-freeness,chiron",
    )
    parser.add_argument("--calibration", default="llama3-8b-h100", help="built-in name or JSON file")
    parser.add_argument("--start", type=float, default=0.0, help="slice start, seconds into the trace")
    parser.add_argument("--duration", type=float, default=None, help="slice length, seconds (trace time)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="replay N times faster")
    parser.add_argument("--load-scale", type=float, default=1.0, help="multiply the request rate by N")
    parser.add_argument(
        "--peak-instances",
        type=int,
        default=0,
        help="choose --load-scale so that the busiest minute needs N instances",
    )
    parser.add_argument("--batch-jobs", type=int, default=0, help="synthetic batch jobs to mix in")
    parser.add_argument("--batch-requests", type=int, default=1000, help="requests per batch job")
    parser.add_argument("--batch-deadline", type=float, default=3600.0, help="seconds after submission")
    parser.add_argument(
        "--batch-last-submit",
        type=float,
        default=None,
        help="jobs are submitted evenly from 0 to this time (default: trace end - deadline, at least 0)",
    )
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="interactive TTFT SLO, seconds")
    parser.add_argument("--itl-slo", type=float, default=0.1, help="interactive ITL SLO, seconds")
    parser.add_argument("--static-replicas", type=int, default=0, help="override the peak estimate")
    parser.add_argument("--max-replicas", type=int, default=0, help="per-pool cap (default 2x static)")
    parser.add_argument(
        "--capacity-rps",
        type=float,
        default=0.0,
        help="skip the capacity probe: one instance's req/s within the SLO",
    )
    parser.add_argument(
        "--concurrency",
        type=float,
        default=0.0,
        help="with --capacity-rps: requests in flight per instance at that rate",
    )
    parser.add_argument("--hpa-metric", choices=("kv", "running"), default="running")
    parser.add_argument(
        "--hpa-target",
        type=float,
        default=0.0,
        help="0: 0.8 x the concurrency at capacity (running) or 0.7 (kv)",
    )
    parser.add_argument("--keda-target", type=float, default=10.0, help="waiting requests per replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kunserve",
        action="store_true",
        help="simulate KunServe's parameter drop: instances out of KV memory form pipeline groups "
        "(needs a calibration with layer_weight_bytes, kv_bytes_per_token and num_layers)",
    )
    parser.add_argument(
        "--migration",
        action="store_true",
        help="simulate Llumnix live migration: rebalancing at every control tick, drain by migration",
    )
    parser.add_argument(
        "--migration-strategy",
        choices=[s.value for s in Strategy],
        default=Strategy.SHORTEST.value,
        help="which running request a source gives up (with --migration)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write results.json and PNG plots here")
    parser.add_argument(
        "--calibrate-cpu",
        metavar="URL",
        default=None,
        help="measure the vLLM server at URL and print a calibration JSON (no simulation)",
    )
    parser.add_argument("--calibrate-out", type=Path, default=None, help="with --calibrate-cpu: write here")


def run(args: argparse.Namespace) -> int:
    if args.calibrate_cpu:
        from slofleet.sim.calibrate import measure_server

        cal = measure_server(args.calibrate_cpu, progress=lambda m: print(m, file=sys.stderr))
        text = cal.to_json()
        if args.calibrate_out:
            args.calibrate_out.write_text(text)
        print(text)
        return 0

    from slofleet.calibration import load_calibration
    from slofleet.sim import experiment, report
    from slofleet.sim.kunserve import KunServeConfig
    from slofleet.sim.simulator import SloSpec
    from slofleet.sim.sizing import instance_capacity
    from slofleet.sim.traces import load_trace, shape
    from slofleet.sim.workload import make_batch_jobs

    names = list(experiment.POLICIES) if args.policy == "all" else args.policy.split(",")
    for n in names:
        if n not in experiment.POLICIES:
            print(
                f"--policy: unknown {n!r}; choose from {', '.join(experiment.POLICIES)} or all",
                file=sys.stderr,
            )
            return 2
    try:
        cal = load_calibration(args.calibration)
        raw = load_trace(args.trace)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slo = SloSpec(args.ttft_slo, args.itl_slo)
    base = shape(
        raw, start_s=args.start, duration_s=args.duration, time_scale=args.time_scale, seed=args.seed
    )
    capacity, concurrency = args.capacity_rps, args.concurrency
    if not capacity or not concurrency:
        capacity, concurrency = instance_capacity(base, cal, slo, seed=args.seed)
    load_scale = args.load_scale
    if args.peak_instances:
        load_scale = args.peak_instances * capacity / float(base.per_minute_rate().max())
    trace = shape(base, load_scale=load_scale, seed=args.seed)
    last = args.batch_last_submit
    if last is None:
        last = max(0.0, trace.duration_s - args.batch_deadline)
    jobs = make_batch_jobs(
        jobs=args.batch_jobs, requests_per_job=args.batch_requests, deadline_s=args.batch_deadline,
        first_submit_s=0.0, last_submit_s=last, lengths_from=base, seed=args.seed,
    )  # fmt: skip
    exp = experiment.Experiment(
        trace=trace, jobs=jobs, calibration=cal, slo=slo, capacity_rps=capacity,
        concurrency_at_capacity=concurrency,
        static_replicas=args.static_replicas, max_replicas=args.max_replicas,
        hpa_metric=args.hpa_metric, hpa_target=args.hpa_target, keda_target=args.keda_target,
        kunserve=KunServeConfig() if args.kunserve else None,
        migration=MigrationConfig(strategy=Strategy(args.migration_strategy)) if args.migration else None,
    )  # fmt: skip
    print(
        f"trace {raw.name}: {len(trace)} interactive requests over {trace.duration_s / 60:.1f} min "
        f"(load x{load_scale:.2f}, time x{args.time_scale}); batch: {len(jobs)} jobs x "
        f"{args.batch_requests} requests, deadline {args.batch_deadline:.0f} s; calibration {cal.name}; "
        f"SLO TTFT {slo.ttft_s} s, ITL {slo.itl_s * 1e3:.0f} ms"
        + (f"; live migration ({args.migration_strategy})" if args.migration else ""),
        flush=True,
    )
    peak, results = experiment.run(exp, names, progress=lambda m: print(m, flush=True))
    print(report.table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps(
                {"peak": peak.describe(), "load_scale": load_scale, "rows": report.rows(results)}, indent=2
            )
        )
        for path in report.plot(results, args.out):
            print(f"wrote {path}")
    return 0
