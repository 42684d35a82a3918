"""Sidecar cost next to a busy vLLM CPU engine: `Load`/`WatchLoad` latency on loopback and the
CPU the sidecar (and its 10 Hz scraping) takes.

    .venv/bin/python bench/sidecar_load.py [--seconds 15] [--calls 2000] [--streams 16]

Starts one vLLM server (tiny model), a load generator process that keeps `--streams` streaming
completions running, and `slofleet sidecar` as its own process (so that its CPU is its own).
Baselines measured in the same run: the gRPC health `Check` on the same server (the cheapest
call grpc-python can make: the floor for `Load`), and the engine API server's CPU with no
sidecar polling it (what the 10 Hz scrape adds there). Targets: p99 <= 2 ms, <= 5 % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import grpc  # noqa: E402
from enginectl import PROJECT_ENGINE_ARGS, free_port, start_vllm  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from slofleet.api.v1 import sidecar_pb2 as pb  # noqa: E402
from slofleet.api.v1 import sidecar_pb2_grpc as pb_grpc  # noqa: E402
from slofleet.tinymodel import ensure_tiny_model  # noqa: E402

TOKEN = "bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_share(pid: int, seconds: float) -> float:
    """Fraction of one core `pid` used over the next `seconds`."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def generate_load(url: str, model: str, streams: int) -> None:
    """Child process: keep `streams` streaming completions in flight until killed."""
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> None:
        body = {
            "model": model,
            "prompt": "the gateway",
            "max_tokens": 256,
            "ignore_eos": True,
            "stream": True,
        }
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(url + "/v1/completions", json=body) as resp:
                    async for _ in resp.content:
                        pass

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session) for _ in range(streams)))

    asyncio.run(main())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(grpc_port: int, calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"health Check": [], "Load": [], "WatchLoad push": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.SidecarStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(50):  # warm up the channel
            await stub.Load(pb.LoadRequest(), metadata=AUTH)
        for _ in range(calls):
            t = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            out["health Check"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await stub.Load(pb.LoadRequest(), metadata=AUTH)
            out["Load"].append(time.perf_counter() - t)
        # WatchLoad: time from a change (SetLimits sent) until the watcher holds the new snapshot.
        # It includes the SetLimits call itself, so it is an upper bound of the push latency.
        watch = stub.WatchLoad(pb.WatchLoadRequest(interval_milliseconds=60_000), metadata=AUTH)
        await watch.read()
        for i in range(min(calls, 500)):
            limit = 100 + i % 2
            t = time.perf_counter()
            await stub.SetLimits(pb.SetLimitsRequest(concurrency_limit=limit, source="bench"), metadata=AUTH)
            while (await watch.read()).concurrency_limit != limit:
                pass
            out["WatchLoad push"].append(time.perf_counter() - t)
        watch.cancel()
    return out


def start_sidecar(engine_url: str, grpc_port: int, metrics_port: int, log: Path) -> subprocess.Popen[bytes]:
    token = log.parent / "token"
    token.write_text(TOKEN)
    cmd = [
        sys.executable, "-m", "slofleet.cli", "sidecar", "--engine-url", engine_url, "--instance-id", "bench",
        "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port), "--token-file", str(token), "--log-level", "WARNING",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_serving(grpc_port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError("sidecar not SERVING")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="CPU measurement window")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    model = ensure_tiny_model("tiny")
    print(f"starting vLLM (tiny model) ... cores={os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    engine = start_vllm(model, extra_args=PROJECT_ENGINE_ARGS)
    loadgen = multiprocessing.get_context("spawn").Process(
        target=generate_load, args=(engine.url, str(model), args.streams), daemon=True
    )
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        loadgen.start()
        time.sleep(3)
        api_cpu_without = cpu_share(engine.process.pid, args.seconds)
        grpc_port, metrics_port = free_port(), free_port()
        sidecar = start_sidecar(engine.url, grpc_port, metrics_port, tmp / "sidecar.log")
        asyncio.run(wait_serving(grpc_port))
        time.sleep(2)
        t0 = time.monotonic()
        c_sc0, c_api0 = cpu_seconds(sidecar.pid), cpu_seconds(engine.process.pid)
        time.sleep(args.seconds)
        wall = time.monotonic() - t0
        sidecar_cpu = (cpu_seconds(sidecar.pid) - c_sc0) / wall
        api_cpu_with = (cpu_seconds(engine.process.pid) - c_api0) / wall
        busy = asyncio.run(latencies(grpc_port, args.calls))
        loadgen.kill()
        loadgen.join(5)
        time.sleep(2)
        sidecar_cpu_idle = cpu_share(sidecar.pid, args.seconds / 2)
        idle = asyncio.run(latencies(grpc_port, args.calls))
    finally:
        if loadgen.is_alive():
            loadgen.kill()
        if sidecar is not None and sidecar.poll() is None:
            os.killpg(sidecar.pid, signal.SIGTERM)
            sidecar.wait(10)
        engine.stop()

    print(
        f"\nlatency on loopback ({args.calls} sequential calls each; "
        f"WatchLoad: {min(args.calls, 500)} changes)"
    )
    print(f"{'engine':<7} {'call':<16} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p99 / health p99':>17}")
    for label, res in (("busy", busy), ("idle", idle)):
        base = pct(res["health Check"], 0.99)
        for name, values in res.items():
            print(
                f"{label:<7} {name:<16} {pct(values, 0.5) * 1e3:8.3f} {pct(values, 0.99) * 1e3:8.3f} "
                f"{statistics.fmean(values) * 1e3:8.3f} {pct(values, 0.99) / base:17.2f}"
            )
    print(
        f"\nCPU, share of one core over {args.seconds:.0f} s "
        "(sidecar polls /metrics at 10 Hz, /health at 2 Hz)"
    )
    print(f"{'process':<44} {'core %':>7} {'ratio':>7}")
    print(f"{'vLLM API server, busy, no sidecar (baseline)':<44} {api_cpu_without * 100:7.2f} {1:7.2f}")
    print(
        f"{'vLLM API server, busy, sidecar polling':<44} {api_cpu_with * 100:7.2f} "
        f"{api_cpu_with / max(api_cpu_without, 1e-9):7.2f}"
    )
    print(f"{'sidecar, engine busy':<44} {sidecar_cpu * 100:7.2f}")
    print(f"{'sidecar, engine idle':<44} {sidecar_cpu_idle * 100:7.2f}")
    ok = (
        pct(busy["Load"], 0.99) <= 0.002
        and pct(busy["WatchLoad push"], 0.99) <= 0.002
        and sidecar_cpu <= 0.05
    )
    print(
        "\ntargets (busy: Load and WatchLoad p99 <= 2 ms, sidecar <= 5 % of a core): "
        + ("met" if ok else "NOT met")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
