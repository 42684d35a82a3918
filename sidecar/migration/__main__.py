"""Run the Migration gRPC service alone, next to one engine (local fleets, tests, benchmarks).

    python -m slofleet.sidecar.migration --port 50071 --engine-url http://127.0.0.1:8000 \
        --control-socket /dev/shm/slofleet-a/kv.sock

In a pod the sidecar mounts `MigrationService` on its own gRPC server instead
(`add_migration_service(server, MigrationService(KVControl(socket, engine_url)))`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from prometheus_client import start_http_server

from slofleet.sidecar.migration.engine_link import KVControl
from slofleet.sidecar.migration.service import GRPC_OPTIONS, MigrationService, add_migration_service


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_migration_service(
        server, MigrationService(KVControl(args.control_socket, args.engine_url), shm_dir=args.shm_dir)
    )
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    logging.getLogger("slofleet.sidecar.migration").info("Migration service on %s:%d", args.host, args.port)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m slofleet.sidecar.migration")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-url", required=True, help="the engine's OpenAI server, for /abort_requests")
    parser.add_argument("--control-socket", required=True, help="the KV connector's control_socket")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics (0: off)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.metrics_port:
        start_http_server(args.metrics_port)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
