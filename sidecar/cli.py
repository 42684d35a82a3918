"""`slofleet sidecar`: run the per-pod sidecar next to a vLLM engine.

The bearer token comes from a file (`--token-file`, e.g. a mounted Kubernetes Secret) or from the
environment (SLOFLEET_SIDECAR_TOKEN); the file wins, and is re-read when it changes (Secret
rotation). There is no way to run without a token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from slofleet.sidecar.migration import DEFAULT_KV_CONTROL_SOCKET
from slofleet.sidecar.weightstore import DEFAULT_ROOT as DEFAULT_WEIGHT_STORE

if TYPE_CHECKING:
    from slofleet.sidecar.runtime import Sidecar

TOKEN_ENV = "SLOFLEET_SIDECAR_TOKEN"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine-url", required=True, help="the vLLM server beside it, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--instance-id", required=True, help="this instance's name (the pod name)")
    parser.add_argument("--grpc-host", default="0.0.0.0")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument(
        "--token-file", type=Path, help=f"file holding the gRPC bearer token (else ${TOKEN_ENV})"
    )
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds between engine scrapes")
    parser.add_argument(
        "--concurrency-limit", type=int, default=256, help="initial limit (SetLimits changes it)"
    )
    parser.add_argument("--pool", choices=["interactive", "mixed", "batch"], default="mixed")
    auto = parser.add_argument_group("local autoscaler (Chiron): the limit follows latency vs the SLO")
    auto.add_argument("--local-autoscaler", action="store_true", help="let the sidecar set its own limit")
    auto.add_argument("--ttft-slo-seconds", type=float, default=1.0)
    auto.add_argument("--itl-slo-ms", type=float, default=100.0)
    auto.add_argument("--max-concurrency", type=int, default=256, help="the limit never goes above this")
    parser.add_argument(
        "--weight-store", default=os.environ.get("SLOFLEET_WEIGHT_STORE", DEFAULT_WEIGHT_STORE),
        help="host weight store folder (pod shared memory) for layer drop/restore (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-control-socket",
        default=os.environ.get("SLOFLEET_KV_CONTROL_SOCKET", DEFAULT_KV_CONTROL_SOCKET),
        help="the engine's KV connector control socket (the control_socket of its --kv-transfer-config); "
        "'' turns live migration off (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO")


def read_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise SystemExit(f"--token-file: cannot read {token_file}: {e.strerror}") from e
        if not token:
            raise SystemExit(f"--token-file: {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise SystemExit(f"--token-file or ${TOKEN_ENV}: the sidecar's gRPC port needs a bearer token")
    return token


def run(args: argparse.Namespace) -> int:
    from slofleet.instance import Pool
    from slofleet.policies.local_autoscaler import LocalAutoscalerConfig
    from slofleet.sidecar.runtime import Sidecar, SidecarConfig

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [instance=" + args.instance_id + "] %(message)s",
    )
    try:
        config = SidecarConfig(
            engine_url=args.engine_url,
            instance_id=args.instance_id,
            token=read_token(args.token_file),
            token_file=args.token_file,
            grpc_host=args.grpc_host,
            grpc_port=args.grpc_port,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            poll_interval_seconds=args.poll_interval,
            concurrency_limit=args.concurrency_limit,
            pool=Pool(args.pool),
            local_autoscaler=(
                LocalAutoscalerConfig(
                    ttft_slo_s=args.ttft_slo_seconds,
                    itl_slo_s=args.itl_slo_ms / 1000.0,
                    max_limit=args.max_concurrency,
                    initial_limit=min(16, args.max_concurrency),
                )
                if args.local_autoscaler
                else None
            ),
            weight_store_dir=args.weight_store,
            kv_control_socket=args.kv_control_socket or None,
        )
    except ValueError as e:
        print(f"slofleet sidecar: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(Sidecar(config)))


async def _serve(sidecar: Sidecar) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    try:
        await stop.wait()
    finally:
        await sidecar.stop()
    return 0
