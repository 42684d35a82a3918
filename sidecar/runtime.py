"""The running sidecar: engine poller, gRPC server and metrics endpoint on one event loop.

`Sidecar` is what `slofleet sidecar` runs and what tests and the local fleet start in-process:

    sidecar = Sidecar(SidecarConfig(engine_url=..., instance_id=..., token=...))
    await sidecar.start()          # binds ports (0 = any free port; see .grpc_port/.metrics_port)
    ...
    await sidecar.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slofleet.api.v1 import sidecar_pb2_grpc as pb_grpc
from slofleet.instance import Pool
from slofleet.policies.local_autoscaler import LocalAutoscalerConfig
from slofleet.sidecar.engine import EngineError, VllmEngine
from slofleet.sidecar.exporter import SidecarMetrics
from slofleet.sidecar.local_limit import LocalLimitController
from slofleet.sidecar.memory.service import MemoryMetrics, MemoryService, add_memory_service
from slofleet.sidecar.migration import DEFAULT_KV_CONTROL_SOCKET
from slofleet.sidecar.migration.engine_link import KVControl
from slofleet.sidecar.migration.service import GRPC_OPTIONS as MIGRATION_GRPC_OPTIONS
from slofleet.sidecar.migration.service import MigrationMetrics, MigrationService, add_migration_service
from slofleet.sidecar.service import BearerTokenInterceptor, ExpectedToken, HealthReporter, SidecarService
from slofleet.sidecar.state import SidecarState
from slofleet.sidecar.weightstore import DEFAULT_ROOT as DEFAULT_WEIGHT_STORE
from slofleet.sidecar.window import SampleWindow

log = logging.getLogger("slofleet.sidecar")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    engine_url: str
    instance_id: str
    token: str
    # The file the token came from (a mounted Secret): re-read when it changes, so rotation
    # needs no restart.
    token_file: Path | None = None
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0
    poll_interval_seconds: float = 0.1
    health_interval_seconds: float = 0.5
    watch_interval_seconds: float = 1.0
    concurrency_limit: int = 256
    pool: Pool = Pool.MIXED
    rate_window_seconds: float = 10.0
    latency_window_seconds: float = 60.0
    request_ttl_seconds: float = 3600.0
    # Chiron's local autoscaler sets the concurrency limit when given (None: the limit is static
    # unless SetLimits changes it).
    local_autoscaler: LocalAutoscalerConfig | None = None
    # The host weight store (shared memory of the pod) behind DropLayers/RestoreLayers/Standby.
    weight_store_dir: str = DEFAULT_WEIGHT_STORE
    # The engine's KV connector control socket (its --kv-transfer-config names the same path, in the
    # pod's shared /dev/shm): with it the sidecar serves the Migration service; None turns it off.
    kv_control_socket: str | None = DEFAULT_KV_CONTROL_SOCKET
    # Where migration segments live: shared memory both containers of the pod see.
    migration_shm_dir: str = "/dev/shm"

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError(
                "token: the sidecar's gRPC port requires a bearer token "
                "(SLOFLEET_SIDECAR_TOKEN or --token-file)"
            )
        if not 0 < self.poll_interval_seconds <= 10:
            raise ValueError(f"poll_interval_seconds: must be in (0, 10], got {self.poll_interval_seconds}")
        if not 1 <= self.concurrency_limit <= 100_000:
            raise ValueError(f"concurrency_limit: must be between 1 and 100000, got {self.concurrency_limit}")


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.state = SidecarState(
            config.instance_id,
            concurrency_limit=config.concurrency_limit,
            pool=config.pool,
            window=SampleWindow(config.rate_window_seconds, config.latency_window_seconds),
            request_ttl_seconds=config.request_ttl_seconds,
        )
        self.engine = VllmEngine(config.engine_url)
        self.metrics = SidecarMetrics(self.state)
        self.health = HealthReporter()
        self.service = SidecarService(
            self.state, engine_url=config.engine_url, watch_interval_seconds=config.watch_interval_seconds
        )
        self.local_limit = (
            LocalLimitController(self.state, config.local_autoscaler) if config.local_autoscaler else None
        )
        self.memory = MemoryService(
            config.engine_url,
            config.weight_store_dir,
            metrics=MemoryMetrics(self.metrics.registry),
            peer_token=config.token,
            on_status=lambda status: self.state.set_layers_resident(status.layers_resident),
        )
        self.migration = (
            MigrationService(
                KVControl(config.kv_control_socket, config.engine_url),
                shm_dir=config.migration_shm_dir,
                metrics=MigrationMetrics(self.metrics.registry),
                peer_token=config.token,
            )
            if config.kv_control_socket
            else None
        )
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._web: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._engine_ok = False
        self._next_health = 0.0
        self._next_info_try = 0.0

    async def start(self) -> None:
        cfg = self.config
        await self.engine.start()
        await self.health.set(False)
        server = grpc.aio.server(
            interceptors=[
                BearerTokenInterceptor(ExpectedToken(cfg.token, cfg.token_file), self._auth_failed)
            ],
            # Migration's PushKV chunks are up to 4 MiB of KV plus framing: above gRPC's default cap.
            options=[("grpc.so_reuseport", 0), *MIGRATION_GRPC_OPTIONS],
        )
        pb_grpc.add_SidecarServicer_to_server(self.service, server)
        await self.memory.start()
        add_memory_service(server, self.memory)
        if self.migration is not None:
            add_migration_service(server, self.migration)
        self.health.add_to(server)
        self.grpc_port = server.add_insecure_port(f"{cfg.grpc_host}:{cfg.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"grpc_port: cannot bind {cfg.grpc_host}:{cfg.grpc_port}")
        await server.start()
        self._server = server

        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.metrics_host, cfg.metrics_port)
        await site.start()
        self._web = runner
        sockets = site._server.sockets if site._server else []  # aiohttp exposes no public getter
        self.metrics_port = sockets[0].getsockname()[1] if sockets else cfg.metrics_port

        self._tasks = [asyncio.create_task(self._poll_loop(), name="sidecar-poll")]
        log.info(
            "sidecar %s up: engine %s, gRPC :%d, metrics :%d",
            cfg.instance_id, cfg.engine_url, self.grpc_port, self.metrics_port,
        )  # fmt: skip

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._server is not None:
            await self.health.servicer.enter_graceful_shutdown()
            await self._server.stop(grace=1.0)
            self._server = None
        if self._web is not None:
            await self._web.cleanup()
            self._web = None
        await self.memory.close()
        await self.engine.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _auth_failed(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason).inc()

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _poll_loop(self) -> None:
        """Run `_tick` on a fixed 10 Hz schedule (not `interval` after each tick, so slow scrapes do
        not lower the rate; missed ticks are skipped). Nothing a tick raises stops the loop."""
        interval = self.config.poll_interval_seconds
        next_tick = time.monotonic()
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("sidecar poll tick failed; continuing")
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:
                next_tick = now + interval - (now - next_tick) % interval
            await asyncio.sleep(next_tick - now)

    async def _tick(self) -> None:
        """Check `/health` every health interval, scrape `/metrics`, publish; fetch `Info` once
        the engine is up (and again after it comes back from a restart)."""
        cfg = self.config
        now = time.monotonic()
        if now >= self._next_health:
            self._next_health = now + cfg.health_interval_seconds
            self._engine_ok = await self.engine.healthy()
        ok = self._engine_ok
        if ok:
            t0 = time.perf_counter()
            sent_unix_nanos = time.time_ns()
            try:
                sample = await self.engine.scrape()
            except EngineError as e:
                self.metrics.scrape_errors.inc()
                log.warning("engine scrape failed: %s", e)
                ok = self._engine_ok = False
            else:
                self.metrics.scrape_duration.observe(time.perf_counter() - t0)
                self.state.observe(sample, read_unix_nanos=sent_unix_nanos)
                if self.local_limit is not None:
                    self.local_limit.observe(time.monotonic(), sample)
        if not ok and (self.state.healthy or self.state.info is not None):
            log.warning("engine at %s is down", cfg.engine_url)
            self.state.engine_down()
        if ok and self.state.info is None and now >= self._next_info_try:
            self._next_info_try = now + 1.0
            await self._refresh_info()
        await self.health.set(ok and self.state.info is not None)

    async def _refresh_info(self) -> None:
        try:
            self.state.info = await self.engine.info()
        except EngineError as e:
            log.warning("engine info not available yet: %s", e)
            return
        info = self.state.info
        log.info(
            "engine %s: model %s, %d KV blocks x %d tokens (%d bytes/block, %s %s), %d layers",
            info.engine_version, info.model, info.kv.num_blocks, info.kv.block_size_tokens,
            info.kv.bytes_per_block, info.kv.dtype, info.kv.layout, info.kv.num_layers,
        )  # fmt: skip
