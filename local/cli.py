"""`slofleet up`, `slofleet replay` and `slofleet status` (argument parsing only; run imports)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("SLOFLEET_STATE_DIR", ".slofleet"))


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help="folder for logs, the batch queue and state.json (default: %(default)s)",
    )  # fmt: skip


def configure_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--file", type=Path,
        help="an LLMService YAML (default: the built-in tiny CPU sample, no download, no GPU)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, help="gateway port (default: a free one)")
    _state_dir(parser)


def run_up(args: argparse.Namespace) -> int:
    import logging

    from slofleet.local.up import run_up as _run_up
    from slofleet.spec import SpecError, load_llmservice_file, parse_llmservice

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.file is None:
            from importlib import resources

            import yaml

            text = (resources.files("slofleet") / "data" / "samples" / "local-tiny.yaml").read_text()
            service = parse_llmservice(yaml.safe_load(text))
        else:
            service = load_llmservice_file(args.file)
    except (SpecError, OSError) as exc:
        print(f"slofleet up: {exc}")
        return 2
    return _run_up(service, args.state_dir, args.port)


def configure_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", default="azure-conv", help="shipped trace name or an Azure CSV / Mooncake JSONL"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="time compression (2 = twice as fast)")
    parser.add_argument("--load", type=float, default=1.0, help="load scaling (2 = twice the requests)")
    parser.add_argument("--start", type=float, default=0.0, help="trace second to start from")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of replay (wall clock)")
    parser.add_argument("--batch-fraction", type=float, default=0.0, help="share of requests sent as batch")
    parser.add_argument("--max-prompt-tokens", type=int, help="cap prompts (default: fit the model)")
    parser.add_argument("--gateway", help="gateway URL (default: from the state folder of `slofleet up`)")
    parser.add_argument("--model", help="served model name (default: from the state folder)")
    parser.add_argument("--out", type=Path, help="folder for the report and plots (default: STATE/replay)")
    parser.add_argument("--seed", type=int, default=0)
    _state_dir(parser)


def run_replay(args: argparse.Namespace) -> int:
    from slofleet.local.replay_cli import main

    return main(args)


def configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw status")
    _state_dir(parser)


def run_status(args: argparse.Namespace) -> int:
    from slofleet.local.status import main

    return main(args)
