"""`slofleet status`: the instances of a running `slofleet up`, their load and local limits."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path


def read_state(state_dir: Path) -> dict:
    path = state_dir / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"no running `slofleet up` found: {path} does not exist (start one, or pass --state-dir)"
        ) from None


def gateway_status(gateway_url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{gateway_url}/slofleet/v1/status", timeout=3) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def main(args: argparse.Namespace) -> int:
    state = read_state(args.state_dir)
    live = gateway_status(state["gateway_url"])
    if args.json:
        print(json.dumps({"up": state, "gateway": live}, indent=1))
        return 0 if live is not None else 1
    print(f"service {state['service']}  model {state['model']}  gateway {state['gateway_url']}")
    if live is None:
        print("gateway: not answering (is `slofleet up` still running?)")
        return 1
    counters = state["counters"]
    standby = sum(1 for i in state.get("instances", []) if i["phase"] == "standby")
    print(
        f"interactive queue {live.get('interactive_queue_depth', 0)}"
        f"  batch queue {live.get('batch_queue_depth', 0)}"
        f"  scale events {counters.get('scale_events', 0)}  replacements {counters.get('replacements', 0)}"
        f"  standby {standby}"
    )
    loads = {i["instance_id"]: i for i in live.get("instances", [])}
    widths = ((28, "<"), (12, "<"), (9, "<"), (6, "<"), (9, ">"), (6, ">"), (9, ">"))

    def row(cells: tuple[object, ...]) -> str:
        return " ".join(f"{c!s:{a}{w}}" for c, (w, a) in zip(cells, widths, strict=True))

    print(row(("instance", "pool", "phase", "ready", "in flight", "limit", "KV free")))
    keys = ("ready", "in_flight", "concurrency_limit", "kv_free_blocks")
    for inst in state.get("instances", []):
        g = loads.get(inst["instance_id"], {})
        print(row((inst["instance_id"], inst["pool"], inst["phase"], *(g.get(k, "-") for k in keys))))
    return 0
