"""`slofleet tiny-model DIR`: write a generated model folder (see slofleet.tinymodel)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from slofleet.tinymodel import SIZES

    parser.add_argument("dir", help="output folder")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from slofleet.tinymodel import write_tiny_model

    out = write_tiny_model(args.dir, args.size, args.seed)
    print(out)
    return 0
