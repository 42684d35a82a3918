"""The engine-core half of a runtime KV resize: a `--scheduler-cls` whose BlockPool can grow.

    --scheduler-cls slofleet.sidecar.vllm_ext.scheduler.SlofleetScheduler
    SLOFLEET_SCHEDULER_SOCKET=/dev/shm/slofleet/sched.sock   (no socket when unset)

The scheduler lives in vLLM's EngineCore process, which no HTTP route reaches (`/collective_rpc`
goes to the workers only), so it serves a Unix socket from a daemon thread. JSON lines:
    {"op": "info"}                    -> {"ok": true, "num_blocks", "free_blocks", "running",
                                          "waiting", "paused"}
    {"op": "grow", "num_blocks": M}   -> {"ok": true, "old_blocks", "new_blocks", ...}
    anything refused                  -> {"ok": false, "error": "..."}
The sidecar (`slofleet.sidecar.memory.kv_grow`) grows the workers' KV tensors first, then this
pool, all while the engine is paused (vllm-kunserve-facts.md, section 2).

Threading: `grow` runs on the socket thread, only while the scheduler is paused in mode keep
(`PauseState.PAUSED_ALL`), under a lock that the engine thread also takes in every scheduler
method that touches the pool. Why not hand the op to the engine thread at the start of
`schedule()` instead: while paused in mode keep, vLLM's EngineCore never calls `schedule()`
(`get_num_unfinished_requests()` returns 0 in PAUSED_ALL, so `has_work()` is False and the busy
loop blocks on its input queue), so a hand-off would wait for the resume that must come after
it. And pausing alone is not enough: the paused engine thread still handles input messages, and
an abort (a client that disconnects mid-grow) frees blocks into `free_block_queue` through
`finish_requests`, which would race the grow's append. The lock makes the grow atomic against
those calls and against `set_pause_state` (a resume cannot slip in between the pause check and
the grow); uncontended, it costs well under a microsecond per step.

New blocks join the tail of the free queue (vLLM's `append_n`), behind free blocks that may still
hold cached prefixes, so those prefixes are evicted first; a grow happens when the pool is full,
when that queue is nearly empty anyway.

On CPU vLLM always disables async scheduling, so the plain Scheduler is what vLLM would run;
`SlofleetAsyncScheduler` is the same for GPU engines with async scheduling (UNTESTED here).
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.scheduler import Scheduler

from slofleet.sidecar.vllm_ext.block_pool import GrowError, grow_block_pool, shrink_block_pool
from slofleet.sidecar.vllm_ext.control_socket import ControlSocket
from slofleet.sidecar.vllm_ext.internals import require
from slofleet.sidecar.vllm_ext.pipeline_scheduler import PipelineSchedulerMixin

logger = init_logger(__name__)

SOCKET_ENV = "SLOFLEET_SCHEDULER_SOCKET"
SCHEDULER_PROTOCOL = 1


_require = partial(require, error=GrowError, feature="KV grow")


class KvGrowSchedulerMixin:
    """Adds the control socket and `grow` to a vLLM v1 Scheduler; see the module docstring."""

    # Provided by vLLM's Scheduler.
    kv_cache_manager: Any
    kv_cache_config: Any
    cache_config: Any
    scheduler_config: Any
    pause_state: PauseState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slofleet_lock = threading.RLock()
        self._slofleet_server: ControlSocket | None = None
        super().__init__(*args, **kwargs)
        path = os.environ.get(SOCKET_ENV, "")
        if path:
            self._slofleet_server = ControlSocket(
                path, self.slofleet_control, error_reply=_error_reply, expected=GrowError,
                name="slofleet-scheduler-control",
            )  # fmt: skip

    # --- the engine thread's entry points that touch the pool, serialized with `grow` ---------
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().update_from_output(*args, **kwargs)  # type: ignore[misc]

    def add_request(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().add_request(*args, **kwargs)  # type: ignore[misc]

    def finish_requests(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().finish_requests(*args, **kwargs)  # type: ignore[misc]

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().reset_prefix_cache(*args, **kwargs)  # type: ignore[misc]

    def set_pause_state(self, *args: Any, **kwargs: Any) -> Any:
        with self._slofleet_lock:
            return super().set_pause_state(*args, **kwargs)  # type: ignore[misc]

    def shutdown(self) -> None:
        server, self._slofleet_server = self._slofleet_server, None
        if server is not None:
            server.close()
        super().shutdown()  # type: ignore[misc]

    # --- socket ops (socket thread) -----------------------------------------------------------
    def slofleet_info(self) -> dict[str, Any]:
        with self._slofleet_lock:
            pool = self.kv_cache_manager.block_pool
            running, waiting = self.get_request_counts()  # type: ignore[attr-defined]
            return {
                "ok": True,
                "protocol": SCHEDULER_PROTOCOL,
                "num_blocks": int(pool.num_gpu_blocks),
                "free_blocks": int(pool.get_num_free_blocks()),
                "running": int(running),
                "waiting": int(waiting),
                "paused": self.pause_state.name,
            }

    def slofleet_grow(self, num_blocks: int) -> dict[str, Any]:
        """Grow the BlockPool to `num_blocks`; the workers' KV must already hold that many."""
        start = time.perf_counter()
        with self._slofleet_lock:
            if self.pause_state != PauseState.PAUSED_ALL:
                raise GrowError(
                    f"the scheduler is {self.pause_state.name}, not PAUSED_ALL: pause the engine with "
                    "/pause?mode=keep and grow the workers' KV first"
                )
            old_blocks, free = self._slofleet_resize_pool(num_blocks, allow_shrink=False)
            running, waiting = self.get_request_counts()  # type: ignore[attr-defined]
        seconds = time.perf_counter() - start
        logger.info("slofleet: grew the KV block pool %d -> %d blocks in %.4f s", old_blocks, num_blocks,
                    seconds)  # fmt: skip
        return {
            "ok": True,
            "protocol": SCHEDULER_PROTOCOL,
            "old_blocks": old_blocks,
            "new_blocks": num_blocks,
            "free_blocks": free,
            "running": int(running),
            "waiting": int(waiting),
            "seconds": round(seconds, 6),
        }

    def _slofleet_resize_pool(self, num_blocks: int, *, allow_shrink: bool) -> tuple[int, int]:
        """Resize the BlockPool to `num_blocks` and every count that mirrors it; returns the old
        count and the free blocks after. The caller holds the lock with the engine paused. An
        equal count changes nothing (a retry of a resize that already happened); a smaller one
        is refused unless `allow_shrink` (the pool must then be idle, see `shrink_block_pool`)."""
        manager = _require(self, "kv_cache_manager", "Scheduler")
        pool = _require(manager, "block_pool", "KVCacheManager")
        coordinator = _require(manager, "coordinator", "KVCacheManager")
        if _require(coordinator, "block_pool", type(coordinator).__name__) is not pool:
            raise GrowError("the KV cache coordinator has more than one block pool; not supported")
        config = self.kv_cache_config
        old_blocks = int(_require(pool, "num_gpu_blocks", "BlockPool"))
        if int(config.num_blocks) != old_blocks:
            raise GrowError(
                f"kv_cache_config.num_blocks={config.num_blocks} != BlockPool.num_gpu_blocks={old_blocks}"
            )
        if num_blocks < old_blocks and allow_shrink:
            shrink_block_pool(pool, num_blocks)
        elif num_blocks != old_blocks:
            grow_block_pool(pool, num_blocks)  # refuses a smaller count
        # One KVCacheConfig object is shared by the scheduler, its KV cache manager and
        # coordinator, and the scheduler-side KV connector.
        config.num_blocks = num_blocks
        self.cache_config.num_gpu_blocks = num_blocks
        watermark = float(getattr(self.scheduler_config, "watermark", 0.0) or 0.0)
        if hasattr(manager, "watermark_blocks"):
            manager.watermark_blocks = int(watermark * num_blocks)
        return old_blocks, int(pool.get_num_free_blocks())

    def slofleet_control(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.get("op")
        if op == "info":
            return self.slofleet_info()
        if op == "grow":
            value = command.get("num_blocks")
            if not isinstance(value, int) or isinstance(value, bool):
                raise GrowError(f"num_blocks: expected an integer, got {value!r}")
            return self.slofleet_grow(value)
        raise GrowError(f"op: unknown {op!r}; expected 'info' or 'grow'")


class SlofleetScheduler(PipelineSchedulerMixin, KvGrowSchedulerMixin, Scheduler):
    """vLLM's v1 Scheduler with a growable BlockPool (what CPU engines run) that can also lead or
    follow a runtime pipeline (pipeline_scheduler.py; its ops arrive on the same socket)."""


class SlofleetAsyncScheduler(KvGrowSchedulerMixin, AsyncScheduler):
    """The same for engines with async scheduling (GPU default; UNTESTED here)."""


def _error_reply(error: Exception) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(error).__name__}: {error}"}
