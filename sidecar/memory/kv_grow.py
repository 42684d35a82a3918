"""Grow a serving engine's KV cache at runtime, requests kept (DESIGN.md section 5; issue 10).

KunServe turns the memory that dropped layers free into KV blocks. vLLM has no resize hook, so
this drives the two halves slofleet adds to the engine (vllm-kunserve-facts.md, section 2):
1. `POST /pause?mode=keep&clear_cache=false`: running requests freeze with their KV, new ones
   queue; when the call returns the engine is idle (no step in flight);
2. the workers grow their KV tensors and copy the old blocks over
   (`/collective_rpc slofleet_grow_kv`, slofleet.sidecar.vllm_ext.kv_resize);
3. the engine core's scheduler appends the new blocks to its BlockPool, over its control socket
   (slofleet.sidecar.vllm_ext.scheduler); only now can it hand out the new block ids, which the
   workers already have;
4. `POST /resume`: the waiting requests are admitted into the new blocks.
Any failure still resumes the engine (with the old capacity, or the workers' larger tensors of
which the scheduler uses only the old blocks, which is safe) and is reported with its stage.
Growing again to the same count is a no-op on each half, so a failed grow can simply be retried.

The HTTP calls go through `EngineControl` (aiohttp, one connection per call, like every memory
command); the sidecar runtime never imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from slofleet.sidecar.memory.engine import EngineCallError, EngineControl

KV_RESIZE_PROTOCOL = 1
SCHEDULER_PROTOCOL = 1


class KvGrowError(RuntimeError):
    """A grow that did not happen. `stage` is where it failed (`scheduler-info`, `pause`, `worker`,
    `scheduler`, `resume`); `resumed` says whether the engine is running again."""

    def __init__(self, stage: str, message: str, *, resumed: bool) -> None:
        super().__init__(
            f"KV grow failed at {stage}: {message}" + ("" if resumed else " (engine left PAUSED)")
        )
        self.stage, self.resumed = stage, resumed


@dataclass(frozen=True, slots=True)
class KvGrowResult:
    old_blocks: int
    new_blocks: int
    old_bytes: int  # the workers' KV buffer before and after (per worker)
    new_bytes: int
    copied_bytes: int
    worker_seconds: float  # allocate + copy inside the worker
    scheduler_seconds: float  # BlockPool growth inside the engine core
    paused_seconds: float  # from the pause returning to the resume returning (0 if the caller paused)
    total_seconds: float
    running: int  # requests the scheduler held when its pool grew (paused: none ran meanwhile)
    waiting: int


async def scheduler_command(
    socket_path: str, command: dict[str, Any], timeout_seconds: float = 30.0
) -> dict[str, Any]:
    """One JSON-line command to the scheduler's control socket; returns its reply dict."""

    async def call() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            await writer.wait_closed()
        if not line:
            raise ConnectionError("the scheduler closed the socket without a reply")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError(f"reply is not a JSON object: {line[:200]!r}")
        return reply

    return await asyncio.wait_for(call(), timeout_seconds)


async def grow_kv(
    engine_url: str,
    scheduler_socket: str,
    num_blocks: int,
    *,
    pause: bool = True,
    timeout_seconds: float = 300.0,
) -> KvGrowResult:
    """Grow the engine at `engine_url` (dev mode, `--worker-extension-cls` slofleet's, and
    `--scheduler-cls` slofleet's serving `scheduler_socket`) to `num_blocks` KV blocks.

    `pause=False` is for a caller that already holds the engine paused in mode keep (e.g. to drop
    layers and grow under one pause); the scheduler refuses to grow an engine that is not.
    """
    start = time.perf_counter()
    try:
        info = await scheduler_command(scheduler_socket, {"op": "info"})
    except (OSError, ValueError, TimeoutError) as e:
        raise KvGrowError(
            "scheduler-info", f"{scheduler_socket}: {type(e).__name__}: {e}", resumed=True
        ) from e
    if not info.get("ok") or info.get("protocol") != SCHEDULER_PROTOCOL:
        raise KvGrowError("scheduler-info", f"unexpected reply {info}", resumed=True)
    if num_blocks <= int(info["num_blocks"]):
        raise KvGrowError(
            "scheduler-info", f"num_blocks {num_blocks} is not more than the current {info['num_blocks']}",
            resumed=True,
        )  # fmt: skip

    control = EngineControl(engine_url, timeout_seconds=timeout_seconds)
    await control.start()
    paused_at = 0.0
    worker: dict[str, Any] = {}
    sched: dict[str, Any] = {}
    try:
        if pause:
            try:
                await control.pause_keep()
            except EngineCallError as e:
                await _resume_quietly(control)  # a half-done pause must not stick
                raise KvGrowError("pause", str(e), resumed=True) from e
            paused_at = time.perf_counter()
        failure: KvGrowError | None = None
        try:
            worker = await control.rpc("slofleet_grow_kv", str(num_blocks), timeout_seconds=timeout_seconds)
            if not worker.get("ok") or worker.get("protocol") != KV_RESIZE_PROTOCOL:
                raise KvGrowError("worker", str(worker.get("error", worker)), resumed=pause)
            if int(worker["new_blocks"]) != num_blocks:
                raise KvGrowError("worker", f"workers report {worker['new_blocks']} blocks", resumed=pause)
            try:
                sched = await scheduler_command(scheduler_socket, {"op": "grow", "num_blocks": num_blocks})
            except (OSError, ValueError, TimeoutError) as e:
                raise KvGrowError("scheduler", f"{type(e).__name__}: {e}", resumed=pause) from e
            if not sched.get("ok"):
                raise KvGrowError("scheduler", str(sched.get("error", sched)), resumed=pause)
        except EngineCallError as e:
            failure = KvGrowError("worker", str(e), resumed=pause)
        except KvGrowError as e:
            failure = e
        except BaseException:  # cancelled mid-grow: never leave the engine paused behind us
            if pause:
                await _resume_quietly(control)
            raise
        if pause:
            try:
                await control.resume()
            except EngineCallError as e:
                detail = f"{e}" + (f"; after: {failure}" if failure else "")
                raise KvGrowError("resume", detail, resumed=False) from e
        if failure is not None:
            raise failure
    finally:
        await control.close()
    end = time.perf_counter()
    return KvGrowResult(
        old_blocks=int(info["num_blocks"]),
        new_blocks=num_blocks,
        old_bytes=int(worker["old_bytes"]),
        new_bytes=int(worker["new_bytes"]),
        copied_bytes=int(worker["copied_bytes"]),
        worker_seconds=float(worker["seconds"]),
        scheduler_seconds=float(sched["seconds"]),
        paused_seconds=(end - paused_at) if pause else 0.0,
        total_seconds=end - start,
        running=int(sched["running"]),
        waiting=int(sched["waiting"]),
    )


async def _resume_quietly(control: EngineControl) -> None:
    try:
        await control.resume()
    except EngineCallError:
        pass
