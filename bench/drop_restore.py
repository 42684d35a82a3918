"""Parameter drop/restore and warm standby on the vLLM CPU engine, against a cold start.

    .venv/bin/python bench/drop_restore.py [--sizes tiny,base] [--repeat 3] [--json OUT]

Per model size, one vLLM server at a time, driven by the Memory service in-process (the same
code the sidecar serves over gRPC; engine calls go over the engine's HTTP routes as in a pod):
- cold start: spawn the engine -> /health -> first generated token (the baseline; it includes
  torch.compile unless ~/.cache/vllm already holds this model's graph, the best case);
- drop of every decoder layer with an empty host store (weights read back out of the packed
  GEMM handles and written to /dev/shm) and with a warm store (only freeing), and restore;
  median of `--repeat` cycles; worker RSS before/after from /proc;
- standby (every weight to the store) -> wake -> first generated token, vs the cold start.
Prints one table; `--json` also writes the numbers.
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
        status = await service._status()
        layers = list(range(status.layers_total))
        rows: dict[str, list[float]] = {"drop_empty_store": [], "drop_warm_store": [], "restore": []}
        rss: dict[str, list[int]] = {"before": [], "dropped": [], "restored": []}
        layer_bytes = 0
        for i in range(repeat):
            for u in list(service.store.manifest()):
                service.store.delete(u)  # every cycle starts with an empty store, then a warm one
            for label in ("drop_empty_store", "drop_warm_store"):
                rss["before"].append(worker_rss(server))
                t = time.perf_counter()
                dropped = await service.drop_layers(pb.DropLayersRequest(layers=layers))
                rows[label].append(time.perf_counter() - t)
                rss["dropped"].append(worker_rss(server))
                layer_bytes = dropped.dropped_weight_bytes
                t = time.perf_counter()
                await service.restore_layers(pb.RestoreLayersRequest())
                rows["restore"].append(time.perf_counter() - t)
                rss["restored"].append(worker_rss(server))
            del i
        wake_rows: dict[str, list[float]] = {"standby": [], "wake": [], "wake_to_first_token": []}
        total_bytes = 0
        for _ in range(repeat):
            t = time.perf_counter()
            parked = await service.standby(pb.StandbyRequest())
            wake_rows["standby"].append(time.perf_counter() - t)
            total_bytes = parked.dropped_weight_bytes
            t = time.perf_counter()
            await service.wake(pb.WakeRequest())
            wake_rows["wake"].append(time.perf_counter() - t)
            await first_token_seconds(server.url)
            wake_rows["wake_to_first_token"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in {**rows, **wake_rows}.items()}
        freed = [b - d for b, d in zip(rss["before"], rss["dropped"], strict=True)]
        return {
            "size": size,
            "layers": len(layers),
            "layer_bytes": layer_bytes,
            "all_weight_bytes": total_bytes,
            "cold_start_to_first_token_s": cold,
            **{f"{k}_s": v for k, v in med.items()},
            "restore_gb_per_s": layer_bytes / med["restore"] / 1e9,
            "worker_rss_freed_bytes_median": statistics.median(freed),
            "worker_rss_bytes": statistics.median(rss["before"]),
            "cold_over_wake": cold / med["wake_to_first_token"],
        }
    finally:
        await service.close()
        server.stop()
        shutil.rmtree(store_dir, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    cols = [
        ("model", lambda r: r["size"]),
        ("layers", lambda r: str(r["layers"])),
        ("layer MB", lambda r: f"{r['layer_bytes'] / 1e6:.1f}"),
        ("drop new s", lambda r: f"{r['drop_empty_store_s']:.3f}"),
        ("drop warm s", lambda r: f"{r['drop_warm_store_s']:.3f}"),
        ("restore s", lambda r: f"{r['restore_s']:.3f}"),
        ("restore GB/s", lambda r: f"{r['restore_gb_per_s']:.2f}"),
        ("RSS freed MB", lambda r: f"{r['worker_rss_freed_bytes_median'] / 1e6:.1f}"),
        ("all MB", lambda r: f"{r['all_weight_bytes'] / 1e6:.1f}"),
        ("standby s", lambda r: f"{r['standby_s']:.3f}"),
        ("wake s", lambda r: f"{r['wake_s']:.3f}"),
        ("wake->tok s", lambda r: f"{r['wake_to_first_token_s']:.3f}"),
        ("cold->tok s", lambda r: f"{r['cold_start_to_first_token_s']:.1f}"),
        ("cold/wake", lambda r: f"{r['cold_over_wake']:.0f}x"),
    ]
    rows = [[name for name, _ in cols]] + [[fn(r) for _, fn in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        results.append(await measure(size, args.repeat))
        print(f"[{size}] done", flush=True)
    print()
    print(table(results))
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
