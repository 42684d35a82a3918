"""Serve `slofleet.v1.Memory` on its own: `python -m slofleet.sidecar.memory --engine-url URL
--store-dir DIR [--port P] [--metrics-port M]`.

The pod's sidecar mounts `MemoryService` on its own gRPC server (`add_memory_service`); this
entry point runs the same service as a separate process, which is what the sidecar-restart test
and the drop/restore benchmark need (kill it, start it again, carry on). It prints
`memory service listening on <port>` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from slofleet.sidecar.memory.service import MemoryMetrics, MemoryService, add_memory_service
from slofleet.sidecar.weightstore import DEFAULT_ROOT


async def serve(args: argparse.Namespace) -> None:
    registry = CollectorRegistry()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=registry)
    service = MemoryService(
        args.engine_url, args.store_dir, metrics=MemoryMetrics(registry), peer_token=args.peer_token
    )
    await service.start()
    server = grpc.aio.server()
    add_memory_service(server, service)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise OSError(f"port: cannot bind {args.host}:{args.port}")
    await server.start()
    print(f"memory service listening on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m slofleet.sidecar.memory", description=__doc__)
    parser.add_argument("--engine-url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--store-dir", default=os.environ.get("SLOFLEET_WEIGHT_STORE", DEFAULT_ROOT))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--peer-token", default=os.environ.get("SLOFLEET_SIDECAR_TOKEN", ""))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
