"""`slofleet up` start-up and replay overhead against one vLLM reached directly, in one run.

1. Start-up: wall time from launching `slofleet up` (one instance, static policy) to its first
   served token through the gateway, vs launching the same vLLM server alone to its first token.
2. Overhead: the same trace slice replayed through `slofleet up` (gateway + sidecar + control
   loop around one engine) and against the bare engine: TTFT p50/p99, ITL p99, throughput.

Run: .venv/bin/python bench/local_up.py [--duration 30] [--load 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from slofleet.instance import Pool
from slofleet.local.instance import EngineLaunch, LocalInstance
from slofleet.local.processes import ManagedProcess
from slofleet.local.replay import replay
from slofleet.local.replay_cli import arrivals_from_trace
from slofleet.local.report import SloTargets, summarise
from slofleet.local.up import local_engine_args, resolve_model
from slofleet.spec import parse_llmservice

SPEC = {
    "apiVersion": "slofleet.io/v1alpha1",
    "kind": "LLMService",
    "metadata": {"name": "bench"},
    "spec": {
        "model": "generated:tiny",
        "engine": {"resources": {"gpu": 0}, "maxModelLen": 2048},
        "replicas": {"min": 1, "max": 1, "initial": 1},
        "autoscaling": {"policy": "static", "intervalSeconds": 2},
    },
}
STARTUP_LIMIT_SECONDS = 600.0
SLO = SloTargets(ttft_seconds=1.0, itl_seconds=0.1, batch_deadline_seconds=3600)


async def first_token(url: str, model: str, t0: float) -> float:
    """Seconds from t0 until a 1-token completion succeeds at url."""
    body = {"model": model, "prompt": [20, 21, 22], "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() - t0 < STARTUP_LIMIT_SECONDS:
            try:
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(url)


async def measure(url: str, model: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    arrivals, _ = arrivals_from_trace("azure-conv", args.start, args.duration, 1.0, args.load, 0.0,
                                      2048, None, 0)  # fmt: skip
    t = time.monotonic()
    outcomes = await replay(url, model, arrivals, (16, vocab))
    wall = time.monotonic() - t
    row = summarise(outcomes, SLO)[0]
    return {"requests": row.sent, "completed": row.completed, "ttft_p50": row.ttft_p50,
            "ttft_p99": row.ttft_p99, "itl_p99": row.itl_p99, "tok_s": row.output_tokens / wall}  # fmt: skip


async def run_up(args: argparse.Namespace, workdir: Path) -> tuple[float, dict[str, float]]:
    spec_file = workdir / "bench.yaml"
    spec_file.write_text(json.dumps(SPEC))
    state = workdir / "state"
    t0 = time.monotonic()
    up = ManagedProcess(
        "slofleet-up",
        [sys.executable, "-m", "slofleet.cli", "up", "-f", str(spec_file), "--state-dir", str(state)],
        workdir / "up.log",
    )
    up.start()
    try:
        url = await gateway_url(state / "state.json", t0)
        startup = await first_token(url, "bench", t0)
        return startup, await measure(url, "bench", args, 512)
    finally:
        up.kill_group(signal.SIGINT)
        await up.stop(grace_seconds=120)


async def gateway_url(state_file: Path, t0: float) -> str:
    while time.monotonic() - t0 < STARTUP_LIMIT_SECONDS:
        try:
            return str(json.loads(await asyncio.to_thread(state_file.read_text))["gateway_url"])
        except (OSError, ValueError, KeyError):
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{state_file} not written")


async def run_direct(args: argparse.Namespace, workdir: Path) -> tuple[float, dict[str, float]]:
    service = parse_llmservice(SPEC)
    launch = EngineLaunch(resolve_model(service.spec.model), "bench", local_engine_args(service.spec))
    inst = LocalInstance("direct", Pool.MIXED, launch, workdir)
    t0 = time.monotonic()
    inst.engine.start()  # the engine alone, no sidecar
    try:
        startup = await first_token(inst.engine_url, "bench", t0)
        return startup, await measure(inst.engine_url, "bench", args, 512)
    finally:
        await inst.engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--start", type=float, default=600.0)
    ap.add_argument("--load", type=float, default=0.5)
    args = ap.parse_args()
    resolve_model("generated:tiny")  # make the model before any clock starts
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        direct_start, direct = asyncio.run(run_direct(args, Path(tmp) / "direct"))
        up_start, up = asyncio.run(run_up(args, Path(tmp)))
    print(f"\nazure-conv from {args.start:g} s, {args.duration:g} s at load x{args.load:g}")
    print(f"{'':<22} {'vLLM direct':>12} {'slofleet up':>12} {'ratio':>8}")
    rows = [("start to first token s", direct_start, up_start)]
    labels = {"ttft_p50": "TTFT p50 s", "ttft_p99": "TTFT p99 s", "itl_p99": "ITL p99 s",
              "tok_s": "output tok/s", "requests": "requests", "completed": "completed"}  # fmt: skip
    rows += [(label, direct[key], up[key]) for key, label in labels.items()]
    for label, a, b in rows:
        print(f"{label:<22} {a:>12.3f} {b:>12.3f} {b / a if a else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
