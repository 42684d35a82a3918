"""Grow a running worker's KV cache from N to M > N blocks, keeping every block's contents
(DESIGN.md section 5: KunServe turns memory freed by dropped layers into KV capacity).

vLLM sizes the KV cache once, at startup, and has no resize hook (vllm-kunserve-facts.md,
section 2). This is the worker half of a resize built from vLLM's own pieces:
1. the runner's `kv_cache_config` is deep-copied and re-sized to M blocks (`scaled_kv_cache_config`:
   the backing size and, for layer-outermost layouts, each layer's region grow; block-outermost
   layouts keep their strides because a block is a fixed-size slice of all layers);
2. `runner.kv_caches` is emptied (vLLM's `bind_kv_cache` asserts it is) and vLLM's own
   `GPUModelRunner.initialize_kv_cache_tensors(cfg, runner._kernel_block_sizes)` allocates the new
   buffer and rebinds every attention layer, exactly as at startup;
3. each layer's first N blocks are copied from the old views into the new ones (block b keeps its
   id, so the scheduler's block tables stay valid), then the old buffer is released.
Peak memory is old + new bytes for the moment of the copy.

The scheduler half (`slofleet.sidecar.vllm_ext.scheduler`) grows the BlockPool afterwards; the
sidecar's `slofleet.sidecar.memory.kv_grow` runs both with the engine paused (mode keep). The
worker must grow first: a scheduler that hands out block ids >= N before the worker has them
would make the next step write outside the KV buffer.

Every vLLM internal used here is read through `_require`, which fails naming the internal, so a
vLLM upgrade that renames one fails loudly instead of corrupting KV.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Any

import torch

from slofleet.sidecar.vllm_ext.internals import require

# The protocol of the dict `slofleet_grow_kv` returns; the sidecar checks it.
KV_RESIZE_PROTOCOL = 1


class KvResizeError(RuntimeError):
    """A refused or failed resize; the message names the argument or vLLM internal at fault."""


_require = partial(require, error=KvResizeError, feature="KV resize")


def scaled_kv_cache_config(config: Any, new_blocks: int, layout: Any) -> Any:
    """A deep copy of vLLM's `KVCacheConfig` re-sized to `new_blocks`, equal to what vLLM's own
    `get_kv_cache_config_from_groups` computes for that count (tests/test_kv_grow_units.py
    checks this for every layout).

    `KVCacheTensor` places layer l's block b at `offset + l*layer_stride + b*block_stride` in a
    backing buffer of `size` bytes. `size` is bytes-per-block times blocks, so it scales. In a
    layer-outermost layout (CPU: LBHNC) each layer owns a region of all its blocks, so
    `layer_stride` and the `offset`s (sums of whole regions) scale too; in a block-outermost
    layout a block holds every layer's page, so only `size` changes.
    """
    old_blocks = int(config.num_blocks)
    if new_blocks <= old_blocks:
        raise KvResizeError(f"num_blocks: {new_blocks} is not more than the current {old_blocks}")
    if not config.kv_cache_tensors:
        raise KvResizeError("kv_cache_config.kv_cache_tensors is empty: this model has no KV cache")
    if getattr(config, "hisparse_host_num_blocks", None) is not None:
        raise KvResizeError("kv_cache_config uses a HiSparse host pool; resizing it is not supported")
    layer_outer = bool(_require(layout, "is_layer_compact", "KVCacheLayout"))
    block_outer = bool(_require(layout, "is_block_outermost", "KVCacheLayout"))
    if layer_outer == block_outer:
        raise KvResizeError(f"KV cache layout {getattr(layout, 'name', layout)} is neither layer- nor "
                            "block-outermost; cannot scale its strides")  # fmt: skip
    scaled = copy.deepcopy(config)
    scaled.num_blocks = new_blocks
    for tensor in scaled.kv_cache_tensors:
        if getattr(tensor, "host_resident", False):
            raise KvResizeError(f"KVCacheTensor of {tensor.layers[0]} is host-resident; not supported")
        fields = ("size", "layer_stride", "offset") if layer_outer else ("size",)
        for name in fields:
            value = int(getattr(tensor, name))
            if value % old_blocks:
                raise KvResizeError(
                    f"KVCacheTensor.{name}={value} of {tensor.layers[0]} is not a multiple of "
                    f"num_blocks={old_blocks}; the layout is not what this resize understands"
                )
            setattr(tensor, name, value // old_blocks * new_blocks)
    return scaled


def copy_kv_blocks(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], ratio: tuple[int, int]) -> int:
    """Copy every layer's old blocks into the first blocks of its new view; returns bytes copied.

    Views are vLLM's per-layer `[blocks, ...]` tensors (dim 0 is the block, possibly a kernel
    block when the backend splits a scheduler block; kernel blocks of block b stay at b*k..b*k+k-1,
    so a prefix copy is still exact). `ratio` is (old blocks, new blocks): every new view must be
    exactly that much longer, with the same block shape and dtype. Layers that share one tensor
    (KV sharing) are copied once.
    """
    old_blocks, new_blocks = ratio
    if set(old) != set(new):
        raise KvResizeError(f"the KV layers changed across the resize: {sorted(set(old) ^ set(new))}")
    copied = 0
    seen: set[int] = set()
    for name, src in old.items():
        dst = new[name]
        if dst.shape[1:] != src.shape[1:] or dst.dtype != src.dtype or src.shape[0] % old_blocks:
            raise KvResizeError(
                f"KV view of {name}: old {tuple(src.shape)} {src.dtype}, new {tuple(dst.shape)} {dst.dtype}; "
                "the block shape changed (vLLM's create_kv_cache_views changed?)"
            )
        if dst.shape[0] != src.shape[0] // old_blocks * new_blocks:
            raise KvResizeError(
                f"KV view of {name} has {dst.shape[0]} blocks after growing {old_blocks} -> {new_blocks} "
                f"blocks from {src.shape[0]}"
            )
        if src.data_ptr() in seen:
            continue
        seen.add(src.data_ptr())
        dst[: src.shape[0]].copy_(src)
        copied += src.numel() * src.element_size()
    return copied


def adopt_kv_cache(runner: Any, cache_config: Any, config: Any, manager_views: Any) -> None:
    """Make a newly allocated KV buffer the runner's: its config and block count, the GPU
    runner's precomputed block addresses, and the KV connector's registered tensors (a connector
    must address the new buffer)."""
    runner.kv_cache_config = config
    cache_config.num_gpu_blocks = int(config.num_blocks)
    if hasattr(runner, "_kv_block_zeroer"):  # GPU runners precompute block addresses (UNTESTED)
        runner._init_kv_zero_meta()
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if has_kv_transfer_group():
        get_kv_transfer_group().register_kv_caches(manager_views)


class KvResizeExtension:
    """Mixed into vLLM's Worker through `SlofleetWorkerExtension`; see the module docstring."""

    model_runner: Any
    vllm_config: Any
    rank: int

    def _slofleet_bound_kv_views(self, config: Any) -> dict[str, torch.Tensor]:
        """The tensor each KV layer of `config` computes with: what `bind_kv_cache` gave the
        attention module (`static_forward_context[name].kv_cache`), indexed by the scheduler's
        block ids (or kernel block ids)."""
        runner = self.model_runner
        ctx = _require(_require(runner, "compilation_config", "GPUModelRunner"), "static_forward_context",
                       "CompilationConfig")  # fmt: skip
        views: dict[str, torch.Tensor] = {}
        for group in config.kv_cache_groups:
            spec = group.kv_cache_spec
            if not _require(spec, "has_layer_views", type(spec).__name__):
                raise KvResizeError(f"KV cache group of {type(spec).__name__} has no per-layer views; "
                                    "only attention KV can be resized")  # fmt: skip
            for name in group.layer_names:
                if name not in ctx:
                    raise KvResizeError(f"static_forward_context has no layer {name!r}")
                kv = _require(ctx[name], "kv_cache", type(ctx[name]).__name__)
                if not isinstance(kv, torch.Tensor):
                    raise KvResizeError(f"{name}.kv_cache is a {type(kv).__name__}, not one tensor")
                views[name] = kv
        return views

    def slofleet_grow_kv(self, num_blocks: str) -> dict[str, Any]:
        """Grow this worker's KV cache to `num_blocks` blocks, keeping the contents of the current
        ones. The engine must be paused (mode keep): the call runs between steps in the worker's
        own loop, but the scheduler may only hand out the new block ids after this returns.

        Returns `{"ok": true, ...sizes and seconds}`, or `{"ok": false, "error": ...}` with the
        old cache still in place (a refused argument, a changed vLLM internal, a failed
        allocation), so the engine keeps serving N blocks after any failure here.
        """
        start = time.perf_counter()
        try:
            result = self._slofleet_grow_kv(num_blocks)
        except (KvResizeError, RuntimeError, ValueError, MemoryError) as e:
            return {"ok": False, "protocol": KV_RESIZE_PROTOCOL, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 6)
        return result

    def _slofleet_grow_kv(self, num_blocks: str) -> dict[str, Any]:
        try:
            new_blocks = int(num_blocks)
        except ValueError as e:
            raise KvResizeError(f"num_blocks: {num_blocks!r} is not an integer") from e
        runner = self.model_runner
        old_config = _require(runner, "kv_cache_config", "GPUModelRunner")
        kernel_block_sizes = _require(runner, "_kernel_block_sizes", "GPUModelRunner")
        allocate = _require(runner, "initialize_kv_cache_tensors", "GPUModelRunner")
        runner_kv: list[torch.Tensor] = _require(runner, "kv_caches", "GPUModelRunner")
        cache_config = self.vllm_config.cache_config
        layout = _require(cache_config, "get_resolved_kv_cache_layout", "CacheConfig")()
        old_blocks = int(old_config.num_blocks)
        old_bytes = int(old_config.kv_cache_tensors[0].size) if old_config.kv_cache_tensors else 0
        result: dict[str, Any] = {
            "ok": True,
            "protocol": KV_RESIZE_PROTOCOL,
            "rank": int(self.rank),
            "old_blocks": old_blocks,
            "new_blocks": new_blocks,
            "old_bytes": old_bytes,
        }
        if new_blocks == old_blocks:  # a retry after the scheduler half failed: nothing to do
            return {**result, "new_bytes": old_bytes, "copied_bytes": 0}
        new_config = scaled_kv_cache_config(old_config, new_blocks, layout)
        old_views = self._slofleet_bound_kv_views(old_config)
        old_runner_kv = list(runner_kv)

        runner_kv.clear()  # bind_kv_cache asserts the runner's list is empty
        try:
            manager_views = allocate(new_config, kernel_block_sizes)
            new_views = self._slofleet_bound_kv_views(new_config)
            copied = copy_kv_blocks(old_views, new_views, (old_blocks, new_blocks))
        except BaseException:
            # Put the old cache back (the new one, if allocated, is freed with its last view).
            ctx = runner.compilation_config.static_forward_context
            for name, view in old_views.items():
                ctx[name].bind_kv_cache(view)
            runner_kv[:] = old_runner_kv
            raise
        adopt_kv_cache(runner, cache_config, new_config, manager_views)
        return {**result, "new_bytes": int(new_config.kv_cache_tensors[0].size), "copied_bytes": copied}
