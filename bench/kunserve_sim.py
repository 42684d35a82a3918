"""KunServe's pipeline mode in the simulator at cluster scale (issue 10, benchmark, second half):
plain vLLM queueing against the memory planner's parameter drop and against Llumnix's live
migration, same trace, same fleet, one run.

The engine costs are the Llama-3-8B / H100 calibration (`llama3-8b-h100`, an estimate; its
`layer_weight_bytes` and `kv_bytes_per_token` give the capacity a drop gains, and
`slofleet.sim.kunserve` the pipeline's step and transition costs). A static fleet without a local
concurrency limit, so a burst queues in the engines (vLLM's behaviour) where the planner sees it.
Rows:
- full KV (452k tokens per H100): the calibration as it is;
- tight KV (`--tight-kv` tokens, default 45k: the KV an 8B keeps at a GPU memory share of about
  0.3, or on a 24 GB card): the memory-bound regime the mode is for.

Modes, per row: `plain` (vLLM queueing), `kunserve` (the memory planner), `migration` (Llumnix
live migration only: the rescheduler's policy at every control tick, `slofleet.sim.migration`'s
copy and downtime costs) and `mig+kunserve` (both). `cut` is the plain mode's TTFT p99 over the
row's.

Prompts are capped at `--max-model-len` minus the output (a request longer than an engine's KV can
never run; vLLM refuses it at admission).

    python bench/kunserve_sim.py            # ~40 s on one core
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from slofleet.calibration import EngineCalibration, load_calibration
from slofleet.instance import Pool
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.migration import MigrationConfig
from slofleet.sim.kunserve import KunServeConfig, gained_tokens
from slofleet.sim.simulator import SimConfig, SimResult, Simulator
from slofleet.sim.traces import Trace, load_trace, shape


def capped(trace: Trace, max_model_len: int) -> Trace:
    out = np.minimum(trace.output_tokens, max_model_len // 8)
    prompt = np.minimum(trace.prompt_tokens, max_model_len - out)
    return Trace(trace.name, trace.arrival_s, prompt, out)


MODES: tuple[tuple[str, KunServeConfig | None, MigrationConfig | None], ...] = (
    ("plain", None, None),
    ("kunserve", KunServeConfig(), None),
    ("migration", None, MigrationConfig()),
    ("mig+kunserve", KunServeConfig(), MigrationConfig()),
)


def run(
    trace: Trace,
    cal: EngineCalibration,
    instances: int,
    kunserve: KunServeConfig | None,
    migration: MigrationConfig | None = None,
) -> SimResult:
    cfg = SimConfig(
        calibration=cal,
        initial_replicas={Pool.MIXED: instances},
        kunserve=kunserve,
        migration=migration,
        sample_interval_s=5.0,
    )
    return Simulator(trace, (), StaticAutoscaler(instances), cfg).run()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", default="llama3-8b-h100")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--tight-kv", type=int, default=45_000)
    p.add_argument("--max-model-len", type=int, default=32_768)
    p.add_argument("--start", type=float, default=600.0)
    p.add_argument("--duration", type=float, default=300.0)
    args = p.parse_args(argv)
    base = load_calibration(args.calibration)
    tight = replace(base, kv_capacity_tokens=args.tight_kv)
    cases = [
        (base, "mooncake-conv", 2.5),
        (base, "azure-conv", 16.0),
        (tight, "azure-conv", 10.0),
        (tight, "azure-conv", 13.0),
        (tight, "azure-conv", 16.0),
    ]
    print(
        f"{args.instances} x {base.name} ({base.hardware}), static fleet, {args.duration:g} s of trace "
        f"from {args.start:g} s; a group of 2 gains {gained_tokens(base, 2):,} tokens of KV per member"
    )
    print(
        f"{'KV/inst':>8} {'trace':<14} {'load':>5} {'reqs':>6} | {'mode':<12} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'SLO met':>7} {'out tok/s':>9} {'preempt':>7} {'groups':>6} {'migr':>5} | "
        f"{'p99 cut':>7}"
    )
    for cal, name, load in cases:
        trace = capped(
            shape(load_trace(name), start_s=args.start, duration_s=args.duration, load_scale=load),
            args.max_model_len,
        )
        rows = {mode: run(trace, cal, args.instances, ks, mig) for mode, ks, mig in MODES}
        p99 = {m: float(np.percentile(r.ttft, 99)) for m, r in rows.items()}
        for mode, res in rows.items():
            cut = f"{p99['plain'] / p99[mode]:.1f}x" if mode != "plain" else ""
            print(
                f"{cal.kv_capacity_tokens:>8,} {name:<14} {load:>5g} {len(trace):>6} | {mode:<12} "
                f"{np.percentile(res.ttft, 50):>8.2f}s {p99[mode]:>8.2f}s {res.interactive_attainment:>7.1%} "
                f"{trace.output_tokens.sum() / res.duration_s:>9.0f} {res.preemptions:>7} "
                f"{res.groups_formed:>3}/{res.groups_split:<2} {res.migrations:>5} | {cut:>7}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
