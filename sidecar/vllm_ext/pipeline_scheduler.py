"""Scheduler half of a runtime pipeline of two engines: the leader publishes, the follower replays.

In a pipeline (worker half and the why: pipeline.py) both workers must run the *same* batch in the
same step with the same block ids, because each one writes the KV of its own layers into blocks
the leader's BlockPool handed out. vLLM's workers keep per-request state across steps and get
only diffs (`SchedulerOutput` carries new requests once, then cached-request deltas and
`finished_req_ids`), so the follower's worker must see every one of the leader's
SchedulerOutputs, in order, exactly once. So:
- the leader's `schedule()` runs vLLM's scheduler as usual and sends each output (pickled, with a
  sequence number) to the follower's EngineCore over a TCP connection, including outputs with
  no tokens that only carry `finished_req_ids`, so the follower's worker frees those requests;
- the follower's `schedule()` returns the next published output instead of scheduling its own
  queue; its `update_from_output` returns nothing (the leader answers the clients), and its
  `has_requests()` is true exactly while a published output waits (and it is not paused). The
  thread that receives an output wakes vLLM's busy loop, which blocks on its input queue while
  there is no work, with vLLM's own `EngineCoreRequestType.WAKEUP` sentinel.
Why not poll instead (return an empty output when none came within some milliseconds): a worker
that runs an empty output drops every request from its persistent batch and re-adds them later
in another order than the leader's, and then the hidden-state rows the leader sends no longer line
up with the follower's tokens; and every poll keeps the worker and engine core spinning in
vLLM's shared-memory queue (`busy_loop_s` = 1 s after each message), which burns a core per
follower and, with the workers pinned to one core, starved the leader's worker for minutes.
Requests sent to a follower's own HTTP API wait in its queue until the pipeline splits.

Both ends reset their prefix cache when they enter and leave: while merged, a block's KV is
split across two engines (the leader's worker never writes the follower's layers), so a prefix
hash recorded on either side names KV that is incomplete once the roles change.

The connection is gated by a random token the follower's `pipeline_follow` returns, because the
follower unpickles what arrives (an unauthenticated pickle stream would run anyone's code).

Control ops (JSON lines on the scheduler's control socket, scheduler.py):
    {"op": "pipeline_follow", "host": "127.0.0.1", "port": 0}  -> {"ok", "port", "token"}
    {"op": "pipeline_lead", "host", "port", "token"}            -> {"ok"}
    {"op": "pipeline_leave"}                                     -> {"ok", "published"|"replayed"}
    {"op": "pipeline_blocks", "num_blocks": N}                   -> {"ok", "old_blocks", "new_blocks"}
    {"op": "pipeline_requeue"}                   -> {"ok", "requeued", "requeued_tokens", "request_ids"}
and `info` gains a "pipeline" object (role, counters, block_size, home_blocks).

`pipeline_blocks` resizes the BlockPool of an idle engine (issue 10 item 2): merged, each worker
re-lays its KV for only its own layers, so the same bytes hold more blocks (vllm_ext/kv_layout.py),
and the leader's pool grows to that count; at the split it shrinks back. It resets the prefix
cache first (a resize happens at a role change, when cached prefixes name half-written KV anyway)
and remembers the count before the first resize as `home_blocks`, the count a split restores.

`pipeline_requeue` lets a leader merge with requests in flight (issue 10 item 3, by recompute):
they give up their KV and resume in the pipeline with the tokens they generated; the leader
sends each one to its follower as a new request the first time it runs there.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.engine import EngineCoreRequestType

from slofleet.sidecar.vllm_ext.internals import require

logger = init_logger(__name__)

ROLE_LEADER = "leader"
ROLE_FOLLOWER = "follower"
_FRAME = struct.Struct("!Q")  # payload length
_HELLO = struct.Struct("!4s32s")
_MAGIC = b"SLFS"
_REPLAY_WAIT_SECONDS = 0.05  # slices of the (defensive) wait in schedule(): has_requests() saw an output
_SEND_TIMEOUT_SECONDS = 60.0


class PipelineOpError(ValueError):
    """A refused pipeline op (a ValueError, so the control socket answers it without a traceback,
    like any refused argument)."""


_require = partial(require, error=PipelineOpError, feature="pipeline mode")


@dataclass(slots=True)
class _Follow:
    """Follower state: the listener, the received outputs, and what was replayed."""

    token: str
    listener: socket.socket | None
    outputs: queue.Queue[tuple[int, SchedulerOutput, float]] = field(default_factory=queue.Queue)
    conn: socket.socket | None = None
    received: int = 0
    replayed: int = 0  # outputs handed to the engine by schedule()
    completed: int = 0  # of those, the ones whose step finished (update_from_output ran)
    peer_closed: str = ""  # "bye" after a clean leave of the leader, else why the stream ended
    current: bool = False  # the output in flight came from the leader
    in_flight: set[str] = field(default_factory=set)  # the leader's requests this worker holds
    lag_seconds: float = 0.0  # summed: an output's arrival to its pickup by schedule()
    stopped: threading.Event = field(default_factory=threading.Event)  # set by pipeline_leave


@dataclass(slots=True)
class _Lead:
    conn: socket.socket
    known: set[str] = field(default_factory=set)  # requests the follower's worker holds
    published: int = 0
    published_bytes: int = 0
    publish_seconds: float = 0.0


def _engine_input_queue() -> queue.Queue[Any] | None:
    """The input queue of the EngineCoreProc that is constructing this scheduler, found on the
    call stack (vLLM sets `EngineCoreProc.input_queue` before it builds the scheduler, and gives
    the scheduler no reference to the engine). None when there is none (an in-process engine)."""
    from vllm.v1.engine.core import EngineCoreProc

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, EngineCoreProc):
            found = getattr(owner, "input_queue", None)
            return found if isinstance(found, queue.Queue) else None
        frame = frame.f_back
    return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("closed")
        got += k
    return bytes(buf)


def _receive(follow: _Follow, wake: queue.Queue[Any]) -> None:
    """Follower's receiver thread: accept the leader (token checked), then queue every output."""
    listener = follow.listener
    assert listener is not None
    try:
        while True:
            conn, _ = listener.accept()
            conn.settimeout(5.0)
            try:
                magic, token = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
                good = secrets.compare_digest(token.decode(errors="replace"), follow.token)
                if magic != _MAGIC or not good:
                    raise ConnectionError("wrong token")
                conn.sendall(b"OK")
            except (OSError, ConnectionError):
                conn.close()
                continue
            break
    except OSError as e:  # the listener was closed by pipeline_leave before a leader came
        follow.peer_closed = f"no leader connected ({e})"
        return
    finally:
        with contextlib.suppress(OSError):
            listener.close()
    follow.conn = conn
    conn.settimeout(None)
    try:
        while True:
            (length,) = _FRAME.unpack(_recv_exact(conn, _FRAME.size))
            if length == 0:
                follow.peer_closed = "bye"
                return
            seq, output = pickle.loads(_recv_exact(conn, length))
            follow.received += 1
            follow.outputs.put((seq, output, time.perf_counter()))
            wake.put_nowait((EngineCoreRequestType.WAKEUP, None))  # after the put: no lost wakeup
    except (OSError, ConnectionError) as e:
        follow.peer_closed = f"connection lost: {type(e).__name__}: {e}"
        logger.error("slofleet pipeline: the leader's output stream ended: %s", follow.peer_closed)


class PipelineSchedulerMixin:
    """Leader/follower roles for a vLLM v1 Scheduler; see the module docstring."""

    # Provided by vLLM's Scheduler (and KvGrowSchedulerMixin for the lock and info).
    pause_state: PauseState
    cache_config: Any
    kv_cache_config: Any
    scheduler_config: Any
    _slofleet_lock: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slofleet_follow: _Follow | None = None
        self._slofleet_lead: _Lead | None = None
        self._slofleet_home_blocks: int | None = None
        self._slofleet_engine_queue = _engine_input_queue()
        super().__init__(*args, **kwargs)

    # --- engine thread ------------------------------------------------------------------------
    def has_requests(self) -> bool:
        follow = self._slofleet_follow
        if follow is not None:
            return self.pause_state == PauseState.UNPAUSED and not follow.outputs.empty()
        return bool(super().has_requests())  # type: ignore[misc]

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        follow = self._slofleet_follow
        if follow is not None:
            return self._slofleet_replay(follow)
        output: SchedulerOutput = super().schedule(*args, **kwargs)  # type: ignore[misc]
        lead = self._slofleet_lead
        if lead is not None:
            self._slofleet_publish(lead, output)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        follow = self._slofleet_follow
        if follow is not None:
            if follow.current:
                follow.completed += 1
                follow.current = False
            return {}
        return super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]

    def _slofleet_replay(self, follow: _Follow) -> SchedulerOutput:
        while True:
            try:
                seq, output, arrived = follow.outputs.get(timeout=_REPLAY_WAIT_SECONDS)
                break
            except queue.Empty:
                if not follow.in_flight or follow.stopped.is_set():
                    follow.current = False
                    return SchedulerOutput.make_empty()
                if follow.peer_closed and follow.peer_closed != "bye":
                    raise RuntimeError(
                        f"slofleet pipeline: the leader is gone ({follow.peer_closed}) while this follower "
                        f"holds {len(follow.in_flight)} of its requests"
                    ) from None
        if seq != follow.replayed + 1:
            raise RuntimeError(
                f"slofleet pipeline: the leader's output {seq} arrived after {follow.replayed}: an output "
                "was lost, so this follower's worker state no longer matches the leader's"
            )
        follow.replayed = seq
        follow.current = True
        follow.lag_seconds += time.perf_counter() - arrived
        follow.in_flight.difference_update(output.finished_req_ids)
        follow.in_flight.update(r.req_id for r in output.scheduled_new_reqs)
        return output

    def _slofleet_publish(self, lead: _Lead, output: SchedulerOutput) -> None:
        """Send one output; a failure raises in the engine thread (the leader cannot run its
        steps without the follower's layers, so a lost follower must stop it, loudly)."""
        start = time.perf_counter()
        for_follower = self._slofleet_for_follower(lead, output)
        payload = pickle.dumps((lead.published + 1, for_follower), protocol=pickle.HIGHEST_PROTOCOL)
        lead.conn.sendall(_FRAME.pack(len(payload)) + payload)
        lead.known.difference_update(output.finished_req_ids)
        lead.known.update(r.req_id for r in for_follower.scheduled_new_reqs)
        lead.published += 1
        lead.published_bytes += len(payload)
        lead.publish_seconds += time.perf_counter() - start

    def _slofleet_for_follower(self, lead: _Lead, output: SchedulerOutput) -> SchedulerOutput:
        """The output as the follower's worker must see it. A request the leader requeued at the
        merge (`pipeline_requeue`) comes back as resumed-from-preemption, which a worker only
        understands for a request it already holds; the follower never saw it, so it is sent as
        a new request there, with every token so far as its prompt (the follower's input ids
        are never embedded: its layers take the leader's hidden states)."""
        cached = output.scheduled_cached_reqs
        unknown = [i for i, rid in enumerate(cached.req_ids) if rid not in lead.known]
        if not unknown:
            return output
        requests = _require(self, "requests", "Scheduler")
        converted = []
        for i in unknown:
            rid = cached.req_ids[i]
            blocks = cached.new_block_ids[i]
            if rid not in cached.resumed_req_ids or blocks is None:
                raise RuntimeError(
                    f"slofleet pipeline: request {rid} runs on the leader but its follower never received "
                    "it, and it is not resuming with all its blocks: it was not requeued at the merge"
                )
            request = requests[rid]
            tokens = cached.all_token_ids.get(rid) or list(request.all_token_ids)
            converted.append(NewRequestData(
                req_id=rid, prompt_token_ids=list(tokens), mm_features=[],
                sampling_params=request.sampling_params, pooling_params=request.pooling_params,
                block_ids=blocks, num_computed_tokens=cached.num_computed_tokens[i],
                lora_request=request.lora_request,
            ))  # fmt: skip
        moved = {cached.req_ids[i] for i in unknown}
        keep = [i for i, rid in enumerate(cached.req_ids) if rid not in moved]
        rest = CachedRequestData(
            req_ids=[cached.req_ids[i] for i in keep],
            resumed_req_ids=cached.resumed_req_ids - moved,
            new_token_ids=[cached.new_token_ids[i] for i in keep] if cached.new_token_ids else [],
            all_token_ids={k: v for k, v in cached.all_token_ids.items() if k not in moved},
            new_block_ids=[cached.new_block_ids[i] for i in keep],
            num_computed_tokens=[cached.num_computed_tokens[i] for i in keep],
            num_output_tokens=[cached.num_output_tokens[i] for i in keep],
        )
        return replace(
            output, scheduled_new_reqs=[*output.scheduled_new_reqs, *converted], scheduled_cached_reqs=rest
        )

    # --- control ops (socket thread; the engine is paused, so schedule() is not running) ------
    def _slofleet_require_paused(self, what: str) -> None:
        if self.pause_state != PauseState.PAUSED_ALL:
            raise PipelineOpError(f"{what}: the scheduler is {self.pause_state.name}, not PAUSED_ALL; "
                                  "pause the engine with /pause?mode=keep first")  # fmt: skip

    def _slofleet_require_quiet(self, what: str, *, finished_ok: bool = False) -> None:
        """Only a paused scheduler with no request holding KV may switch roles or resize its
        pool. `finished_ok`: ids of requests that finished in the last step before the pause
        (their blocks are already free; the next output tells the workers) are no obstacle for
        the leader, whose next output its follower tolerates them in."""
        self._slofleet_require_paused(what)
        running, waiting = self.get_request_counts()  # type: ignore[attr-defined]
        holding = len(_require(self, "kv_holding_waiting", "Scheduler"))
        finished = bool(_require(self, "finished_req_ids", "Scheduler")) and not finished_ok
        if running or holding or finished:
            raise PipelineOpError(
                f"{what}: the engine holds requests (running {running}, waiting with KV {holding}, "
                f"finished not yet flushed {finished}); requeue (leader) or drain (follower) it first"
            )
        del waiting  # queued requests without KV are fine: they run after the switch

    def _slofleet_reset_prefix_cache(self, what: str) -> None:
        if not self.reset_prefix_cache():  # type: ignore[attr-defined]
            raise PipelineOpError(f"{what}: vLLM refused to reset the prefix cache (blocks in use)")

    def slofleet_pipeline_info(self) -> dict[str, Any]:
        follow, lead = self._slofleet_follow, self._slofleet_lead
        info: dict[str, Any] = {"role": None, "block_size": int(self.cache_config.block_size),
                                "home_blocks": self._slofleet_home_blocks}  # fmt: skip
        if follow is not None:
            info.update(role=ROLE_FOLLOWER, received=follow.received, replayed=follow.replayed,
                        completed=follow.completed, pending=follow.outputs.qsize(),
                        in_flight=len(follow.in_flight), lag_seconds=round(follow.lag_seconds, 6),
                        connected=follow.conn is not None, peer_closed=follow.peer_closed)  # fmt: skip
        elif lead is not None:
            info.update(role=ROLE_LEADER, published=lead.published, published_bytes=lead.published_bytes,
                        publish_seconds=round(lead.publish_seconds, 6))  # fmt: skip
        return info

    def slofleet_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().slofleet_info()  # type: ignore[misc]
        info["pipeline"] = self.slofleet_pipeline_info()
        return info

    def slofleet_control(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.get("op")
        if op == "pipeline_follow":
            host = str(command.get("host", "127.0.0.1"))
            return self._slofleet_follow_op(host, int(command.get("port", 0)))
        if op == "pipeline_lead":
            return self._slofleet_lead_op(str(command["host"]), int(command["port"]), str(command["token"]))
        if op == "pipeline_leave":
            return self._slofleet_leave_op()
        if op == "pipeline_requeue":
            return self._slofleet_requeue_op()
        if op == "pipeline_blocks":
            value = command.get("num_blocks")
            if not isinstance(value, int) or isinstance(value, bool):
                raise PipelineOpError(f"pipeline_blocks: num_blocks must be an integer, got {value!r}")
            return self._slofleet_blocks_op(value)
        return super().slofleet_control(command)  # type: ignore[misc]

    def _slofleet_follow_op(self, host: str, port: int) -> dict[str, Any]:
        with self._slofleet_lock:
            if self._slofleet_follow is not None or self._slofleet_lead is not None:
                raise PipelineOpError("pipeline_follow: already in a pipeline; leave it first")
            wake = self._slofleet_engine_queue
            if wake is None:
                raise PipelineOpError(
                    "pipeline_follow: vLLM internal EngineCoreProc.input_queue was not found on the stack "
                    "that built this scheduler (vLLM changed, or an in-process engine): a follower "
                    "needs it to wake the engine when the leader publishes"
                )
            self._slofleet_require_quiet("pipeline_follow")
            self._slofleet_reset_prefix_cache("pipeline_follow")
            listener = socket.create_server((host, port))
            follow = _Follow(token=secrets.token_hex(16), listener=listener)
            threading.Thread(target=_receive, args=(follow, wake), name="slofleet-pipeline-follow",
                             daemon=True).start()  # fmt: skip
            self._slofleet_follow = follow
            port = int(listener.getsockname()[1])
        logger.info("slofleet pipeline: following; waiting for the leader on %s:%d", host, port)
        return {"ok": True, "role": ROLE_FOLLOWER, "port": port, "token": follow.token,
                "num_blocks": int(self.kv_cache_config.num_blocks)}  # fmt: skip

    def _slofleet_lead_op(self, host: str, port: int, token: str) -> dict[str, Any]:
        with self._slofleet_lock:
            if self._slofleet_follow is not None or self._slofleet_lead is not None:
                raise PipelineOpError("pipeline_lead: already in a pipeline; leave it first")
            self._slofleet_require_quiet("pipeline_lead", finished_ok=True)
            try:
                conn = socket.create_connection((host, port), timeout=10.0)
                conn.sendall(_HELLO.pack(_MAGIC, token.encode()))
                if _recv_exact(conn, 2) != b"OK":
                    raise ConnectionError("no OK")
            except (OSError, ConnectionError) as e:
                raise PipelineOpError(
                    f"pipeline_lead: cannot reach the follower at {host}:{port}: {e}"
                ) from e
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(_SEND_TIMEOUT_SECONDS)
            self._slofleet_reset_prefix_cache("pipeline_lead")
            self._slofleet_lead = _Lead(conn)
        logger.info("slofleet pipeline: leading; publishing SchedulerOutputs to %s:%d", host, port)
        return {"ok": True, "role": ROLE_LEADER, "num_blocks": int(self.kv_cache_config.num_blocks)}

    def _slofleet_leave_op(self) -> dict[str, Any]:
        with self._slofleet_lock:
            follow, lead = self._slofleet_follow, self._slofleet_lead
            if follow is None and lead is None:
                return {"ok": True, "role": None}
            self._slofleet_require_quiet("pipeline_leave")
            if lead is not None:
                with contextlib.suppress(OSError):
                    lead.conn.sendall(_FRAME.pack(0))  # "bye": a clean end, not a lost leader
                lead.conn.close()
                self._slofleet_lead = None
                self._slofleet_reset_prefix_cache("pipeline_leave")
                return {"ok": True, "role": ROLE_LEADER, "published": lead.published}
            assert follow is not None
            if follow.outputs.qsize() or follow.completed != follow.replayed:
                raise PipelineOpError(
                    f"pipeline_leave: {follow.outputs.qsize()} of the leader's outputs are not replayed "
                    f"yet (replayed {follow.replayed}, completed {follow.completed}); resume this engine "
                    "until they are, or its worker keeps requests the leader already finished"
                )
            if follow.in_flight:
                raise PipelineOpError(
                    f"pipeline_leave: this worker still holds {len(follow.in_flight)} of the leader's "
                    "requests; the leader must drain (finish or abort) them first"
                )
            follow.stopped.set()
            if follow.listener is not None:
                with contextlib.suppress(OSError):
                    follow.listener.close()
            if follow.conn is not None:
                with contextlib.suppress(OSError):
                    follow.conn.close()
            self._slofleet_follow = None
            self._slofleet_reset_prefix_cache("pipeline_leave")
            return {"ok": True, "role": ROLE_FOLLOWER, "replayed": follow.replayed,
                    "received": follow.received}  # fmt: skip

    def _slofleet_requeue_op(self) -> dict[str, Any]:
        """Before a merge: every running request gives up its KV and waits to be recomputed, with
        the tokens it generated kept (vLLM's own preemption, `reset_prefix_cache(
        reset_running_requests=True)`). Its KV lives in all layers of this engine, while in the
        pipeline half of them run on the follower; recomputing it there costs one prefill per
        request, and the requests need no KV copy between engines."""
        with self._slofleet_lock:
            self._slofleet_require_paused("pipeline_requeue")
            if self._slofleet_follow is not None or self._slofleet_lead is not None:
                raise PipelineOpError("pipeline_requeue: already in a pipeline; only a merge requeues")
            if _require(self, "kv_holding_waiting", "Scheduler"):
                raise PipelineOpError("pipeline_requeue: requests wait with KV loading from a connector")
            running = list(_require(self, "running", "Scheduler"))
            tokens = sum(r.num_computed_tokens for r in running)
            if not self.reset_prefix_cache(reset_running_requests=True):  # type: ignore[attr-defined]
                raise PipelineOpError("pipeline_requeue: vLLM could not free the running requests' KV")
        logger.info("slofleet pipeline: requeued %d running requests (%d computed tokens) for recompute",
                    len(running), tokens)  # fmt: skip
        # What the worker may still hold and no one reads the KV of again: every request the
        # scheduler has (none holds a block now: the running were requeued, the waiting, vLLM's
        # own preemptions included, hold none), and those that finished in the step before the
        # pause (the next output tells the worker).
        held = sorted(
            {*_require(self, "requests", "Scheduler"), *_require(self, "finished_req_ids", "Scheduler")}
        )
        return {"ok": True, "requeued": len(running), "requeued_tokens": tokens, "request_ids": held}

    def _slofleet_blocks_op(self, num_blocks: int) -> dict[str, Any]:
        """Resize the idle BlockPool to `num_blocks` (the workers' KV must hold that many first
        when growing; the workers shrink after this when shrinking)."""
        start = time.perf_counter()
        with self._slofleet_lock:
            self._slofleet_require_quiet("pipeline_blocks", finished_ok=True)
            self._slofleet_reset_prefix_cache("pipeline_blocks")
            old_blocks, free = self._slofleet_resize_pool(num_blocks, allow_shrink=True)  # type: ignore[attr-defined]
            if self._slofleet_home_blocks is None:
                self._slofleet_home_blocks = old_blocks
            if num_blocks == self._slofleet_home_blocks:
                self._slofleet_home_blocks = None
        seconds = time.perf_counter() - start
        logger.info("slofleet pipeline: block pool %d -> %d blocks in %.4f s", old_blocks, num_blocks,
                    seconds)  # fmt: skip
        return {"ok": True, "old_blocks": old_blocks, "new_blocks": num_blocks, "free_blocks": free,
                "seconds": round(seconds, 6)}  # fmt: skip
