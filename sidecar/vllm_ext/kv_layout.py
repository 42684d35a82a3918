"""Re-lay a worker's KV cache so only the attention layers it owns get blocks (issue 10 item 2:
KunServe's KV capacity extension for a merged pipeline).

A pipeline member runs only its layers [lo, hi) (pipeline.py), so KV for the other layers is dead
weight: merged, every member holds the same block ids (the leader's scheduler hands them out to
both), but each needs pages only for its own layers. Re-laying the buffer for the owned layers
alone, sized to what the member's budget holds (its old KV buffer plus the weight bytes its drop
freed), turns the freed memory into blocks: with k of n layers owned, a block costs k/n of what
it did, so the block count grows by about n/k plus what the freed weights pay for.

How, with vLLM's own allocator (vllm-kunserve-facts.md, sections 2 and 4(d)):
1. `owned_kv_cache_config` derives a `KVCacheConfig` whose `kv_cache_tensors` place only the
   owned layers, packed for the new block count. The KV cache *groups* keep every layer: the
   runner builds attention metadata per group layer on every step, and the block table is shared.
2. every layer is unbound first (so the old buffer is freed before the new one is allocated:
   peak memory is max(old, new), not old + new), then vLLM's
   `GPUModelRunner.initialize_kv_cache_tensors` allocates the new buffer and binds the owned
   layers exactly as at startup;
3. each unowned layer gets a 0-byte view `(blocks, ..., 0, C)`: it never runs, but
   `CPUModelRunner._zero_block_ids` indexes every full-attention layer's cache by block id. An
   empty tensor's data pointer is 0, so that method's de-duplication by data pointer never
   mistakes an owned layer for an already-zeroed one.
No block is copied: the merge and split happen on idle engines whose prefix caches are reset
(in-flight merge is not built), so no block holds KV anyone will read. The RPC refuses a worker
that still holds requests. Re-laying to all layers at the original count gives back the
startup config exactly (tests/test_kv_layout_units.py).

Every vLLM internal used here goes through `_require`, which fails naming the internal.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index

from slofleet.sidecar.vllm_ext.internals import require
from slofleet.sidecar.vllm_ext.kv_resize import KvResizeError, adopt_kv_cache

KV_LAYOUT_PROTOCOL = 1


_require = partial(require, error=KvResizeError, feature="KV re-layout")


def _single_tensor(config: Any) -> tuple[Any, Any]:
    """The one KV cache group and the one `KVCacheTensor` this re-layout understands (a
    decoder-only model with uniform full attention: every Llama-like model vLLM sizes this way)."""
    if getattr(config, "hisparse_host_num_blocks", None) is not None:
        raise KvResizeError("kv_cache_config uses a HiSparse host pool; re-laying it is not supported")
    if len(config.kv_cache_groups) != 1 or len(config.kv_cache_tensors) != 1:
        raise KvResizeError(
            f"kv_cache_config has {len(config.kv_cache_groups)} groups and {len(config.kv_cache_tensors)} "
            "tensors; re-laying KV for owned layers supports one group in one tensor"
        )
    group, tensor = config.kv_cache_groups[0], config.kv_cache_tensors[0]
    if not _require(group.kv_cache_spec, "has_layer_views", type(group.kv_cache_spec).__name__):
        raise KvResizeError(f"{type(group.kv_cache_spec).__name__} has no per-layer views")
    if getattr(tensor, "host_resident", False) or int(tensor.offset):
        raise KvResizeError("the KVCacheTensor is host-resident or not at offset 0; not supported")
    return group, tensor


def layer_block_bytes(config: Any) -> int:
    """Bytes one block of one layer takes in the backing buffer (its page plus any padding the
    layout adds), read from the placement vLLM computed."""
    _, tensor = _single_tensor(config)
    blocks = int(config.num_blocks)
    size = int(tensor.size)
    if size % (blocks * len(tensor.layers)):
        raise KvResizeError(f"KVCacheTensor.size={size} is not {blocks} blocks x {len(tensor.layers)} layers")
    return size // blocks // len(tensor.layers)


def owned_layer_names(config: Any, lo: int, hi: int) -> list[str]:
    """The KV layer names of decoder layers [lo, hi), in the group's order."""
    group, _ = _single_tensor(config)
    names = [n for n in group.layer_names if lo <= extract_layer_index(n) < hi]
    if not names:
        raise KvResizeError(f"layers [{lo}, {hi}) hold none of the KV layers {group.layer_names}")
    return names


def fitting_blocks(budget_bytes: int, block_bytes: int, owned_layers: int) -> int:
    """Blocks of `owned_layers` layers that fit `budget_bytes` (floored: a partial block holds no
    token)."""
    if block_bytes <= 0 or owned_layers <= 0:
        raise KvResizeError(f"block_bytes={block_bytes}, owned_layers={owned_layers}: must be positive")
    return budget_bytes // (block_bytes * owned_layers)


def owned_kv_cache_config(config: Any, owned: list[str], num_blocks: int, layout: Any) -> Any:
    """A deep copy of vLLM's `KVCacheConfig` whose one `KVCacheTensor` places only `owned` layers,
    for `num_blocks` blocks; equal in placement to what vLLM's `get_kv_cache_config_from_groups`
    computes for a group of just those layers (tests/test_kv_layout_units.py), with the groups
    unchanged.

    A layer's block is `offset + l*layer_stride + b*block_stride`. Layer-outermost (CPU: LBHNC):
    each layer owns a region of `layer_stride = per-layer block bytes x blocks`, so the region
    re-sizes and `block_stride` (the step inside it) stays. Block-outermost: a block packs every
    placed layer's page, so `block_stride` becomes the owned layers' share and `layer_stride` (the
    step between pages in a block) stays.
    """
    group, tensor = _single_tensor(config)
    if num_blocks < 2:
        raise KvResizeError(f"num_blocks: {num_blocks} is fewer than 2 (block 0 is vLLM's null block)")
    unknown = [n for n in owned if n not in group.layer_names]
    if not owned or unknown:
        raise KvResizeError(f"owned layers {owned} are empty or not in the KV group ({unknown})")
    owned = [n for n in group.layer_names if n in owned]  # the group's order, like vLLM's
    layer_outer = bool(_require(layout, "is_layer_compact", "KVCacheLayout"))
    block_outer = bool(_require(layout, "is_block_outermost", "KVCacheLayout"))
    if layer_outer == block_outer:
        raise KvResizeError(f"KV cache layout {getattr(layout, 'name', layout)} is neither layer- nor "
                            "block-outermost; cannot place a subset of its layers")  # fmt: skip
    per_block = layer_block_bytes(config)
    placed = copy.deepcopy(config)
    new = placed.kv_cache_tensors[0]
    new.layers = list(owned)
    new.size = per_block * len(owned) * num_blocks
    if layer_outer:
        if int(tensor.layer_stride) != per_block * int(config.num_blocks):
            raise KvResizeError(
                f"KVCacheTensor.layer_stride={tensor.layer_stride} is not one layer's {config.num_blocks} "
                "blocks; not a layout this re-layout understands"
            )
        new.layer_stride = per_block * num_blocks
    else:
        if int(tensor.block_stride) != per_block * len(tensor.layers):
            raise KvResizeError(
                f"KVCacheTensor.block_stride={tensor.block_stride} is not {len(tensor.layers)} layers' "
                "pages; not a layout this re-layout understands"
            )
        new.block_stride = per_block * len(owned)
    placed.num_blocks = num_blocks
    return placed


def empty_kv_view(like: torch.Tensor) -> torch.Tensor:
    """A 0-byte stand-in for an unowned layer's KV view: same block count (dim 0, which
    `_zero_block_ids` indexes) and dtype as an owned layer's view, one token dimension of 0."""
    shape = list(like.shape)
    shape[-2] = 0
    return torch.empty(shape, dtype=like.dtype, device=like.device)


class KvLayoutExtension:
    """Mixed into vLLM's Worker through `SlofleetWorkerExtension`; see the module docstring."""

    model_runner: Any
    vllm_config: Any
    rank: int

    def _slofleet_kv_parts(self) -> tuple[Any, Any, dict[str, Any]]:
        runner = self.model_runner
        config = _require(runner, "kv_cache_config", "GPUModelRunner")
        layout = _require(self.vllm_config.cache_config, "get_resolved_kv_cache_layout", "CacheConfig")()
        ctx = _require(_require(runner, "compilation_config", "GPUModelRunner"), "static_forward_context",
                       "CompilationConfig")  # fmt: skip
        return config, layout, ctx

    def slofleet_kv_fit(self, lo: str, hi: str, extra_bytes: str) -> dict[str, Any]:
        """How many blocks of only layers [lo, hi) fit this worker's KV buffer plus `extra_bytes`
        (what its weight drop freed). The caller takes the minimum over the pipeline's members,
        since they all hold the leader's block ids."""
        try:
            config, _, _ = self._slofleet_kv_parts()
            owned = owned_layer_names(config, int(lo), int(hi))
            block_bytes = layer_block_bytes(config)
            buffer_bytes = int(_single_tensor(config)[1].size)
            budget = buffer_bytes + int(extra_bytes)
        except (KvResizeError, ValueError) as e:
            return {"ok": False, "protocol": KV_LAYOUT_PROTOCOL, "error": f"{type(e).__name__}: {e}"}
        return {
            "ok": True,
            "protocol": KV_LAYOUT_PROTOCOL,
            "rank": int(self.rank),
            "num_blocks": int(config.num_blocks),
            "buffer_bytes": buffer_bytes,
            "budget_bytes": budget,
            "layer_block_bytes": block_bytes,
            "owned_layers": len(owned),
            "placed_layers": len(_single_tensor(config)[1].layers),
            "all_layers": len(_single_tensor(config)[0].layer_names),
            "blocks": fitting_blocks(budget, block_bytes, len(owned)),
        }

    def slofleet_kv_relayout(self, num_blocks: str, lo: str, hi: str, requeued: str = "") -> dict[str, Any]:
        """Re-allocate this worker's KV with `num_blocks` blocks for layers [lo, hi) only (all
        layers: back to the startup layout). The engine must be paused and idle with its prefix
        cache reset: block contents are discarded, not copied (see the module docstring).
        `requeued`: comma-separated ids of requests the scheduler preempted for recompute
        (`pipeline_requeue`); the worker still holds their state until their next step, but
        none of their KV is read again, so they do not count as requests whose KV is lost.

        Returns `{"ok": true, ...bytes and seconds}`, or `{"ok": false, "error"}` with the old
        layout in place (re-allocated empty if the new allocation failed after the old buffer
        was freed)."""
        start = time.perf_counter()
        try:
            discardable = frozenset(r for r in requeued.split(",") if r)
            result = self._slofleet_kv_relayout(int(num_blocks), int(lo), int(hi), discardable)
        except (KvResizeError, RuntimeError, ValueError, MemoryError) as e:
            return {"ok": False, "protocol": KV_LAYOUT_PROTOCOL, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 6)
        return result

    def _slofleet_kv_relayout(
        self, num_blocks: int, lo: int, hi: int, requeued: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        runner = self.model_runner
        config, layout, _ = self._slofleet_kv_parts()
        held = set(_require(runner, "requests", "GPUModelRunner")) - requeued
        if held:
            raise KvResizeError(f"the worker holds {len(held)} requests; their KV would be lost "
                                "(pause and drain or requeue them first)")  # fmt: skip
        owned = owned_layer_names(config, lo, hi)
        new_config = owned_kv_cache_config(config, owned, num_blocks, layout)
        old_bytes = int(config.kv_cache_tensors[0].size)
        try:
            self._slofleet_kv_bind(new_config)
        except BaseException:
            self._slofleet_kv_bind(config)  # the old layout, empty: its buffer is already gone
            raise
        return {
            "ok": True,
            "protocol": KV_LAYOUT_PROTOCOL,
            "rank": int(self.rank),
            "old_blocks": int(config.num_blocks),
            "new_blocks": num_blocks,
            "old_bytes": old_bytes,
            "new_bytes": int(new_config.kv_cache_tensors[0].size),
            "owned_layers": owned,
            "layers": [lo, hi],
        }

    def _slofleet_kv_bind(self, config: Any) -> None:
        """Free the current KV buffer, allocate `config` with vLLM's own allocator, and give the
        layers it does not place a 0-byte view."""
        runner = self.model_runner
        _, _, ctx = self._slofleet_kv_parts()
        allocate = _require(runner, "initialize_kv_cache_tensors", "GPUModelRunner")
        kernel_block_sizes = _require(runner, "_kernel_block_sizes", "GPUModelRunner")
        runner_kv: list[torch.Tensor] = _require(runner, "kv_caches", "GPUModelRunner")
        group = config.kv_cache_groups[0]
        for name in group.layer_names:
            if name not in ctx:
                raise KvResizeError(f"static_forward_context has no layer {name!r}")
            _require(ctx[name], "bind_kv_cache", type(ctx[name]).__name__)(torch.empty(0))
        runner_kv.clear()  # bind_kv_cache asserts the runner's list is empty; frees the old buffer
        manager_views = allocate(config, kernel_block_sizes)
        placed = config.kv_cache_tensors[0].layers
        like = _require(ctx[placed[0]], "kv_cache", type(ctx[placed[0]]).__name__)
        for name in group.layer_names:
            if name not in placed:
                ctx[name].bind_kv_cache(empty_kv_view(like))
        adopt_kv_cache(runner, self.vllm_config.cache_config, config, manager_views)
