"""The one place that moves a request: relay a generation and resume it on another instance.

The gateway talks to engines in streaming mode only (a non-streaming client gets the chunks
assembled), always with `return_token_ids`, so it knows the prompt's token ids and every token it
has relayed. When the instance dies, the connection breaks or a move is requested, `resume()`
continues on the target with prompt = prompt ids + tokens already relayed and the remaining
`max_tokens`, through `/v1/completions` whatever the client's route (a chat prompt is already
templated into the ids); the client sees one unbroken stream with no token twice or missing.
Live migration cuts over on the same path: the source's sidecar stops the request on its engine
(the stream ends with finish_reason "abort"), the relay asks that sidecar's `ResolveMigration`
where it went and resumes there with the `kv_transfer_params` naming the copied KV (only the last
token is computed), or by recompute anywhere if the copy failed. A stop that no
migration explains reaches the client as the engine's abort. Static mode has no sidecars and no
cut-over: an engine's abort is relayed as is. `move()` is the same cut-over without a KV copy.

Limits of a resume by recompute: seeded sampling restarts its RNG, and presence/frequency
penalties see the earlier output as prompt; greedy and unseeded sampling are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from slofleet.gateway.errors import ApiError
from slofleet.gateway.instances import Instance, InstancePool, MigrationResolution
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.gateway.scheduler import Placement, Scheduler
from slofleet.gateway.validate import ParsedRequest
from slofleet.instance import RequestClass

log = logging.getLogger("slofleet.gateway.relay")

# Sampling settings that mean the same on /v1/completions, carried into a continuation.
_CARRIED = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids",
    "bad_words", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "user",
)  # fmt: skip
# vLLM names the prompt by its internal fields; the client knows it as prompt/messages.
_ENGINE_PROMPT_PARAMS = frozenset({"input_text", "input_ids", "prompt_token_ids", "prompt_embeds"})
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# A sink gets each client chunk as a dict, plus its exact bytes when the engine's chunk could be
# forwarded as is (the hot path: no re-serialization); streaming sinks write the bytes.
Sink = Callable[[dict[str, Any], bytes | None], Awaitable[None]]
# Token ids the gateway asked for (to be able to resume) but the client did not.
_TOKEN_FIELDS = re.compile(rb',"(?:prompt_token_ids|token_ids)":(?:null|\[[0-9,]*\])|,"prompt_text":null')


class InstanceLost(Exception):
    """The request must continue elsewhere: the instance stopped answering (crash, broken
    connection, 5xx; `failed`), or a migration's KV copy failed after the stop (not `failed`: the
    instance is fine and stays in dispatch)."""

    def __init__(self, message: str, *, failed: bool = True) -> None:
        super().__init__(message)
        self.failed = failed


class MoveRequested(Exception):
    def __init__(self, target: Instance) -> None:
        super().__init__(target.instance_id)
        self.target = target


class ClientGone(Exception):
    """Writing to the client failed: stop, and do not mistake it for an engine failure."""


@dataclass(slots=True)
class RequestState:
    """Everything needed to continue a request anywhere: what was asked and what was sent."""

    request_id: str
    parsed: ParsedRequest
    request_class: RequestClass
    priority: int
    placement: Placement
    arrival: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    chunks_sent: int = 0
    role_sent: bool = False
    attempts: int = 0
    engine_request_id: str = ""
    instance: Instance | None = None
    last_chunk_at: float = 0.0
    move_target: Instance | None = None
    move_engine_id: str = ""
    upstream: aiohttp.ClientResponse | None = None
    # The engine ended the stream with "abort" on an instance with a sidecar: maybe a migration.
    engine_stopped: bool = False
    # The KV a migration copied to the next instance; sent once, with the next continuation.
    kv_transfer_params: dict[str, object] | None = None

    @property
    def client_id(self) -> str:
        prefix = "cmpl-" if self.parsed.kind == "completions" else "chatcmpl-"
        return prefix + self.request_id

    def usage(self) -> dict[str, int]:
        p = len(self.prompt_ids or ())
        c = len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Relay:
    def __init__(
        self,
        pool: InstancePool,
        scheduler: Scheduler,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        max_resumes: int,
    ) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.session = session
        self.metrics = metrics
        self.max_resumes = max_resumes
        self.active: dict[str, RequestState] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self._ttft = {c: metrics.ttft.labels(c.value) for c in RequestClass}
        self._itl = {c: metrics.itl.labels(c.value) for c in RequestClass}

    def engine_id(self, state: RequestState) -> str:
        """Name the next attempt on an engine (vLLM needs unique ids; X-Request-Id sets them)."""
        state.attempts += 1
        state.engine_request_id = (
            state.request_id if state.attempts == 1 else f"{state.request_id}-r{state.attempts - 1}"
        )
        return state.engine_request_id

    async def execute(self, state: RequestState, sink: Sink, target: Instance | None = None) -> None:
        """Run `state` to completion, resuming elsewhere whenever its instance is lost.

        `target` is a slot already acquired (the batch runner's); otherwise one is acquired here,
        which may wait in the interactive queue or raise 429.
        """
        if target is None:
            target = await self.scheduler.acquire(state.placement, self.engine_id(state))
        elif not state.engine_request_id:
            raise ValueError("a pre-acquired target needs state.engine_request_id set by engine_id()")
        self.active[state.request_id] = state
        current: Instance | None = target
        try:
            while True:
                assert current is not None
                try:
                    await self.resume(state, current, sink)
                    return
                except InstanceLost as exc:
                    why = "instance_lost" if exc.failed else "migration_recompute"
                    self.metrics.resumes.labels(why).inc()
                    if exc.failed:
                        self.pool.mark_failed(current, str(exc))
                    failed = current.instance_id
                    self.scheduler.release(current, state.engine_request_id, len(state.token_ids))
                    current = None
                    if state.attempts > self.max_resumes:
                        raise ApiError(
                            502, f"the request failed on {state.attempts} instances; last error: {exc}"
                        ) from exc
                    log.warning(
                        "request_id=%s event=resume from=%s tokens_sent=%d reason=%s",
                        state.request_id, failed, len(state.token_ids), exc,
                    )  # fmt: skip
                    state.placement.generated_tokens = len(state.token_ids)
                    current = await self.scheduler.acquire(
                        state.placement, self.engine_id(state), exclude=frozenset({failed}), new=False
                    )
                except MoveRequested as mv:
                    self.metrics.resumes.labels("move").inc()
                    assert state.instance is not None
                    log.info(
                        "request_id=%s event=move from=%s to=%s tokens_sent=%d with_kv=%s",
                        state.request_id, current.instance_id, mv.target.instance_id, len(state.token_ids),
                        state.kv_transfer_params is not None,
                    )  # fmt: skip
                    self.scheduler.release(current, state.engine_request_id, len(state.token_ids))
                    current = mv.target
                    state.engine_request_id = state.move_engine_id
                    state.attempts += 1
        finally:
            self.active.pop(state.request_id, None)
            if current is not None:
                self.scheduler.release(current, state.engine_request_id, len(state.token_ids))

    def move(self, request_id: str, target: Instance) -> bool:
        """Cut a running request over to `target` (live migration's cut-over; limits not applied).

        The current upstream stream is closed; `execute` then resumes on `target`.
        """
        state = self.active.get(request_id)
        if state is None or state.instance is None or state.instance is target or state.finish_reason:
            log.info(
                "request_id=%s event=move_refused known=%s finished=%s on_target=%s",
                request_id, state is not None, state is not None and bool(state.finish_reason),
                state is not None and state.instance is target,
            )  # fmt: skip
            return False
        source, engine_id = state.instance, state.engine_request_id
        self._place_move(state, target)
        if state.upstream is not None:
            state.upstream.close()
        # vLLM notices a closed stream only when it next has output for it: a request still queued
        # there (no token yet) would keep its place and KV until then. Abort it by id now.
        task = asyncio.create_task(self._abort_on(source, engine_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        return True

    async def _abort_on(self, inst: Instance, engine_request_id: str) -> None:
        try:
            async with self.session.post(
                inst.url + "/abort_requests", json={"request_ids": [engine_request_id]},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    log.info("request_id=%s event=abort_on_move_refused instance=%s status=%d",
                             engine_request_id, inst.instance_id, resp.status)  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("request_id=%s event=abort_on_move_failed instance=%s error=%r",
                     engine_request_id, inst.instance_id, exc)  # fmt: skip

    def _place_move(self, state: RequestState, target: Instance) -> None:
        state.placement.generated_tokens = len(state.token_ids)
        state.move_target = target
        state.move_engine_id = f"{state.request_id}-m{state.attempts}"
        self.scheduler.place_on(target, state.placement, state.move_engine_id)

    async def _cut_over(
        self,
        state: RequestState,
        source: Instance,
        resolve: Callable[[str], Awaitable[MigrationResolution]],
        sink: Sink,
    ) -> None:
        """The engine stopped the request: continue where its sidecar's migration put it.

        Raises MoveRequested (resume on the destination with the copied KV) or InstanceLost
        (recompute elsewhere); returns only when no migration explains the stop, after telling the
        client the request was aborted.
        """
        stopped, state.engine_stopped = state.engine_stopped, False
        try:
            res = await resolve(state.engine_request_id)
        except ConnectionError as exc:
            raise InstanceLost(f"stream stopped and the sidecar does not answer: {exc}") from exc
        log.info(
            "request_id=%s event=migration_cut_over engine_request_id=%s from=%s how=%s to=%s tokens_sent=%d",
            state.request_id, state.engine_request_id, source.instance_id, res.how, res.target or "-",
            len(state.token_ids),
        )  # fmt: skip
        if res.how == "kv":
            target = self.pool.instances.get(res.target)
            if target is not None and target.ready and target is not source:
                state.kv_transfer_params = res.kv_transfer_params
                self._place_move(state, target)
                raise MoveRequested(target)
            raise InstanceLost(f"migrated to {res.target!r}, which this gateway cannot use", failed=False)
        if res.how == "recompute":
            raise InstanceLost("the migration's KV copy failed after the stop", failed=False)
        if not stopped:
            raise InstanceLost("the engine's stream ended before the request finished")
        state.finish_reason = "abort"
        await self._emit(state, sink, "", [], "abort", None, None, None)

    def _upstream(self, state: RequestState, target: Instance) -> tuple[str, dict[str, Any]]:
        parsed = state.parsed
        if not state.token_ids or state.prompt_ids is None:
            body = dict(parsed.body)
            body.pop("stream_options", None)
            body.update(stream=True, return_token_ids=True, priority=state.priority)
            if parsed.kind == "completions" and parsed.max_tokens is None:
                body["max_tokens"] = state.placement.max_tokens
            route = "/v1/completions" if parsed.kind == "completions" else "/v1/chat/completions"
            return route, body
        body = {k: parsed.body[k] for k in _CARRIED if k in parsed.body}
        sent = len(state.token_ids)
        if "min_tokens" in parsed.body and isinstance(parsed.body["min_tokens"], int):
            body["min_tokens"] = max(parsed.body["min_tokens"] - sent, 0)
        if parsed.kind == "completions" and isinstance(parsed.body.get("logprobs"), int):
            body["logprobs"] = parsed.body["logprobs"]
        prompt = state.prompt_ids + state.token_ids
        remaining = (
            state.placement.max_tokens - sent
            if parsed.max_tokens is not None or parsed.kind == "completions"
            else target.max_model_len - len(prompt)
        )
        body.update(
            model=parsed.model,
            prompt=prompt,
            max_tokens=remaining,
            stream=True,
            return_token_ids=True,
            priority=state.priority,
        )
        if state.kv_transfer_params is not None:
            body["kv_transfer_params"] = state.kv_transfer_params
        return "/v1/completions", body

    async def resume(self, state: RequestState, target: Instance, sink: Sink) -> None:
        """Continue `state` on `target` from the last token relayed until it finishes."""
        state.instance = target
        state.move_target = None
        route, body = self._upstream(state, target)
        state.kv_transfer_params = None
        # Captured now: the stop must be resolved with the sidecar that was there when it happened.
        resolve = target.resolve_migration
        state.engine_stopped = False
        if route == "/v1/completions" and body.get("max_tokens") is not None and body["max_tokens"] <= 0:
            state.finish_reason = "length"
            await self._emit(state, sink, "", [], "length", None, None, None)
            return
        continuation = route == "/v1/completions" and state.parsed.kind == "chat"
        done = False
        try:
            async with self.session.post(
                target.url + route,
                data=_DUMPS(body).encode(),
                headers={"Content-Type": "application/json", "X-Request-Id": state.engine_request_id},
            ) as resp:
                state.upstream = resp
                if resp.status != 200:
                    raw = await resp.read()
                    if resp.status >= 500 or resp.status == 404:
                        raise InstanceLost(f"engine answered HTTP {resp.status}: {raw[:200]!r}")
                    raise engine_client_error(resp.status, raw, state.parsed)
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].rstrip()
                    if data == b"[DONE]":
                        done = True
                        break
                    await self._relay(state, data, sink, continuation, resolve is not None)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            if state.move_target is not None:
                raise MoveRequested(state.move_target) from exc
            if state.finish_reason is None:
                raise InstanceLost(f"{type(exc).__name__}: {exc}") from exc
        finally:
            state.upstream = None
        if state.move_target is not None and state.finish_reason is None:
            raise MoveRequested(state.move_target)
        if resolve is not None and state.finish_reason is None and (state.engine_stopped or not done):
            await self._cut_over(state, target, resolve, sink)
            return
        if not done and state.finish_reason is None:
            raise InstanceLost("the engine's stream ended before the request finished")

    async def _relay(
        self, state: RequestState, data: bytes, sink: Sink, continuation: bool, stoppable: bool = False
    ) -> None:
        obj = json.loads(data)
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            code = err.get("code")
            if isinstance(code, int) and code >= 500:
                raise InstanceLost(f"engine error mid-stream: {err.get('message')}")
            raise ApiError(code if isinstance(code, int) else 400, str(err.get("message")), err.get("param"))
        choices = obj.get("choices") or []
        if not choices:
            return
        ch = choices[0]
        if state.prompt_ids is None:
            pids = ch.get("prompt_token_ids") or obj.get("prompt_token_ids")
            if pids:
                state.prompt_ids = list(pids)
        tokens = ch.get("token_ids") or []
        finish = ch.get("finish_reason")
        # On an instance with a sidecar an abort may be a migration's stop: held until resolved.
        held = stoppable and finish == "abort"
        if held:
            state.engine_stopped = True
            finish = None
        if state.parsed.kind == "chat" and not continuation:
            delta = ch.get("delta") or {}
            if "role" in delta:
                if state.role_sent:
                    delta = {k: v for k, v in delta.items() if k != "role"}
                state.role_sent = True
            text = None
        else:
            delta = None
            text = ch.get("text", "")
        if not tokens and finish is None and not text and not (delta and any(delta.values())):
            if not (delta and "role" in delta):
                return
        if tokens:
            state.token_ids.extend(tokens)
            state.placement.generated_tokens = len(state.token_ids)
        if finish is not None:
            state.finish_reason = finish
            state.stop_reason = ch.get("stop_reason")
        if state.attempts == 1 and not continuation and not held:
            # First attempt: the engine's id is ours and its chunk has the client's shape already.
            state.created = obj.get("created", state.created)
            if tokens:
                self._observe(state)
            state.chunks_sent += 1
            raw = data if state.parsed.return_token_ids else _TOKEN_FIELDS.sub(b"", data)
            await self._send(sink, obj, raw)
            return
        await self._emit(state, sink, text, tokens, finish, ch.get("stop_reason"), ch.get("logprobs"), delta)

    async def _emit(
        self,
        state: RequestState,
        sink: Sink,
        text: str | None,
        tokens: list[int],
        finish: str | None,
        stop_reason: Any,
        logprobs: Any,
        delta: dict[str, Any] | None,
    ) -> None:
        parsed = state.parsed
        if parsed.kind == "completions":
            choice: dict[str, Any] = {
                "index": 0,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            out: dict[str, Any] = {"id": state.client_id, "object": "text_completion"}
        else:
            if delta is None:
                delta = {"content": text or ""}
                if not state.role_sent:
                    delta = {"role": "assistant", **delta}
                    state.role_sent = True
                logprobs = None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            out = {"id": state.client_id, "object": "chat.completion.chunk"}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if parsed.return_token_ids:
            choice["token_ids"] = tokens
            if state.chunks_sent == 0:
                if parsed.kind == "completions":
                    choice["prompt_token_ids"] = state.prompt_ids
                else:
                    out["prompt_token_ids"] = state.prompt_ids
        out["created"] = state.created
        out["model"] = parsed.model
        out["choices"] = [choice]
        if tokens:
            self._observe(state)
        state.chunks_sent += 1
        await self._send(sink, out, None)

    def _observe(self, state: RequestState) -> None:
        now = time.perf_counter()
        cls = state.request_class
        if state.last_chunk_at == 0.0:
            self._ttft[cls].observe(now - state.arrival)
        else:
            self._itl[cls].observe(now - state.last_chunk_at)
        state.last_chunk_at = now

    @staticmethod
    async def _send(sink: Sink, chunk: dict[str, Any], raw: bytes | None) -> None:
        try:
            await sink(chunk, raw)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from exc


def engine_client_error(status: int, raw: bytes, parsed: ParsedRequest) -> ApiError:
    """An engine's 4xx, kept OpenAI-shaped, with the field named when the engine left it out."""
    try:
        err = json.loads(raw)["error"]
        message = str(err.get("message") or raw[:500].decode(errors="replace"))
        param = err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param = raw[:500].decode(errors="replace"), None
    prompt_field = "prompt" if parsed.kind == "completions" else "messages"
    if param in _ENGINE_PROMPT_PARAMS or (param is None and "context length" in message):
        param = prompt_field
    if param and not message.startswith(f"{param}:"):
        message = f"{param}: {message}"
    return ApiError(status if 400 <= status < 500 else 400, message, param=param)


class Accumulator:
    """Assembles relayed chunks into one non-streaming OpenAI response."""

    def __init__(self, state: RequestState) -> None:
        self.state = state
        self.parts: list[str] = []
        self.logprobs: Any = None

    async def __call__(self, chunk: dict[str, Any], _raw: bytes | None = None) -> None:
        ch = chunk["choices"][0]
        piece = ch["text"] if "text" in ch else (ch.get("delta") or {}).get("content")
        if piece:
            self.parts.append(piece)
        lp = ch.get("logprobs")
        if isinstance(lp, dict):
            if self.logprobs is None:
                self.logprobs = {k: list(v) if isinstance(v, list) else v for k, v in lp.items()}
            else:
                for k, v in lp.items():
                    if isinstance(v, list) and isinstance(self.logprobs.get(k), list):
                        self.logprobs[k].extend(v)

    def response(self) -> dict[str, Any]:
        s = self.state
        text = "".join(self.parts)
        if s.parsed.kind == "completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": self.logprobs}
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs,
            }
            obj = "chat.completion"
        choice["finish_reason"] = s.finish_reason
        choice["stop_reason"] = s.stop_reason
        if s.parsed.return_token_ids:
            choice["token_ids"] = list(s.token_ids)
        out: dict[str, Any] = {
            "id": s.client_id,
            "object": obj,
            "created": s.created,
            "model": s.parsed.model,
            "choices": [choice],
            "usage": s.usage(),
        }
        if s.parsed.return_token_ids:
            out["prompt_token_ids"] = s.prompt_ids
        return out
