"""KunServe pipeline mode against plain queueing and migration, on two real vLLM CPU engines.

    .venv/bin/python bench/kunserve_cpu.py [--size base] [--requests 24] [--prompt-words 60]
        [--max-tokens 200] [--blocks 12] [--scenarios plain,migration,kunserve] [--json OUT]

Issue 10's benchmark on this machine: a burst that exhausts KV memory on two instances of the
generated >= 100 M model (`base`, ~110 M parameters), through the real gateway (`slofleet
gateway` in front of both engines, freeness dispatch), one fresh pair of engines per scenario:

(a) plain: vLLM queues what its KV cannot hold; nothing else runs.
(b) migration: Llumnix's policy (`slofleet.policies.migration.plan_migrations`, the code the
    operator runs) every 200 ms on the engines' live block counts and the requests in flight,
    each decision executed through the gateway's move (the request's cut-over path; these engines
    have no sidecars, so a move recomputes instead of copying KV).
(c) kunserve: when either engine queues, the engine with fewer requests becomes the follower:
    its requests move to the other engine through the gateway (recompute), and once it is idle
    the two merge into a pipeline (`merge_pipeline`; the leader's running requests are requeued
    and recomputed, issue 10 item 3): each keeps half the layers, and the freed weights plus the
    halved per-block size become KV blocks, so the burst runs at once.

Every engine runs eager (`--enforce-eager`), because pipeline steps must (vllm_ext/pipeline.py),
with a small KV cache (`--num-gpu-blocks-override`, so the burst exhausts it) and its own core.
The engines' KV size is forced small on purpose: with vLLM's default 1 GiB of KV per engine the
`base` model would need a burst of thousands of tokens per request to run out.

Reported per scenario: TTFT p50/p99 as the client sees it (request sent to first streamed token,
all sent at once), makespan, output tokens/s, moves, and for (c) the merge's timings and KV gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, start_vllm  # noqa: E402
from gateway_support import GatewayProcess  # noqa: E402

from slofleet.instance import InstanceLoad, RequestClass, RequestInfo  # noqa: E402
from slofleet.policies.migration import plan_migrations  # noqa: E402
from slofleet.sidecar.memory.kv_grow import scheduler_command  # noqa: E402
from slofleet.sidecar.memory.pipeline import PipelineMember, PipelineSwitchResult, merge_pipeline  # noqa: E402
from slofleet.tinymodel import ensure_tiny_model  # noqa: E402

SCHEDULER_CLS = "slofleet.sidecar.vllm_ext.scheduler.SlofleetScheduler"
MODEL_NAME = "m"
WORDS = "kubernetes pod deployment replica cluster memory cache layer batch python function value".split()


@dataclass
class Tracked:
    """One burst request as the client (and the control loop playing the operator) knows it."""

    index: int
    prompt_tokens: int
    max_tokens: int
    generated: int = 0
    sent: float = 0.0
    first_token: float = 0.0
    done: float = 0.0
    finish_reason: str = ""


@dataclass
class Engine:
    server: VllmServer
    member: PipelineMember

    @property
    def instance_id(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def info(self) -> dict[str, Any]:
        reply = await scheduler_command(self.member.scheduler_socket, {"op": "info"})
        if not reply.get("ok"):
            raise RuntimeError(f"scheduler info of {self.instance_id}: {reply}")
        return reply


@dataclass
class Outcome:
    scenario: str
    ttft: list[float]
    makespan: float
    output_tokens: int
    moves: int = 0
    moves_refused: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    merge: PipelineSwitchResult | None = None
    merge_started: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        q = statistics.quantiles(self.ttft, n=100, method="inclusive")
        row: dict[str, Any] = {
            "scenario": self.scenario,
            "ttft_p50_s": round(statistics.median(self.ttft), 3),
            "ttft_p99_s": round(q[98], 3),
            "makespan_s": round(self.makespan, 2),
            "output_tok_s": round(self.output_tokens / self.makespan, 1),
            "moves": self.moves,
            "moves_refused": self.moves_refused,
            "prompt_tokens_mean": round(statistics.mean(self.prompt_tokens), 1),
            "ttft_s": [round(x, 3) for x in self.ttft],
        }
        if self.merge is not None:
            m = self.merge
            row.update(
                merge_at_s=round(self.merge_started, 2), merge_paused_s=round(m.paused_seconds, 3),
                merge_total_s=round(m.total_seconds, 3),
                kv_blocks=f"{m.kv_blocks_before}->{m.kv_blocks_after}",
                requeued=m.requeued, requeued_tokens=m.requeued_tokens,
            )  # fmt: skip
        return row


def prompt(i: int, words: int) -> str:
    """Distinct from the first word on, so no two requests share a prefix block."""
    return f"request {i} " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


async def count_tokens(session: aiohttp.ClientSession, url: str, text: str) -> int:
    async with session.post(url + "/tokenize", json={"model": MODEL_NAME, "prompt": text}) as resp:
        resp.raise_for_status()
        return int((await resp.json())["count"])


async def stream_one(session: aiohttp.ClientSession, gateway: str, t: Tracked, text: str) -> None:
    body = {"model": MODEL_NAME, "prompt": text, "max_tokens": t.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t.sent = time.perf_counter()
    async with session.post(gateway + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"request {t.index}: {resp.status} {await resp.text()}")
        async for raw in resp.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            for choice in chunk.get("choices", ()):
                if choice.get("token_ids"):
                    t.generated += len(choice["token_ids"])
                    if not t.first_token:
                        t.first_token = time.perf_counter()
                if choice.get("finish_reason"):
                    t.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                t.generated = int(chunk["usage"]["completion_tokens"])
    t.done = time.perf_counter()


async def gateway_requests(session: aiohttp.ClientSession, gateway: str) -> dict[str, list[dict[str, Any]]]:
    """The requests on each instance, from the gateway's status (queued ones included)."""
    async with session.get(gateway + "/slofleet/v1/status") as resp:
        resp.raise_for_status()
        return {i["instance_id"]: i["requests"] for i in (await resp.json())["instances"]}


async def move(session: aiohttp.ClientSession, gateway: str, request_id: str, target: str) -> bool:
    async with session.post(
        f"{gateway}/slofleet/v1/requests/{request_id}/move", json={"instance_id": target}
    ) as r:
        if r.status == 200:
            return True
        if r.status == 409:  # finished, or between instances right now
            return False
        raise RuntimeError(f"move {request_id} -> {target}: {r.status} {await r.text()}")


def load_of(engine: Engine, info: dict[str, Any], requests: list[dict[str, Any]]) -> InstanceLoad:
    total, free = int(info["num_blocks"]), int(info["free_blocks"])
    return InstanceLoad(
        instance_id=engine.instance_id, running_requests=int(info["running"]),
        waiting_requests=int(info["waiting"]), kv_usage_fraction=1.0 - free / max(total, 1),
        kv_total_blocks=total, kv_free_blocks=free, block_size_tokens=int(info["pipeline"]["block_size"]),
        concurrency_limit=1024,
        requests=tuple(RequestInfo(r["request_id"], RequestClass.INTERACTIVE, int(r["priority"]),
                                   int(r["prompt_tokens"]), int(r["max_tokens"]), int(r["generated_tokens"]))
                       for r in requests),
    )  # fmt: skip


async def migration_loop(
    session: aiohttp.ClientSession, gateway: str, engines: list[Engine], burst: list[Tracked], out: Outcome
) -> None:
    """Llumnix's control loop: plan on live loads, execute through the gateway, every 200 ms."""
    moving: set[str] = set()
    while not all(t.done for t in burst):
        on = await gateway_requests(session, gateway)
        loads = [load_of(e, await e.info(), on.get(e.instance_id, [])) for e in engines]
        for m in plan_migrations(loads, in_flight=moving):
            if await move(session, gateway, m.request_id, m.destination):
                out.moves += 1
                moving.add(m.request_id)
            else:
                out.moves_refused += 1
        await asyncio.sleep(0.2)


async def kunserve_loop(
    session: aiohttp.ClientSession, gateway: str, engines: list[Engine], burst: list[Tracked], out: Outcome,
    start: float,
) -> None:  # fmt: skip
    """On the first queueing: empty the lighter engine into the other, then merge the two."""
    while True:
        infos = [await e.info() for e in engines]
        if any(i["waiting"] for i in infos):
            break
        if all(t.done for t in burst):
            out.notes.append("the burst never queued: no merge")
            return
        await asyncio.sleep(0.05)
    load = [i["running"] + i["waiting"] for i in infos]
    leader, follower = (engines[0], engines[1]) if load[0] >= load[1] else (engines[1], engines[0])
    out.merge_started = time.perf_counter() - start
    deadline = time.monotonic() + 120
    moved: set[str] = set()
    while True:  # listed until its cut-over lands; one that was between instances is asked again
        left = (await gateway_requests(session, gateway)).get(follower.instance_id, [])
        for r in left:
            if r["request_id"] in moved:
                continue
            if await move(session, gateway, r["request_id"], leader.instance_id):
                out.moves += 1
                moved.add(r["request_id"])
            else:
                out.moves_refused += 1
        info = await follower.info()
        if not left and not info["running"] and not info["waiting"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the follower never emptied: {info}, gateway still has {left}")
        await asyncio.sleep(0.02)
    out.merge = await merge_pipeline(leader.member, follower.member)


async def run_scenario(scenario: str, model: Path, args: argparse.Namespace, root: Path) -> Outcome:
    engine_args = (
        *PROJECT_ENGINE_ARGS, "--scheduler-cls", SCHEDULER_CLS, "--enforce-eager",
        "--num-gpu-blocks-override", str(args.blocks), "--scheduling-policy", "priority",
        "--served-model-name", MODEL_NAME,
    )  # fmt: skip
    servers = [
        start_vllm(model, extra_args=engine_args, wait=False, max_model_len=args.max_model_len,
                   env={"SLOFLEET_SCHEDULER_SOCKET": str(root / f"{scenario}-{k}.sock"),
                        "VLLM_CPU_OMP_THREADS_BIND": str(k)})
        for k in range(2)
    ]  # fmt: skip
    gw: GatewayProcess | None = None
    try:
        for s in servers:
            s.wait_healthy()
        engines = [
            Engine(
                s,
                PipelineMember(
                    s.url, str(root / f"{scenario}-{k}.sock"), str(root / f"{scenario}-store-{k}")
                ),
            )
            for k, s in enumerate(servers)
        ]
        gw = GatewayProcess(
            [a for s in servers for a in ("--engine", s.url)]
            + ["--concurrency-limit", "1024", "--db", str(root / f"{scenario}.sqlite3")],
            root, name=f"gateway-{scenario}",
        )  # fmt: skip
        gw.start()
        texts = [prompt(i, args.prompt_words) for i in range(args.requests)]
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            for s in servers:  # warm each engine (first-step allocations) outside the measurement
                async with session.post(
                    s.url + "/v1/completions",
                    json={"model": MODEL_NAME, "prompt": "warm up", "max_tokens": 4},
                ) as r:
                    r.raise_for_status()  # fmt: skip
            counts = [await count_tokens(session, servers[0].url, x) for x in texts]
            burst = [Tracked(i, counts[i], args.max_tokens) for i in range(args.requests)]
            out = Outcome(scenario, [], 0.0, 0)
            start = time.perf_counter()
            clients = [asyncio.create_task(stream_one(session, gw.url, t, texts[t.index])) for t in burst]
            control = None
            if scenario == "migration":
                control = asyncio.create_task(migration_loop(session, gw.url, engines, burst, out))
            elif scenario == "kunserve":
                control = asyncio.create_task(kunserve_loop(session, gw.url, engines, burst, out, start))
            await asyncio.gather(*clients)
            if control is not None:
                await control
        bad = [t.index for t in burst if t.finish_reason != "length" or t.generated < args.max_tokens]
        if bad:
            got = [(burst[i].generated, burst[i].finish_reason) for i in bad]
            raise RuntimeError(
                f"{scenario}: requests {bad} did not stream all {args.max_tokens} tokens: {got}"
            )
        out.ttft = [t.first_token - t.sent for t in burst]
        out.makespan = max(t.done for t in burst) - start
        out.output_tokens = sum(t.generated for t in burst)
        out.prompt_tokens = [t.prompt_tokens for t in burst]
        return out
    finally:
        if gw is not None:
            gw.kill()
        for s in servers:
            s.stop()


def print_table(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["scenario"] == "plain"), None)
    head = ("scenario", "TTFT p50", "TTFT p99", "p99 gain", "makespan", "tok/s", "moves")
    print("{:<10} {:>9} {:>9} {:>8} {:>9} {:>7} {:>5}".format(*head))
    for r in rows:
        gain = f"{base['ttft_p99_s'] / r['ttft_p99_s']:.2f}x" if base else "-"
        print(f"{r['scenario']:<10} {r['ttft_p50_s']:>8.2f}s {r['ttft_p99_s']:>8.2f}s {gain:>8} "
              f"{r['makespan_s']:>8.1f}s {r['output_tok_s']:>7.1f} {r['moves']:>5}")  # fmt: skip
    for r in rows:
        if "merge_at_s" in r:
            print(f"kunserve merge: started {r['merge_at_s']} s into the burst, "
                  f"paused {r['merge_paused_s']} s "
                  f"(total {r['merge_total_s']} s), KV blocks {r['kv_blocks']}, requeued {r['requeued']} "
                  f"requests ({r['requeued_tokens']} tokens recomputed)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--blocks", type=int, default=12, help="KV blocks per engine (128 tokens each)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--scenarios", default="plain,migration,kunserve")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path, help="keep sockets, stores and the gateways' logs here")
    args = p.parse_args()
    model = ensure_tiny_model(args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slofleet-kunserve-bench-") as d:
        work = args.workdir or Path(d)
        work.mkdir(parents=True, exist_ok=True)
        for scenario in args.scenarios.split(","):
            print(f"running {scenario} ...", flush=True)
            out = asyncio.run(run_scenario(scenario, model, args, work))
            rows.append(out.row())
            for note in out.notes:
                print(f"  {scenario}: {note}")
    print(f"\n{args.requests} requests x {args.max_tokens} tokens (prompts {rows[0]['prompt_tokens_mean']} "
          f"tokens on average), all at once, model {args.size}, "
          f"{args.blocks} KV blocks per engine, 2 engines (1 core each), eager")  # fmt: skip
    print_table(rows)
    if args.json:
        record = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
