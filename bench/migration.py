"""Migration downtime and duration vs sequence length: live multi-stage KV, stop-and-copy, recompute.

    .venv/bin/python bench/migration.py [--lengths 256,1024,4096,8192] [--size base]

Two real vLLM CPU engines (a generated ~110 M-parameter Llama, max-model-len 9000) with slofleet's
KV connector, and their Migration services, each engine bound to its own share of the cores. For
each length a request with a prompt of that many tokens decodes on A; after a few tokens it moves to
B by
- live: MigrateOut with pre-copy stages (the copy runs while A keeps decoding);
- stop-and-copy: MigrateOut with max_stages=0 (every block is copied after the stop);
- recompute: abort on A, resume on B with prompt = prompt + generated, no KV.
Downtime is what the client sees: its last token from A to its first token from B. Total is the
MigrateOut call (accept to commit; for recompute, the abort to the first token on B). Every mode
runs `--repeats` times; every run is printed, the table shows the median and the best. (With
both engines bound to the same core, as vLLM's auto binding does, the client-side downtime was
bimodal, tens of ms or 0.5-0.9 s, whatever the mode or length.) Ratios are against recompute and
against the 256-token row, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slofleet.api.v1 import migration_pb2 as pb
from slofleet.local.cpus import BIND_ENV, CpuPlacer
from slofleet.tinymodel import ensure_tiny_model
from tests.migration_support import (
    Node,
    generate_following_moves,
    migrate,
    start_engine,
    start_node,
    stop_node,
    wait_engine_tokens,
)

MODES = ("live", "stop-and-copy", "recompute")


async def one(
    session: aiohttp.ClientSession,
    nodes: dict[str, Node],
    model: str,
    length: int,
    mode: str,
    seed: int,
    decode_tokens: int,
) -> tuple[float, float, str]:
    a, b = nodes["a"], nodes["b"]
    rng = random.Random(seed)
    prompt = [rng.randrange(10, 8000) for _ in range(length)]
    rid = f"bench-{mode}-{length}-{seed}-{time.monotonic_ns() % 10**9}"
    # B must start cold: KV loaded or computed there by an earlier run would sit in its prefix cache
    # and make the next run's prefill look free. A keeps its cache: every mode starts from the same
    # prefilled prompt there, which the measurement does not include anyway.
    async with session.post(b.url + "/reset_prefix_cache") as r:
        r.raise_for_status()
    gen = asyncio.create_task(
        generate_following_moves(
            session,
            nodes,
            a,
            model,
            prompt,
            decode_tokens,
            rid,
            recompute_on=b,
        )
    )
    await wait_engine_tokens(a, rid, 8, gen)
    t0 = time.perf_counter()
    if mode == "recompute":
        async with session.post(a.url + "/abort_requests", json={"request_ids": [f"cmpl-{rid}-0"]}) as r:
            r.raise_for_status()
        result = await gen
        total = result.legs[1].first_token_at - t0 if result.legs[1].first_token_at else float("nan")
        note = "recompute"
    else:
        progress = await migrate(a, b, rid, max_stages=0 if mode == "stop-and-copy" else 8)
        total = time.perf_counter() - t0
        result = await gen
        last = progress[-1]
        note = (
            f"{pb.MigrationOutcome.Name(last.outcome).removeprefix('MIGRATION_OUTCOME_').lower()} "
            f"stages={max(p.stage for p in progress)} blocks={last.blocks_copied} "
            f"MiB={last.bytes_copied / 2**20:.1f} stop={last.stop_seconds * 1000:.0f}ms"
        )
    gaps = result.gaps()
    if len(result.legs) != 2 or not gaps:
        raise RuntimeError(f"{mode} {length}: expected one move, got legs {[g.url for g in result.legs]}")
    return gaps[0], total, note


async def main(args: argparse.Namespace) -> int:
    model = str(ensure_tiny_model(args.size))
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + args.decode_tokens + 256
    engine_args = ["--max-num-batched-tokens", "2048"]
    # Each engine on its own cores, as `slofleet up` places them (vLLM's auto binding would put
    # both on the same ones).
    cpus = CpuPlacer(os.sched_getaffinity(0), 2)
    a, sock_a = start_engine("bench-a", model, engine_args, max_len, {BIND_ENV: cpus.assign("a")})
    try:
        b, sock_b = start_engine("bench-b", model, engine_args, max_len, {BIND_ENV: cpus.assign("b")})
    except BaseException:
        a.stop()
        raise
    nodes: dict[str, Node] = {}
    try:
        nodes = {"a": await start_node("a", a, sock_a), "b": await start_node("b", b, sock_b)}
        rows: dict[tuple[int, str], tuple[float, float, str]] = {}
        best: dict[tuple[int, str], float] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1200)) as session:
            # Warm both engines (compile caches, first-request costs) outside the measurements.
            for attempt in range(3):
                try:
                    await one(session, nodes, model, 256, "live", 999, args.decode_tokens)
                    break
                except (RuntimeError, AssertionError) as e:
                    print(f"  warm-up retry {attempt + 1}: {e}"[:300], flush=True)
            for length in lengths:
                for mode in MODES:
                    runs = []
                    for _ in range(args.repeats):
                        for attempt in range(3):
                            try:
                                run = await one(
                                    session, nodes, model, length, mode, length, args.decode_tokens
                                )
                                break
                            except (RuntimeError, AssertionError) as e:
                                # The request ended before the move began (the box stalled us).
                                print(f"  retry {attempt + 1}: {e}"[:300], flush=True)
                        else:
                            raise RuntimeError(f"{mode} {length}: no run moved the request in 3 tries")
                        runs.append(run)
                        d, t, note = runs[-1]
                        print(
                            f"  measured {length:>5} {mode:<14} downtime {d * 1000:8.1f} ms  total "
                            f"{t * 1000:8.1f} ms  {note}",
                            flush=True,
                        )
                    runs.sort()
                    rows[(length, mode)] = runs[len(runs) // 2]
                    best[(length, mode)] = runs[0][0]
    finally:
        for n in nodes.values():
            await stop_node(n)
        a.stop()
        b.stop()
    print(f"\nmodel {args.size} ({model}), engines: vLLM CPU build, 2 cores shared; block 128 tokens")
    print(
        f"{'seq len':>7} | {'mode':<14} | {'downtime ms':>11} | {'best ms':>8} | {'total ms':>9} | "
        f"{'vs recompute':>12} | {'vs 256':>7}"
    )
    print("-" * 88)
    for length in lengths:
        rec = rows[(length, "recompute")][0]
        for mode in MODES:
            d, t, _ = rows[(length, mode)]
            base = rows[(lengths[0], mode)][0]
            print(
                f"{length:>7} | {mode:<14} | {d * 1000:>11.1f} | {best[(length, mode)] * 1000:>8.1f} | "
                f"{t * 1000:>9.1f} | {rec / d:>11.1f}x | {d / base:>6.2f}x"
            )
    if 4096 in lengths and 8192 in lengths and lengths[0] == 256:
        for name, table in (("median", {k: v[0] for k, v in rows.items()}), ("best", best)):
            flat = table[(8192, "live")] / table[(256, "live")]
            gain = table[(4096, "recompute")] / table[(4096, "live")]
            print(
                f"{name:>6}: live downtime 8k/256 = {flat:.2f}x (target <= 1.5x); recompute/live at 4k = "
                f"{gain:.1f}x (target >= 10x)"
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096,8192")
    parser.add_argument("--size", default="base", help="tiny-model size (base is ~110 M parameters)")
    parser.add_argument("--decode-tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="runs per KV mode (the median is reported)")
    sys.exit(asyncio.run(main(parser.parse_args())))
