"""The aiohttp application: OpenAI routes, Files/Batch API, health, metrics, autoscaler status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slofleet.gateway.batch import BatchStore, parse_window, validate_batch_file
from slofleet.gateway.batch_runner import BatchRunner
from slofleet.gateway.config import GatewayConfig
from slofleet.gateway.errors import ApiError, invalid
from slofleet.gateway.instances import InstancePool, static_instance, watch_static_health
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.gateway.relay import Accumulator, ClientGone, Relay, RequestState
from slofleet.gateway.requests import classify, new_request_id, new_state
from slofleet.gateway.scheduler import Scheduler
from slofleet.gateway.validate import ROUTES, parse_json, parse_request

log = logging.getLogger("slofleet.gateway")
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_DUMPS(obj).encode(), content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI error object; nothing escapes as a bare 500 page."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge as exc:
        return ApiError(413, f"body: larger than the limit of {exc.max_size} bytes", param="body").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        msg = f"{request.method} {request.path}: {exc.reason}"
        return ApiError(exc.status, msg, code=exc.reason.lower().replace(" ", "_")).response()
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("event=internal_error path=%s", request.path)
        return ApiError(500, "internal error in the gateway (logged)").response()


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.pool = InstancePool()
        self.scheduler = Scheduler(
            self.pool,
            config.dispatch,
            self.metrics,
            config.max_queued_interactive,
            config.queue_timeout_seconds,
            config.retry_after_seconds,
        )
        self.store = BatchStore(config.db_path)
        self._tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None
        self.relay: Relay | None = None
        self.runner: BatchRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, _app: web.Application | None = None) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=5, sock_read=self.config.engine_read_timeout_seconds
        )
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self.relay = Relay(self.pool, self.scheduler, self.session, self.metrics, self.config.max_resumes)
        self.runner = BatchRunner(
            self.store, self.scheduler, self.relay, self.pool, self.metrics, self.config.chars_per_block
        )
        for url in self.config.engines:
            inst = static_instance(url, self.config.concurrency_limit)
            self.pool.instances[inst.instance_id] = inst
        if self.config.engines:
            self._spawn(
                watch_static_health(
                    self.session, self.pool, self.config.health_interval_seconds, self.scheduler.prefix.forget
                )
            )
        if self.config.sidecars:
            from slofleet.gateway.sidecar_client import watch_sidecar

            for address in self.config.sidecars:
                self._spawn(
                    watch_sidecar(
                        address,
                        self.config.sidecar_token,
                        self.pool,
                        self.session,
                        self.scheduler.prefix.forget,
                    )
                )
        self._spawn(self.runner.run())

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def stop(self, _app: web.Application | None = None) -> None:
        if self.runner:
            await self.runner.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session:
            await self.session.close()
        self.store.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=self.config.max_body_bytes)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/completions", self.generate)
        r.add_post("/v1/chat/completions", self.generate)
        r.add_post("/v1/files", self.upload_file)
        r.add_get("/v1/files", self.list_files)
        r.add_get("/v1/files/{file_id}", self.get_file)
        r.add_delete("/v1/files/{file_id}", self.delete_file)
        r.add_get("/v1/files/{file_id}/content", self.file_content)
        r.add_post("/v1/batches", self.create_batch)
        r.add_get("/v1/batches", self.list_batches)
        r.add_get("/v1/batches/{batch_id}", self.get_batch)
        r.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        r.add_get("/slofleet/v1/status", self.status)
        r.add_post("/slofleet/v1/requests/{request_id}/move", self.move_request)
        return app

    # --- plain routes ------------------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        ready = sum(1 for i in self.pool.instances.values() if i.ready)
        self.metrics.instances_ready.set(ready)
        return _json(
            {"status": "ok" if ready else "no_instance", "instances_ready": ready}, 200 if ready else 503
        )

    async def prometheus(self, _request: web.Request) -> web.Response:
        self.metrics.instances_ready.set(sum(1 for i in self.pool.instances.values() if i.ready))
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def models(self, _request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "slofleet", "max_model_len": n}
            for m, n in sorted(self.pool.models().items())
        ]
        return _json({"object": "list", "data": data})

    async def status(self, _request: web.Request) -> web.Response:
        """What the autoscaler reads: queue depths, deadline slack, per-instance load."""
        assert self.runner is not None
        stats = self.runner.stats
        now = time.time()
        first = stats["earliest_deadline"]
        assert self.relay is not None
        # The requests on each instance, by the id the move route takes: what a migration or
        # merge controller outside the gateway needs to choose and move them, queued ones included
        # (a stream's X-Request-Id header only arrives with its first token).
        on: dict[str, list[dict[str, object]]] = {}
        for rid, st in self.relay.active.items():
            if st.instance is not None and not st.finish_reason:
                on.setdefault(st.instance.instance_id, []).append({
                    "request_id": rid, "priority": st.priority, "prompt_tokens": st.placement.prompt_tokens,
                    "max_tokens": st.placement.max_tokens, "generated_tokens": len(st.token_ids),
                })  # fmt: skip
        instances = []
        for inst in self.pool.instances.values():
            load = inst.load()
            instances.append(
                {
                    "instance_id": inst.instance_id,
                    "url": inst.url,
                    "ready": inst.ready,
                    "in_flight": load.in_flight,
                    "concurrency_limit": load.concurrency_limit,
                    "kv_free_blocks": load.kv_free_blocks,
                    "requests": on.get(inst.instance_id, []),
                }
            )
        return _json(
            {
                "interactive_queue_depth": self.scheduler.waiting,
                "batch_queue_depth": stats["queued"],
                "batch_pending": stats["pending"],
                "batch_deadline_slack_seconds": (first - now) if first is not None else None,
                "batches": [
                    {
                        "id": b["batch_id"],
                        "pending": b["pending"],
                        "deadline_slack_seconds": b["deadline"] - now,
                    }
                    for b in stats["batches"]
                ],
                "instances": instances,
            }
        )

    async def move_request(self, request: web.Request) -> web.Response:
        """Cut a running request over to another instance (the operator's migration cut-over)."""
        assert self.relay is not None
        body = parse_json(await request.read())
        target_id = body.get("instance_id") if isinstance(body, dict) else None
        if not isinstance(target_id, str):
            raise invalid("instance_id", "is required (the instance to move the request to)", "missing_field")
        target = self.pool.instances.get(target_id)
        if target is None or not target.ready:
            raise invalid("instance_id", f"'{target_id[:80]}' is not a ready instance")
        rid = request.match_info["request_id"]
        if not self.relay.move(rid, target):
            raise ApiError(409, f"request_id: '{rid[:80]}' is not running elsewhere now", param="request_id")
        return _json({"request_id": rid, "instance_id": target_id, "moving": True})

    # --- generation --------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        assert self.relay is not None
        kind = ROUTES[request.path]
        body = parse_json(await request.read())
        models = self.pool.models()
        if not models:
            raise ApiError(503, "no instance is ready yet; retry shortly", code="no_instance",
                           headers={"Retry-After": str(self.config.retry_after_seconds)})  # fmt: skip
        parsed = parse_request(kind, body, models)
        cls, prio = classify(request.headers, body, self.config.defaults)
        state = new_state(
            new_request_id(), parsed, cls, prio, models[parsed.model], self.config.chars_per_block
        )
        self.metrics.in_flight.labels(cls.value).inc()
        outcome = "failed"
        try:
            if parsed.stream:
                resp = await self._stream(request, state)
            else:
                acc = Accumulator(state)
                await self.relay.execute(state, acc)
                resp = _json(acc.response())
                resp.headers["X-Request-Id"] = state.request_id
            outcome = "success"
            return resp
        except ApiError as exc:
            outcome = "rejected" if exc.status == 429 else ("client_error" if exc.status < 500 else "failed")
            raise
        except (ClientGone, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            self.metrics.in_flight.labels(cls.value).dec()
            self.metrics.requests.labels(cls.value, outcome).inc()

    async def _stream(self, request: web.Request, state: RequestState) -> web.StreamResponse:
        """SSE to the client; the response starts with the first chunk, so early errors stay HTTP errors."""
        assert self.relay is not None
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": state.request_id,
            }
        )

        async def sink(chunk: dict[str, Any], raw: bytes | None = None) -> None:
            if not resp.prepared:
                if state.instance is not None:
                    resp.headers["X-Slofleet-Instance"] = state.instance.instance_id
                await resp.prepare(request)
            await resp.write(b"data: " + (raw if raw is not None else _DUMPS(chunk).encode()) + b"\n\n")

        try:
            await self.relay.execute(state, sink)
        except ApiError as exc:
            if not resp.prepared:
                raise
            with contextlib.suppress(ConnectionError):
                await resp.write(b"data: " + _DUMPS(exc.body()).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
            return resp
        if state.parsed.include_usage:
            usage = {
                "id": state.client_id,
                "object": "text_completion"
                if state.parsed.kind == "completions"
                else "chat.completion.chunk",
                "created": state.created,
                "model": state.parsed.model,
                "choices": [],
                "usage": state.usage(),
            }
            await sink(usage)
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # --- files and batches -------------------------------------------------------------------
    async def upload_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise invalid("file", "upload as multipart/form-data with fields 'file' and 'purpose'")
        reader = await request.multipart()
        purpose: str | None = None
        filename = "upload.jsonl"
        content: bytes | None = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                buf = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    buf += chunk
                    if len(buf) > self.config.max_file_bytes:
                        raise ApiError(
                            413, f"file: larger than {self.config.max_file_bytes} bytes", param="file"
                        )
                content = bytes(buf)
        if content is None:
            raise invalid("file", "is required (a multipart field named 'file')", "missing_field")
        if purpose is None:
            raise invalid("purpose", "is required (use 'batch' for Batch API input)", "missing_field")
        if purpose == "batch":
            validate_batch_file(content, self.pool.models())
        elif purpose not in ("batch_output", "user_data"):
            raise invalid("purpose", f"must be 'batch' (or 'user_data'), got {purpose[:40]!r}")
        return _json(await self.store.call(self.store.add_file, filename, purpose, content))

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        return _json({"object": "list", "data": await self.store.call(self.store.list_files, purpose)})

    async def get_file(self, request: web.Request) -> web.Response:
        return _json(await self.store.call(self.store.file_object, request.match_info["file_id"]))

    async def delete_file(self, request: web.Request) -> web.Response:
        return _json(await self.store.call(self.store.delete_file, request.match_info["file_id"]))

    async def file_content(self, request: web.Request) -> web.Response:
        data = await self.store.call(self.store.file_content, request.match_info["file_id"])
        return web.Response(body=data, content_type="application/octet-stream")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read())
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object", param="body")
        fid = body.get("input_file_id")
        if not isinstance(fid, str):
            raise invalid(
                "input_file_id",
                "is required (the id of a file uploaded with purpose 'batch')",
                "missing_field",
            )
        endpoint = body.get("endpoint")
        if endpoint not in ROUTES:
            raise invalid("endpoint", f"must be one of {sorted(ROUTES)}, got {json.dumps(endpoint)[:60]}")
        window = body.get("completion_window")
        if window is None:
            window_s = self.config.defaults.batch_deadline_seconds
            window = f"{int(window_s)}s"
        elif isinstance(window, str):
            window_s = parse_window(window)
        else:
            raise invalid("completion_window", "must be a string like '24h'")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise invalid("metadata", "must be an object of string keys and string values")
        file = await self.store.call(self.store.file_object, fid)
        if file["purpose"] != "batch":
            raise invalid("input_file_id", f"file '{fid}' has purpose '{file['purpose']}', not 'batch'")
        content = await self.store.call(self.store.file_content, fid)
        lines = validate_batch_file(content, self.pool.models())
        for ln in lines:
            if ln["url"] != endpoint:
                raise invalid(
                    f"line {ln['line']}: url", f"is {ln['url']} but the batch endpoint is {endpoint}"
                )
        batch = await self.store.call(
            self.store.create_batch, fid, endpoint, window, window_s, metadata,
            self.config.defaults.batch_priority, lines,
        )  # fmt: skip
        assert self.runner is not None
        self.runner.wake()
        log.info("batch_id=%s event=created lines=%d window=%s", batch["id"], len(lines), window)
        return _json(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise invalid("limit", "must be an integer between 1 and 100") from None
        if not 1 <= limit <= 100:
            raise invalid("limit", "must be an integer between 1 and 100")
        data = await self.store.call(self.store.list_batches, limit + 1, request.query.get("after"))
        page = data[:limit]
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(data) > limit,
            }
        )

    async def get_batch(self, request: web.Request) -> web.Response:
        return _json(await self.store.call(self.store.batch_object, request.match_info["batch_id"]))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        return _json(await self.store.call(self.store.cancel, request.match_info["batch_id"]))
