"""The sidecar's gRPC API (`slofleet.v1.Sidecar`), its bearer-token guard and the health service.

Handlers validate every field and answer INVALID_ARGUMENT naming it (`field: what is wrong`); no
input can raise out of a handler. They read the state's latest snapshot and never call the engine
on the request path, which is what keeps `Load` in the sub-millisecond range.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from slofleet.api.convert import CLASS_FROM_PB, load_to_pb
from slofleet.api.convert import request_from_pb as trusted_request_from_pb
from slofleet.api.v1 import sidecar_pb2 as pb
from slofleet.api.v1 import sidecar_pb2_grpc as pb_grpc
from slofleet.instance import InstanceLoad, RequestInfo
from slofleet.sidecar.state import SidecarState

log = logging.getLogger("slofleet.sidecar.service")

SERVICE_NAME = "slofleet.v1.Sidecar"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Above this a concurrency limit is a unit mistake (tokens? bytes?), not a limit.
MAX_CONCURRENCY_LIMIT = 100_000
MAX_DRAIN_TIMEOUT_SECONDS = 24 * 3600.0
MIN_WATCH_INTERVAL_MS = 10
MAX_WATCH_INTERVAL_MS = 3_600_000
MAX_REQUEST_ID_CHARS = 256
MAX_SOURCE_CHARS = 64


class InvalidArgument(ValueError):
    """A request field is wrong; the message starts with the field's path."""


def request_from_pb(msg: pb.RequestInfo, path: str, *, need_sizes: bool = True) -> RequestInfo:
    """Validate and convert; `path` prefixes field names in errors (e.g. `events[3].request`)."""
    if not msg.request_id:
        raise InvalidArgument(f"{path}.request_id: must not be empty")
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"{path}.request_id: at most {MAX_REQUEST_ID_CHARS} characters")
    if need_sizes and msg.request_class not in CLASS_FROM_PB:
        raise InvalidArgument(
            f"{path}.request_class: must be REQUEST_CLASS_INTERACTIVE or REQUEST_CLASS_BATCH"
        )
    for name in ("prompt_tokens", "max_tokens", "generated_tokens"):
        if getattr(msg, name) < 0:
            raise InvalidArgument(f"{path}.{name}: must be >= 0, got {getattr(msg, name)}")
    if need_sizes and msg.prompt_tokens < 1:
        raise InvalidArgument(f"{path}.prompt_tokens: must be >= 1, got {msg.prompt_tokens}")
    return trusted_request_from_pb(msg)


def validate_limit(request: pb.SetLimitsRequest) -> int:
    limit = request.concurrency_limit
    if limit < 1 or limit > MAX_CONCURRENCY_LIMIT:
        raise InvalidArgument(
            f"concurrency_limit: must be between 1 and {MAX_CONCURRENCY_LIMIT}, got {limit}"
        )
    if len(request.source) > MAX_SOURCE_CHARS:
        raise InvalidArgument(f"source: at most {MAX_SOURCE_CHARS} characters")
    return limit


def validate_drain_timeout(request: pb.DrainRequest) -> float:
    t = request.timeout_seconds
    if not math.isfinite(t) or t < 0 or t > MAX_DRAIN_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"timeout_seconds: must be 0 (wait until empty) or up to {MAX_DRAIN_TIMEOUT_SECONDS:.0f}, got {t}"
        )
    return t


def validate_watch_interval(request: pb.WatchLoadRequest, default_seconds: float) -> float:
    ms = request.interval_milliseconds
    if ms == 0:
        return default_seconds
    if ms < MIN_WATCH_INTERVAL_MS or ms > MAX_WATCH_INTERVAL_MS:
        raise InvalidArgument(
            f"interval_milliseconds: must be 0 (default) or between {MIN_WATCH_INTERVAL_MS} and "
            f"{MAX_WATCH_INTERVAL_MS}, got {ms}"
        )
    return ms / 1000.0


class SidecarService(pb_grpc.SidecarServicer):
    def __init__(self, state: SidecarState, *, engine_url: str, watch_interval_seconds: float = 1.0) -> None:
        self.state = state
        self.engine_url = engine_url
        self.watch_interval_seconds = watch_interval_seconds
        self._pb_cache: tuple[InstanceLoad, pb.InstanceLoad] | None = None

    def _load_pb(self) -> pb.InstanceLoad:
        snap = self.state.snapshot
        if self._pb_cache is None or self._pb_cache[0] is not snap:
            self._pb_cache = (snap, load_to_pb(snap, self.state.snapshot_unix_nanos))
        return self._pb_cache[1]

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InstanceInfo:
        info = self.state.info
        if info is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"engine at {self.engine_url} not ready yet; retry after health is SERVING",
            )
        assert info is not None
        return pb.InstanceInfo(
            instance_id=self.state.instance_id,
            model=info.model,
            engine="vllm",
            engine_version=info.engine_version,
            block_size_tokens=info.kv.block_size_tokens,
            kv_total_blocks=info.kv.num_blocks,
            kv_bytes_per_block=info.kv.bytes_per_block,
            kv_dtype=info.kv.dtype,
            kv_layout=info.kv.layout,
            layers_total=info.kv.num_layers,
            layers_resident=info.kv.num_layers,
            num_kv_heads=info.kv.num_kv_heads,
            head_size=info.kv.head_size,
            engine_url=self.engine_url,
            max_model_len_tokens=info.max_model_len_tokens,
        )

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.InstanceLoad:
        return self._load_pb()

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InstanceLoad]:
        try:
            interval = validate_watch_interval(request, self.watch_interval_seconds)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        while True:
            yield self._load_pb()
            try:
                async with asyncio.timeout(interval):
                    await self.state.wait_changed()
            except TimeoutError:
                pass

    async def SetLimits(
        self, request: pb.SetLimitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetLimitsResponse:
        try:
            limit = validate_limit(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        old = self.state.concurrency_limit
        self.state.set_limit(limit)
        log.info(
            "concurrency limit %d -> %d (source=%s)", old, limit, request.source or "unknown",
            extra={"instance_id": self.state.instance_id},
        )  # fmt: skip
        return pb.SetLimitsResponse(concurrency_limit=limit)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        try:
            timeout = validate_drain_timeout(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        state = self.state
        if request.cancel:
            state.set_draining(False)
            log.info("drain cancelled", extra={"instance_id": state.instance_id})
            return pb.DrainResponse(drained=False, requests_in_flight=state.in_flight)
        if not state.draining:
            log.info("draining", extra={"instance_id": state.instance_id})
        state.set_draining(True)
        # Judge emptiness only on engine samples taken after the drain began: an older sample
        # may predate a request the gateway sent just before it saw the drain.
        first_sample = state.samples_total + 1
        deadline = None if timeout == 0 else time.monotonic() + timeout
        while True:
            if state.healthy and state.samples_total >= first_sample and state.in_flight == 0:
                return pb.DrainResponse(drained=True, requests_in_flight=0)
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return pb.DrainResponse(drained=False, requests_in_flight=state.in_flight)
            try:
                async with asyncio.timeout(min(remaining, 0.5)):
                    await state.wait_changed()
            except TimeoutError:
                pass

    async def ReportRequests(
        self, request_iterator: AsyncIterator[pb.RequestEvent], context: grpc.aio.ServicerContext
    ) -> pb.ReportRequestsResponse:
        accepted = 0
        state = self.state
        # The gateway keeps this stream open for as long as it runs: events must reach the Load
        # while it is open, not when it closes. One publish per loop turn covers a burst of events.
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Handle] = []

        def publish() -> None:
            pending.clear()
            state.requests_reported()

        try:
            async for event in request_iterator:
                path = f"events[{accepted}].request"
                if event.kind == pb.RequestEvent.KIND_ADMITTED:
                    state.request_admitted(request_from_pb(event.request, path))
                elif event.kind == pb.RequestEvent.KIND_PROGRESS:
                    state.request_progress(request_from_pb(event.request, path))
                elif event.kind == pb.RequestEvent.KIND_FINISHED:
                    state.request_finished(request_from_pb(event.request, path, need_sizes=False).request_id)
                else:
                    raise InvalidArgument(f"events[{accepted}].kind: must be ADMITTED, PROGRESS or FINISHED")
                accepted += 1
                if not pending:
                    pending.append(loop.call_soon(publish))
        except InvalidArgument as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{e} ({accepted} earlier events were applied)"
            )
        finally:
            for handle in pending:
                handle.cancel()
            state.requests_reported()
        return pb.ReportRequestsResponse(events_accepted=accepted)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises; this makes it an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)


class ExpectedToken:
    """The bearer token the sidecar accepts. With `path` (a mounted Kubernetes Secret), the file is
    re-read when it changes, checked at most once per `check_seconds`: the kubelet swaps the
    mounted file on rotation, and the sidecar must follow without a restart. A changed file that
    is unreadable or empty keeps the previous token (and is logged), never an empty one."""

    def __init__(self, token: str, path: Path | None = None, check_seconds: float = 1.0) -> None:
        if not token:
            raise ValueError("token: must not be empty")
        self._header = f"Bearer {token}".encode()
        self._path = path
        self._check_seconds = check_seconds
        self._next_check = time.monotonic() + check_seconds
        self._mtime_ns = self._stat()

    def _stat(self) -> int | None:
        if self._path is None:
            return None
        try:
            return os.stat(self._path).st_mtime_ns
        except OSError:
            return None

    def header(self) -> bytes:
        """The whole expected `authorization` value, `Bearer <token>`."""
        if self._path is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self._check_seconds
            mtime = self._stat()
            if mtime != self._mtime_ns:
                self._mtime_ns = mtime
                try:
                    token = self._path.read_text().strip()
                except OSError as e:
                    token = ""
                    log.warning("token file %s unreadable (%s); keeping the previous token", self._path, e)
                if token:
                    self._header = f"Bearer {token}".encode()
                    log.info("bearer token reloaded from %s", self._path)
        return self._header


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <token>` (UNAUTHENTICATED).

    The standard health service stays open: kubelet's gRPC probes cannot send metadata, and
    health reveals only SERVING/NOT_SERVING. Everything else (load, limits, drain) needs the token.
    """

    def __init__(self, token: ExpectedToken, on_failure: Callable[[str], None]) -> None:
        self._token = token
        self._on_failure = on_failure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        if presented is not None and hmac.compare_digest(presented, self._token.header()):
            return await continuation(handler_call_details)
        reason = "missing" if presented is None else "invalid"
        self._on_failure(reason)
        log.warning("refused %s: %s bearer token", method, reason)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _deny(handler, f"authorization: {reason} bearer token (send 'authorization: Bearer <token>')")


class HealthReporter:
    """Keeps the standard health service in step with the engine's health."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self.serving: bool | None = None

    async def set(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, status)

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
