"""The `slofleet` console command: the composition root of the runtimes.

Each subcommand lives in its runtime's `cli` module, which defines `configure(parser)` (arguments
only, cheap to import) and `run(args) -> int` (imports the heavy parts); "module:name" means
`configure_name`/`run_name` in that module. This module is the one
place allowed to reach into every runtime; tests/test_architecture.py exempts it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from slofleet import __version__

# subcommand -> (module with configure/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": ("slofleet.tinymodel_cli", "write a seeded random-weight Llama model and tokenizer"),
    "simulate": ("slofleet.sim.cli", "replay a trace through the fleet policies and compare them"),
    "gateway": ("slofleet.gateway.cli", "serve the OpenAI-compatible gateway in front of vLLM instances"),
    "sidecar": ("slofleet.sidecar.cli", "run the per-pod sidecar beside a vLLM engine (gRPC + metrics)"),
    "up": ("slofleet.local.cli:up", "run the whole system locally over vLLM processes (no cluster)"),
    "replay": ("slofleet.local.cli:replay", "drive a running `slofleet up` with a real trace and report"),
    "status": ("slofleet.local.cli:status", "show the instances of a running `slofleet up`, load and limits"),
    "operator": ("slofleet.operator.cli", "run the Kubernetes operator that reconciles LLMServices"),
    "render": ("slofleet.operator.render_cli", "print the Kubernetes objects of an LLMService YAML file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slofleet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"slofleet {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module_path, _, suffix = module_name.partition(":")
        module = importlib.import_module(module_path)
        suffix = f"_{suffix}" if suffix else ""
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"configure{suffix}")(sub)
        sub.set_defaults(_run=getattr(module, f"run{suffix}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
