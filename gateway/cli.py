"""`slofleet gateway`: serve the OpenAI-compatible gateway (configure is cheap; run imports aiohttp)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slofleet.gateway.config import GatewayConfig, ServiceDefaults
from slofleet.instance import RequestClass
from slofleet.policies.dispatch import DispatchParams, DispatchPolicy


def configure(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    s = ServiceDefaults()
    p = DispatchParams()
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    src = parser.add_argument_group("instances (one of)")
    src.add_argument("--engine", action="append", default=[], metavar="URL",
                     help="a vLLM base URL the gateway tracks itself (static mode; repeat)")  # fmt: skip
    src.add_argument("--sidecar", action="append", default=[], metavar="HOST:PORT",
                     help="an instance's sidecar gRPC address; load from its WatchLoad (repeat)")  # fmt: skip
    src.add_argument("--sidecar-dns", metavar="NAME:PORT",
                     help="a headless Service name; each of its addresses is a sidecar")  # fmt: skip
    src.add_argument("--instances-file", type=Path, metavar="PATH",
                     help="JSON list of {sidecar_address: ...}, re-read on change")  # fmt: skip
    src.add_argument("--discovery-interval", type=float, default=2.0, help="seconds between re-reads")
    src.add_argument("--sidecar-token-file", type=Path, help="file holding the sidecars' bearer token")
    parser.add_argument("--concurrency-limit", type=int, default=d.concurrency_limit,
                        help="per-instance limit in static mode (sidecars send theirs)")  # fmt: skip
    parser.add_argument("--dispatch", choices=[x.value for x in DispatchPolicy], default=p.policy.value)
    parser.add_argument("--locality-weight", type=float, default=p.locality_weight)
    parser.add_argument("--burst-factor", type=float, default=p.burst_factor,
                        help="interactive overflow past the local limits when all are full, as a multiple"
                             " of each limit (1 makes the limit hard)")  # fmt: skip
    parser.add_argument(
        "--default-class", choices=[c.value for c in RequestClass], default=s.request_class.value
    )
    parser.add_argument("--interactive-priority", type=int, default=s.interactive_priority)
    parser.add_argument("--batch-priority", type=int, default=s.batch_priority)
    parser.add_argument("--batch-deadline-seconds", type=float, default=s.batch_deadline_seconds,
                        help="deadline of a batch created without completion_window")  # fmt: skip
    parser.add_argument("--max-queued", type=int, default=d.max_queued_interactive,
                        help="interactive requests that may wait for a slot; more get 429")  # fmt: skip
    parser.add_argument("--queue-timeout-seconds", type=float, default=d.queue_timeout_seconds)
    parser.add_argument("--db", type=Path, default=d.db_path, help="SQLite file of the durable batch queue")
    parser.add_argument("--log-level", default=d.log_level)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if not (args.engine or args.sidecar or args.sidecar_dns or args.instances_file):
        raise SystemExit(
            "slofleet gateway: give --engine URL, --sidecar HOST:PORT, --sidecar-dns NAME:PORT"
            " or --instances-file PATH"
        )
    token = args.sidecar_token_file.read_text().strip() if args.sidecar_token_file else None
    try:
        dispatch = DispatchParams(
            policy=DispatchPolicy(args.dispatch),
            locality_weight=args.locality_weight,
            burst_factor=args.burst_factor,
        )
    except ValueError as e:
        raise SystemExit(f"slofleet gateway: --burst-factor: {e}") from None
    return GatewayConfig(
        host=args.host,
        port=args.port,
        engines=tuple(args.engine),
        sidecars=tuple(args.sidecar),
        sidecar_token=token,
        concurrency_limit=args.concurrency_limit,
        defaults=ServiceDefaults(
            request_class=RequestClass(args.default_class),
            interactive_priority=args.interactive_priority,
            batch_priority=args.batch_priority,
            batch_deadline_seconds=args.batch_deadline_seconds,
        ),
        dispatch=dispatch,
        max_queued_interactive=args.max_queued,
        queue_timeout_seconds=args.queue_timeout_seconds,
        db_path=args.db,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from aiohttp import web

    from slofleet.gateway.server import Gateway

    config = config_from_args(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s service=gateway %(message)s",
    )
    gateway = Gateway(config)
    app = gateway.app()
    if args.sidecar_dns or args.instances_file:
        _add_discovery(app, gateway, args, config.sidecar_token)
    # uvloop roughly halves the event loop's cost per relayed chunk, CPU the engine on the same
    # node would otherwise lose (bench/gateway_overhead.py).
    import uvloop

    web.run_app(
        app, host=config.host, port=config.port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )
    return 0


def _add_discovery(app: Any, gateway: Any, args: argparse.Namespace, token: str | None) -> None:
    """Follow sidecars as they come and go (runs after the gateway's own start-up)."""
    import asyncio
    import contextlib

    from slofleet.gateway.discovery import SidecarDiscovery, dns_source, file_source

    source = file_source(args.instances_file) if args.instances_file else dns_source(args.sidecar_dns)

    async def start(_app: Any) -> None:
        discovery = SidecarDiscovery(gateway.pool, gateway.session, token, gateway.scheduler.prefix.forget)
        _app["discovery"] = asyncio.create_task(discovery.run(source, args.discovery_interval))

    async def stop(_app: Any) -> None:
        _app["discovery"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _app["discovery"]

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)
