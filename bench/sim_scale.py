"""Simulator speed at 1,000 instances (issue 8: "one hour of trace for 1,000 instances in <= 60 s
on one core").

Rows (one process, one core, run one after another; CPU time of this process):
- `50-inst baseline`: the target experiment's scale (azure-conv, busiest minute needs 50
  instances), a `--slice` of trace time from `--start`; the reference cost per simulated request.
- `1000-inst full load`: the trace scaled so its busiest minute needs 1,000 instances, same slice.
  The hour is projected by request count (CPU per request x the requests of the whole scaled
  hour, about 33 M): the cost is per request, and a slice from the start of the trace would
  under-project, its first minutes carry half the hour's mean rate.
- `1000-inst, 1 h, light`: 1,000 instances for the whole hour at `--light` of the full load, run
  for real: what the fleet-size-dependent costs (local and control ticks over 1,000 instances,
  dispatch index upkeep) amount to when requests are few.
Policy: static (fixed fleet, so every row simulates exactly the instances it names) and chiron
for the 1,000-instance full-load row.

    python bench/sim_scale.py            # --start 1800 --slice 20 --light 0.01
    python bench/sim_scale.py --full-hour    # the 1,000-instance full-load hour for real (long)
"""

from __future__ import annotations

import argparse
import sys
import time

from slofleet.calibration import load_calibration
from slofleet.instance import Pool
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.global_autoscaler import ChironAutoscaler
from slofleet.sim.simulator import SimConfig, Simulator
from slofleet.sim.traces import load_trace, shape

CAPACITY_RPS = 14.41  # one instance within the SLO (llama3-8b-h100, azure-conv mix; sim_target prints it)


def run(
    name: str, instances: int, load_factor: float, start: float, duration: float | None, chiron: bool
) -> dict[str, float]:
    full = shape(load_trace("azure-conv"))
    scale = load_factor * instances * CAPACITY_RPS / float(full.per_minute_rate().max())
    trace = shape(shape(load_trace("azure-conv"), start_s=start, duration_s=duration), load_scale=scale)
    hour_requests = len(full) * scale
    cal = load_calibration("llama3-8b-h100")
    if chiron:
        policy = ChironAutoscaler()
        initial = {Pool.INTERACTIVE: int(instances * 0.65), Pool.MIXED: instances - int(instances * 0.65)}
    else:
        policy = StaticAutoscaler(instances)
        initial = {Pool.MIXED: instances}
    cfg = SimConfig(calibration=cal, initial_replicas=initial, horizon_s=duration or 0.0)
    t0 = time.process_time()
    res = Simulator(trace, [], policy, cfg).run()
    cpu = time.process_time() - t0
    return {
        "name": name,
        "instances": instances,
        "requests": len(trace),
        "trace_s": trace.duration_s,
        "cpu_s": cpu,
        "us_per_request": cpu / len(trace) * 1e6,
        "hour_requests": hour_requests,
        "projected_hour_s": cpu / len(trace) * hour_requests,
        "attainment": res.interactive_attainment,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=float, default=1800.0, help="trace second the full-load slices start at")
    p.add_argument("--slice", type=float, default=20.0, help="trace seconds for the full-load rows")
    p.add_argument("--light", type=float, default=0.01, help="load of the 1-hour row, fraction of full")
    p.add_argument(
        "--full-hour", action="store_true", help="only the 1,000-instance full load, the whole hour for real"
    )
    args = p.parse_args(argv)
    specs = (
        [("1000-inst full load, 1 h", 1000, 1.0, 0.0, None, False)]
        if args.full_hour
        else [
            ("50-inst baseline", 50, 1.0, args.start, args.slice, False),
            ("1000-inst full load", 1000, 1.0, args.start, args.slice, False),
            (f"1000-inst, 1 h, {args.light:g} load", 1000, args.light, 0.0, None, False),
            ("1000-inst full, chiron", 1000, 1.0, args.start, args.slice, True),
        ]
    )
    print(
        f"{'row':<24} {'inst':>5} {'requests':>9} {'trace s':>8} {'CPU s':>7} {'us/req':>7} "
        f"{'vs base':>7} {'hour reqs':>10} {'1 h proj. s':>11} {'SLO':>7}",
        flush=True,
    )
    base = 0.0
    for spec in specs:
        r = run(*spec)
        base = base or r["us_per_request"]
        print(
            f"{r['name']:<24} {r['instances']:>5} {r['requests']:>9} {r['trace_s']:>8.0f} {r['cpu_s']:>7.1f} "
            f"{r['us_per_request']:>7.1f} {r['us_per_request'] / base:>7.2f} {r['hour_requests']:>10.3g} "
            f"{r['projected_hour_s']:>11.0f} {r['attainment']:>7.2%}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
