"""Parameter drop/restore and warm standby on the vLLM CPU engine, against a cold start.

    .venv/bin/python bench/drop_restore.py [--sizes tiny,small,base] [--repeat 3] [--json OUT]

Per model size, one vLLM server at a time, driven by the Memory service in-process (the same
code the sidecar serves over gRPC; engine calls go over the engine's HTTP routes as in a pod):
- cold start: spawn the engine -> /health -> first generated token (the baseline; it includes
  torch.compile unless ~/.cache/vllm already holds this model's graph, the best case);
- drop of 1, half and all decoder layers (time vs bytes) with an empty host store (weights
  read back out of the packed GEMM handles and written to /dev/shm) and with a warm store (only
  freeing), and restore; median of `--repeat` cycles; worker RSS before/after from /proc;
- standby (every weight to the store) -> wake -> first generated token, vs the cold start.
Prints two tables; `--json` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, start_vllm  # noqa: E402

from slofleet.api.v1 import memory_pb2 as pb  # noqa: E402
from slofleet.sidecar.memory.service import MemoryService  # noqa: E402
from slofleet.tinymodel import ensure_tiny_model  # noqa: E402


def worker_rss(server: VllmServer) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != server.process.pid:
                continue
            if b"VLLM::Worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) * 1024
    raise RuntimeError("no VLLM::Worker process in the engine's process group")


async def first_token_seconds(url: str) -> float:
    """Seconds until the first streamed token of a 1-token greedy completion."""
    body = {"prompt": [11, 22, 33], "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if raw.startswith(b"data: {"):
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


async def drop_cycle(
    service: MemoryService, server: VllmServer, layers: list[int], repeat: int
) -> dict[str, Any]:
    """Drop `layers` with an empty store, restore, drop again with the store warm, restore;
    medians over `repeat` cycles, with the worker's RSS around each drop."""
    times: dict[str, list[float]] = {"drop_empty_store": [], "drop_warm_store": [], "restore": []}
    freed: list[int] = []
    nbytes = 0
    for _ in range(repeat):
        for u in list(service.store.manifest()):
            service.store.delete(u)
        for label in ("drop_empty_store", "drop_warm_store"):
            before = worker_rss(server)
            t = time.perf_counter()
            dropped = await service.drop_layers(pb.DropLayersRequest(layers=layers))
            times[label].append(time.perf_counter() - t)
            freed.append(before - worker_rss(server))
            nbytes = dropped.dropped_weight_bytes
            t = time.perf_counter()
            await service.restore_layers(pb.RestoreLayersRequest())
            times["restore"].append(time.perf_counter() - t)
    med = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    return {
        "layers_dropped": len(layers),
        "bytes": nbytes,
        **med,
        "restore_gb_per_s": nbytes / med["restore_s"] / 1e9,
        "worker_rss_freed_bytes_median": statistics.median(freed),
    }


async def measure(size: str, repeat: int) -> dict[str, Any]:
    model = ensure_tiny_model(size)
    start = time.perf_counter()
    server = start_vllm(model, extra_args=PROJECT_ENGINE_ARGS)
    store_dir = Path(tempfile.mkdtemp(prefix=f"slofleet-bench-{size}-", dir="/dev/shm"))
    service = MemoryService(server.url, str(store_dir))
    try:
        await first_token_seconds(server.url)
        cold = time.perf_counter() - start
        await service.start()
        total = (await service.status()).layers_total
        counts = sorted({1, total // 2, total})
        drops = [await drop_cycle(service, server, list(range(total - k, total)), repeat) for k in counts]
        wake_rows: dict[str, list[float]] = {"standby": [], "wake": [], "wake_to_first_token": []}
        all_bytes = 0
        for _ in range(repeat):
            t = time.perf_counter()
            parked = await service.standby(pb.StandbyRequest())
            wake_rows["standby"].append(time.perf_counter() - t)
            all_bytes = parked.dropped_weight_bytes
            t = time.perf_counter()
            await service.wake(pb.WakeRequest())
            wake_rows["wake"].append(time.perf_counter() - t)
            await first_token_seconds(server.url)
            wake_rows["wake_to_first_token"].append(time.perf_counter() - t)
        med = {f"{k}_s": statistics.median(v) for k, v in wake_rows.items()}
        return {
            "size": size,
            "layers": total,
            "drops": drops,
            "all_weight_bytes": all_bytes,
            "worker_rss_bytes": worker_rss(server),
            "cold_start_to_first_token_s": cold,
            **med,
            "cold_over_wake": cold / med["wake_to_first_token_s"],
        }
    finally:
        await service.close()
        server.stop()
        shutil.rmtree(store_dir, ignore_errors=True)


def render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def tables(results: list[dict[str, Any]]) -> str:
    drops = [["model", "layers", "dropped", "MB", "drop new s", "drop warm s", "restore s", "restore GB/s",
              "RSS freed MB"]]  # fmt: skip
    for r in results:
        for d in r["drops"]:
            drops.append([
                r["size"], str(r["layers"]), str(d["layers_dropped"]), f"{d['bytes'] / 1e6:.1f}",
                f"{d['drop_empty_store_s']:.3f}", f"{d['drop_warm_store_s']:.3f}", f"{d['restore_s']:.3f}",
                f"{d['restore_gb_per_s']:.2f}", f"{d['worker_rss_freed_bytes_median'] / 1e6:.1f}",
            ])  # fmt: skip
    wake = [["model", "all weights MB", "standby s", "wake s", "wake->token s", "cold->token s", "cold/wake"]]
    for r in results:
        wake.append([
            r["size"], f"{r['all_weight_bytes'] / 1e6:.1f}", f"{r['standby_s']:.3f}", f"{r['wake_s']:.3f}",
            f"{r['wake_to_first_token_s']:.3f}", f"{r['cold_start_to_first_token_s']:.1f}",
            f"{r['cold_over_wake']:.0f}x",
        ])  # fmt: skip
    return render(drops) + "\n\n" + render(wake)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,base")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        results.append(await measure(size, args.repeat))
        print(f"[{size}] done", flush=True)
    print()
    print(tables(results))
    print(
        "\ndrop new = layers read out of the packed GEMMs and written to the host store, then freed; "
        "drop warm = store already holds them (free only); restore = store -> engine, re-packed; "
        "times include pause/resume and the sidecar's engine calls. cold = spawn -> first token "
        "(torch.compile included unless cached). RSS freed = engine worker process, /proc."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
