"""slofleet's KV connector: moves a running request's KV blocks out of, and into, a stock vLLM engine.

Loaded with
  --kv-transfer-config '{"kv_connector": "SlofleetMigrationConnector", "kv_role": "kv_both",
    "kv_connector_module_path": "slofleet.sidecar.vllm_ext.kv_connector",
    "kv_connector_extra_config": {"control_socket": "/dev/shm/slofleet/kv.sock"}}'
vLLM builds one instance in the engine-core process (role SCHEDULER: it knows every request's
block ids) and one in each worker (role WORKER: it holds the KV tensors).

Source side: the pod's sidecar talks to the scheduler-side instance over a Unix socket
(`control_socket`). `export` copies the request's blocks completed since a given block into a
shared-memory segment (`slofleet.sidecar.migration.segment`) while the request keeps decoding: the
scheduler puts a copy task into the step's connector metadata and the worker gathers those blocks
from its KV tensors after the step's forward (`wait_for_save`), when they are written. `arm` makes
the request's end hold its blocks (`request_finished` returns delay-free) so that, after the
sidecar aborts it, the last blocks are copied (`final`) before vLLM frees them.

Destination side: a request whose body carries
`kv_transfer_params: {"slofleet_migration": {"segment": PATH}}` (prompt = original prompt + tokens
generated so far) gets every token the source had computed loaded from that segment instead of
computed (the source's final copy includes its last, partial block); loading stops at the first
stored token that differs from the prompt, and the block layout and dtype must equal this
engine's, or nothing is loaded. vLLM then computes only the last token, whatever the length.

Counters (`slofleet_kv_*` in the control socket's `stats`) and vLLM's own
`prompt_tokens_by_source{source="external_kv_transfer"}` show what was loaded.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from slofleet.sidecar.migration import segment as seg
from slofleet.sidecar.vllm_ext.control_socket import ControlSocket

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's log configuration (format, level, process tag) applies.
logger = init_logger("vllm.slofleet.kv_connector")

# The key in a request's `kv_transfer_params` that marks a resumed (migrated-in) request.
PARAMS_KEY = "slofleet_migration"


@dataclass(slots=True)
class CopyTask:
    """One copy between vLLM's KV tensors and a segment, decided by the scheduler for one step."""

    task_id: int
    segment: str
    # Physical block ids in the engine, and the index in the segment of the first one.
    block_ids: list[int]
    first_slot: int
    load: bool


@dataclass
class SlofleetConnectorMetadata(KVConnectorMetadata):
    tasks: list[CopyTask] = field(default_factory=list)
    # Requests whose final copy is in `tasks`: the worker reports them as finished sending.
    final_req_ids: list[str] = field(default_factory=list)


@dataclass
class SlofleetWorkerMetadata(KVConnectorWorkerMetadata):
    done: dict[int, str | None] = field(default_factory=dict)  # task id -> error or None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SlofleetWorkerMetadata)
        merged = dict(self.done)
        for task_id, error in other.done.items():
            merged[task_id] = merged.get(task_id) or error
        return SlofleetWorkerMetadata(done=merged)


@dataclass(slots=True)
class _Export:
    """A sidecar's export command, from the socket thread to the engine's step and back."""

    request_id: str
    segment: str
    first_block: int
    final: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    dispatched: bool = False


@dataclass(slots=True)
class _Held:
    """A finished request whose blocks the connector holds until its last blocks are copied."""

    block_ids: list[int]
    num_computed_tokens: int
    token_ids: list[int]
    status: str


def _match_request_id(internal: str, wanted: str) -> bool:
    """Match vLLM's internal id to the X-Request-Id the gateway set.

    The OpenAI server makes it `cmpl-<id>-<prompt index>` (completions) or `chatcmpl-<id>`, and the
    engine appends `-<8 random chars>`; an exact internal id matches too.
    """
    if internal == wanted:
        return True
    rid = re.escape(wanted)
    pattern = rf"(?:(?:chat)?cmpl-)?{rid}(?:-0)?-[0-9A-Za-z]{{8}}"
    return re.fullmatch(pattern, internal) is not None


class SlofleetMigrationConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._layout = _layout_from_config(kv_cache_config, self._block_size)
        self._lock = threading.Condition()
        self._next_task = 0
        # scheduler side
        self._requests: dict[str, Request] = {}
        self._exports: list[_Export] = []
        self._inflight: dict[int, _Export] = {}
        self._armed: dict[str, tuple[str, int]] = {}  # request id -> (segment, first block)
        self._held: dict[str, _Held] = {}
        self._final_waiting: dict[str, _Export] = {}
        self._loads: dict[str, CopyTask] = {}
        self._load_plans: dict[str, tuple[str, int]] = {}  # request id -> (segment, hit tokens)
        self._local_hits: dict[str, int] = {}
        self.stats = {
            "exported_blocks": 0,
            "loaded_blocks": 0,
            "loaded_tokens": 0,
            "load_rejections": 0,
            "exports": 0,
        }
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._done: dict[int, str | None] = {}
        self._pending_final: set[str] = set()
        self._server: ControlSocket | None = None
        if role == KVConnectorRole.SCHEDULER:
            path = self._kv_transfer_config.get_from_extra_config("control_socket", None)
            if path:
                self._server = ControlSocket(
                    str(path), self.control, error_reply=_error_reply, name="slofleet-kv-control"
                )

    # ---------------- worker side ----------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the tensors and prove the scheduler's layout (which the sidecars compare) is theirs."""
        for name in self._layout.layer_names:
            if name not in kv_caches:
                raise RuntimeError(f"KV layer {name!r} of the KV cache config has no tensor")
            t = kv_caches[name]
            shape = tuple(t.shape[1:])
            nbytes = t[0].numel() * t.element_size()
            if (shape, nbytes, str(t.dtype)) != (
                self._layout.layer_block_shape,
                self._layout.layer_block_bytes,
                self._layout.dtype,
            ):
                raise RuntimeError(
                    f"KV tensor of {name}: block shape {shape}, {nbytes} bytes, {t.dtype}; expected "
                    f"{self._layout.layer_block_shape}, {self._layout.layer_block_bytes}, "
                    f"{self._layout.dtype} (a layout whose first dim is not the block is unsupported)"
                )
        self._kv_caches = {n: kv_caches[n] for n in self._layout.layer_names}

    def _segment_view(self, mm: Any, n_slots_from: int, count: int) -> torch.Tensor:
        dtype = getattr(torch, self._layout.dtype.removeprefix("torch."))
        per_block = self._layout.block_bytes // torch.empty((), dtype=dtype).element_size()
        view = torch.frombuffer(
            mm,
            dtype=dtype,
            offset=seg.block_offset(self._layout, n_slots_from),
            count=count * per_block,
        )
        return view.view(count, self._layout.num_layers, *self._layout.layer_block_shape)

    def _run_task(self, task: CopyTask) -> None:
        if not task.block_ids:
            return
        ids = torch.tensor(task.block_ids, dtype=torch.long)
        mm = seg.map_segment(task.segment, writable=True)
        try:
            buf = self._segment_view(mm, task.first_slot, len(task.block_ids))
            for i, name in enumerate(self._layout.layer_names):
                kv = self._kv_caches[name]
                if task.load:
                    kv.index_copy_(0, ids, buf[:, i])
                else:
                    buf[:, i].copy_(kv.index_select(0, ids))
            del buf
        finally:
            with contextlib.suppress(BufferError):
                mm.close()

    def _run_tasks(self, load: bool) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, SlofleetConnectorMetadata)
        for task in meta.tasks:
            if task.load != load or task.task_id in self._done:
                continue
            try:
                self._run_task(task)
                self._done[task.task_id] = None
            except Exception as e:  # reported to the scheduler, which answers the sidecar
                logger.exception("KV copy task %s on %s failed", task.task_id, task.segment)
                self._done[task.task_id] = f"{type(e).__name__}: {e}"
        if not load:
            self._pending_final.update(meta.final_req_ids)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Loads are synchronous: the scheduler marks the step, so vLLM calls this before the forward.
        self._run_tasks(load=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        # Blocks are gathered after the whole forward (wait_for_save): a migration copies complete
        # blocks only, and one gather per step costs less than one per layer.
        return

    def wait_for_save(self) -> None:
        self._run_tasks(load=False)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # A final copy is dispatched in the step whose `finished_req_ids` names its request, so
        # reporting it here frees the held blocks right after the copy.
        ready = self._pending_final & finished_req_ids
        self._pending_final -= ready
        return (ready or None), None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._done:
            return None
        done, self._done = self._done, {}
        return SlofleetWorkerMetadata(done=done)

    # ---------------- scheduler side ----------------

    def on_new_request(self, request: Request) -> None:
        with self._lock:
            self._requests[request.request_id] = request

    def _find(self, wanted: str) -> str | None:
        for rid in list(self._requests) + list(self._held):
            if _match_request_id(rid, wanted):
                return rid
        return None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        if not params:
            return 0, False
        path = str(params.get("segment", ""))
        try:
            header = seg.read_header(path)
            layout = seg.KVLayout.from_json(header["layout"])
        except (seg.SegmentError, KeyError, ValueError) as e:
            logger.warning("request %s: no KV loaded: %s", request.request_id, e)
            self.stats["load_rejections"] += 1
            return 0, False
        problem = self._layout.mismatch(layout)
        if problem:
            logger.warning("request %s: no KV loaded: %s", request.request_id, problem)
            self.stats["load_rejections"] += 1
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        stored = header.get("token_ids", [])
        # vLLM must compute at least the last prompt token; the stored KV may end inside a block.
        valid = min(len(stored), int(header.get("valid_blocks", 0)) * self._block_size)
        limit = min(valid, len(prompt) - 1)
        hit = next((i for i in range(limit) if stored[i] != prompt[i]), limit)
        if hit < limit:
            logger.warning(
                "request %s: stored tokens differ from the prompt at token %d", request.request_id, hit
            )
        self._load_plans[request.request_id] = (path, hit)
        self._local_hits[request.request_id] = num_computed_tokens
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0 or request.request_id not in self._load_plans:
            return
        path, _ = self._load_plans.pop(request.request_id)
        local = self._local_hits.pop(request.request_id, 0)
        first = local // self._block_size
        end = -(-(local + num_external_tokens) // self._block_size)
        count = end - first
        block_ids = list(blocks.get_block_ids()[0][first:end])
        with self._lock:
            self._next_task += 1
            self._loads[request.request_id] = CopyTask(
                self._next_task, path, block_ids, first_slot=first, load=True
            )
        self.stats["loaded_blocks"] += count
        self.stats["loaded_tokens"] += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SlofleetConnectorMetadata()
        with self._lock:
            meta.tasks.extend(self._loads.values())
            self._loads.clear()
            for export in self._exports:
                if export.dispatched:
                    continue
                task = self._plan_export(export, scheduler_output)
                if task is None:
                    continue
                export.dispatched = True
                self._inflight[task.task_id] = export
                meta.tasks.append(task)
                if export.final:
                    meta.final_req_ids.append(export.request_id)
            self._exports = [e for e in self._exports if not e.dispatched and not e.done.is_set()]
        return meta

    def _plan_export(self, export: _Export, out: SchedulerOutput) -> CopyTask | None:
        """The blocks to copy from `first_block` on; None if nothing to copy."""
        rid = export.request_id
        if export.final:
            # The request has stopped: its last, partial block is final too. Copying it lets the
            # destination load every computed token and compute only the last one, whatever the
            # sequence length (vLLM takes a load that ends inside a block).
            held = self._held[rid]
            end = min(held.num_computed_tokens, len(held.token_ids))
            block_ids, tokens, status = held.block_ids, held.token_ids, held.status
        else:
            req = self._requests.get(rid)
            if req is None or not req.status.name == "RUNNING":
                reason = "finished" if req is None else req.status.name.lower()
                export.result = {"error": f"request is {reason}", "state": reason}
                export.done.set()
                return None
            # While it decodes, only blocks that are complete after this step's forward are final.
            computed = req.num_computed_tokens + out.num_scheduled_tokens.get(rid, 0)
            end = computed // self._block_size * self._block_size
            assert self._kv_cache_manager is not None
            block_ids = list(self._kv_cache_manager.get_block_ids(rid)[0])
            tokens, status = list(req.all_token_ids), "running"
        first = export.first_block
        n_blocks = min(-(-end // self._block_size), len(block_ids))
        end = min(end, n_blocks * self._block_size)
        export.result = {
            "blocks": max(n_blocks, first),
            "copied_blocks": max(0, n_blocks - first),
            "token_ids": tokens[first * self._block_size : end],
            "state": status,
        }
        if n_blocks <= first and not export.final:
            export.done.set()
            return None
        self._next_task += 1
        return CopyTask(self._next_task, export.segment, block_ids[first:n_blocks], first, load=False)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        with self._lock:
            if isinstance(meta, SlofleetWorkerMetadata):
                for task_id, error in meta.done.items():
                    export = self._inflight.pop(task_id, None)
                    if export is None:
                        continue
                    if error:
                        export.result = {"error": error, "state": "copy_failed"}
                    elif export.result is not None:
                        self.stats["exported_blocks"] += int(export.result["copied_blocks"])
                        self.stats["exports"] += 1
                    export.done.set()
            for rid in connector_output.finished_sending or ():
                self._held.pop(rid, None)
            self._lock.notify_all()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        if params and params.get("segment"):
            # A migrated-in request loads its prefix once (again only after a preemption, which
            # ends before this): its segment's memory goes back now.
            seg.remove(str(params["segment"]))
        with self._lock:
            self._requests.pop(rid, None)
            self._load_plans.pop(rid, None)
            self._local_hits.pop(rid, None)
            armed = self._armed.pop(rid, None)
            if armed is None:
                return False, None
            segment, first = armed
            self._held[rid] = _Held(
                list(block_ids),
                request.num_computed_tokens,
                list(request.all_token_ids),
                request.status.name.lower(),
            )
            export = _Export(rid, segment, first, final=True)
            self._exports.append(export)
            self._final_waiting[rid] = export
            self._lock.notify_all()
        # Hold the blocks: the final copy runs in the next step, then get_finished releases them.
        return True, None

    # ---------------- control commands (socket thread) ----------------

    def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "layout":
            return {"layout": self._layout.to_json()}
        if op == "stats":
            return {"stats": dict(self.stats)}
        if op == "capacity":
            assert self._kv_cache_manager is not None
            pool = self._kv_cache_manager.block_pool
            return {"free_blocks": pool.get_num_free_blocks(), "total_blocks": pool.num_gpu_blocks}
        wanted = str(cmd.get("request_id", ""))
        timeout = float(cmd.get("timeout", 30.0))
        if op == "info":
            with self._lock:
                rid = self._find(wanted)
                req = self._requests.get(rid) if rid else None
                if req is None:
                    return {"error": f"request {wanted!r} is not running here", "state": "unknown"}
                return {
                    "request_id": rid,
                    "state": req.status.name.lower(),
                    "num_computed_tokens": req.num_computed_tokens,
                    "num_prompt_tokens": req.num_prompt_tokens,
                    "num_tokens": req.num_tokens,
                    "max_tokens": req.max_tokens,
                }
        if op in ("export", "arm", "disarm"):
            with self._lock:
                rid = self._find(wanted)
                if rid is None or rid not in self._requests:
                    return {"error": f"request {wanted!r} is not running here", "state": "finished"}
                if op == "disarm":
                    self._armed.pop(rid, None)
                    return {"ok": True}
                if op == "arm":
                    self._armed[rid] = (str(cmd["segment"]), int(cmd.get("first_block", 0)))
                    # The id that POST /abort_requests takes: vLLM's external id (no random suffix).
                    return {"ok": True, "request_id": rid, "abort_id": rid.rsplit("-", 1)[0]}
                export = _Export(rid, str(cmd["segment"]), int(cmd.get("first_block", 0)), final=False)
                self._exports.append(export)
            if not export.done.wait(timeout):
                return {
                    "error": f"export not done in {timeout} s (is the engine stepping?)",
                    "state": "timeout",
                }
            return export.result or {"error": "no result", "state": "unknown"}
        if op == "final":
            deadline = time.monotonic() + timeout
            with self._lock:
                while True:
                    rid = next((r for r in self._final_waiting if _match_request_id(r, wanted)), None)
                    if rid is not None:
                        export = self._final_waiting.pop(rid)
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return {
                            "error": f"request {wanted!r} did not finish in {timeout} s",
                            "state": "timeout",
                        }
                    self._lock.wait(left)
            if not export.done.wait(max(0.0, deadline - time.monotonic())):
                return {"error": "final copy not done in time", "state": "timeout"}
            return export.result or {"error": "no result", "state": "unknown"}
        return {
            "error": f"unknown op {op!r}; expected layout, stats, capacity, info, export, arm, disarm, final"
        }

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()


def _layout_from_config(kv_cache_config: KVCacheConfig, block_size: int) -> seg.KVLayout:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"slofleet migration supports one KV cache group, the model has {len(groups)}")
    spec = groups[0].kv_cache_spec
    heads = int(spec.num_kv_heads)  # type: ignore[attr-defined]
    head_size = int(spec.head_size)  # type: ignore[attr-defined]
    dtype = spec.dtype  # type: ignore[attr-defined]
    # The CPU backend's layout is LBHNC: per layer (blocks, kv heads, block_size, K|V channels).
    # GPU backends differ; register_kv_caches checks this against the real tensors and refuses
    # to start on a layout whose first dimension is not the block.
    shape = (heads, block_size, 2 * head_size)
    nbytes = 2 * block_size * heads * head_size * torch.empty((), dtype=dtype).element_size()
    return seg.KVLayout(block_size, str(dtype), tuple(groups[0].layer_names), shape, nbytes)


def _error_reply(error: Exception) -> dict[str, Any]:
    return {"error": f"{type(error).__name__}: {error}", "state": "error"}
