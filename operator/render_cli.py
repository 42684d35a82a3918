"""`slofleet render -f FILE`: print the objects the operator would create for an LLMService."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="LLMService YAML file")
    parser.add_argument("-n", "--namespace", default="default", help="namespace when the file sets none")
    parser.add_argument(
        "--uid",
        help="owner uid for ownerReferences (omitted by default: a made-up uid would let the "
        "garbage collector delete the objects if they were applied)",
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from slofleet.operator.render import Images, render_all
    from slofleet.spec import SpecError, load_llmservice_file, semantic_problems

    try:
        service = load_llmservice_file(args.filename, default_namespace=args.namespace)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = semantic_problems(service.spec)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    if args.uid:
        service = dataclasses.replace(service, uid=args.uid)
    sys.stdout.write(yaml.safe_dump_all(render_all(service, Images.from_env()), sort_keys=False))
    return 0
