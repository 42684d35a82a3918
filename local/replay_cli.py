"""`slofleet replay`: load a trace slice, send it live with a progress bar, print the report."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
import urllib.request
from pathlib import Path

from slofleet.instance import RequestClass
from slofleet.local.replay import Arrival, replay
from slofleet.local.report import SloTargets, format_report, plot, summarise
from slofleet.local.status import gateway_status, read_state
from slofleet.sim.traces import load_trace, shape

# Leave room for the chat template-free prompt and a few ids the tokenizer reserves.
SPECIAL_IDS = 16


def arrivals_from_trace(
    trace_name: str,
    start_s: float,
    duration_s: float,
    speed: float,
    load: float,
    batch_fraction: float,
    max_model_len: int,
    max_prompt_tokens: int | None,
    seed: int,
) -> tuple[list[Arrival], int]:
    """The trace slice that fits `duration_s` of wall time at `speed`; lengths capped so that
    prompt + output fits the model. Returns the arrivals and how many were capped."""
    trace = shape(load_trace(trace_name), start_s=start_s, duration_s=duration_s * speed,
                  time_scale=speed, load_scale=load, seed=seed)  # fmt: skip
    rng = random.Random(seed)
    cap_prompt = max_prompt_tokens or max_model_len
    arrivals, capped = [], 0
    for t, p, o in zip(trace.arrival_s, trace.prompt_tokens, trace.output_tokens, strict=True):
        out = max(1, min(int(o), max_model_len // 4))
        prompt = max(1, min(int(p), cap_prompt, max_model_len - out - 1))
        capped += int(prompt < int(p) or out < int(o))
        cls = RequestClass.BATCH if rng.random() < batch_fraction else RequestClass.INTERACTIVE
        arrivals.append(Arrival(float(t), prompt, out, cls))
    return arrivals, capped


def _vocab_size(model_path: str) -> int:
    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError):
        return 512


def _metric_sum(metrics_text: str, name_pattern: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(rf"^({name_pattern})(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(3))
    return total


def _gateway_metrics(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as resp:
            return resp.read().decode()
    except OSError:
        return ""


def main(args: argparse.Namespace) -> int:
    state = read_state(args.state_dir) if args.gateway is None or args.model is None else {}
    gateway = args.gateway or state["gateway_url"]
    model = args.model or state["service"]
    max_len = int(state.get("max_model_len") or 2048)
    arrivals, capped = arrivals_from_trace(
        args.trace, args.start, args.duration, args.speed, args.load, args.batch_fraction,
        max_len, args.max_prompt_tokens, args.seed,
    )  # fmt: skip
    if not arrivals:
        print(f"slofleet replay: the slice of {args.trace} holds no request; widen --duration or --start")
        return 2
    vocab = (SPECIAL_IDS, _vocab_size(state.get("model_path", "")))
    out_dir = args.out or (args.state_dir / "replay")
    print(
        f"replaying {len(arrivals)} requests of {args.trace} (from {args.start:g} s, speed x{args.speed:g},"
        f" load x{args.load:g}, {args.batch_fraction:.0%} batch; {capped} capped to the model) -> {gateway}",
        flush=True,
    )
    events_before = dict(state.get("counters", {}))
    metrics_before = _gateway_metrics(gateway)
    samples: list[tuple[float, int, int]] = []

    def sample(t: float) -> None:
        live = gateway_status(gateway)
        if live is not None:
            insts = live.get("instances", [])
            in_flight = sum(int(i.get("in_flight", 0)) for i in insts)
            in_flight += int(live.get("interactive_queue_depth", 0) or 0)
            samples.append((t, in_flight, sum(1 for i in insts if i.get("ready"))))

    shown = [-1]

    def progress(done: int, total: int) -> None:
        # Redraw only when the bar moves: a log file should get 40 updates, not one per request.
        width = 40
        filled = width * done // total
        if filled == shown[0] and done != total:
            return
        shown[0] = filled
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    started = time.monotonic()
    outcomes = asyncio.run(
        replay(gateway, model, arrivals, vocab, seed=args.seed, on_progress=progress, sample=sample)
    )
    duration = time.monotonic() - started
    after = read_state(args.state_dir).get("counters", {}) if state else {}
    metrics_after = _gateway_metrics(gateway)
    fleet_events = {
        "scale events": after.get("scale_events", 0) - events_before.get("scale_events", 0),
        "instance replacements": after.get("replacements", 0) - events_before.get("replacements", 0),
        "resumes": _metric_sum(metrics_after, r"slofleet_gateway_resumes_total")
        - _metric_sum(metrics_before, r"slofleet_gateway_resumes_total"),
        # Live migrations the control loop completed (the gateway counts cut-overs among resumes).
        "migrations": after.get("migrations", 0) - events_before.get("migrations", 0),
    }
    targets = state.get("slo") or {}
    slo = SloTargets(
        ttft_seconds=float(targets.get("ttft_seconds", 1.0)),
        itl_seconds=float(targets.get("itl_seconds", 0.1)),
        batch_deadline_seconds=float(targets.get("batch_deadline_seconds", 3600.0)),
    )
    rows = summarise(outcomes, slo)
    report = format_report(rows, duration, fleet_events, slo)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text(report + "\n")
    paths = plot(outcomes, samples, out_dir)
    print(report)
    print(f"plots: {', '.join(str(p) for p in paths)}")
    failed = [o for o in outcomes if not o.completed]
    for o in failed[:5]:
        print(f"incomplete: status {o.status}, {o.output_tokens}/{o.arrival.output_tokens} tokens {o.error}")
    return 0 if not failed else 1
