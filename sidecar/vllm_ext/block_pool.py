"""Resizing vLLM's BlockPool in place: grow it (runtime KV grow, and a pipeline leader whose
workers re-laid their KV for fewer layers) and shrink it back (a pipeline split).

Its own module because both schedulers use it: scheduler.py (the `grow` op) and
pipeline_scheduler.py (the `pipeline_blocks` op), and scheduler.py imports pipeline_scheduler.py.

Block ids are indices into the workers' KV tensors, so the pool must never hold an id the workers
lack: the caller grows the workers first and the pool second, and shrinks in the other order.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

from slofleet.sidecar.vllm_ext.internals import require


class GrowError(RuntimeError):
    """A refused pool resize; the message is what the control socket's `error` says."""


_require = partial(require, error=GrowError, feature="KV grow")


def _counted_blocks(pool: Any) -> tuple[list[Any], int]:
    blocks: list[Any] = _require(pool, "blocks", "BlockPool")
    count = int(_require(pool, "num_gpu_blocks", "BlockPool"))
    if len(blocks) != count:
        raise GrowError(f"BlockPool has {len(blocks)} blocks but num_gpu_blocks={count}")
    return blocks, count


def grow_block_pool(pool: Any, new_blocks: int) -> int:
    """Append blocks `len(pool.blocks)..new_blocks-1` to vLLM's BlockPool as free blocks; returns
    the old count. Block ids are indices into the workers' KV tensors, so the new ids must be
    exactly the new tail of those tensors."""
    blocks, old_blocks = _counted_blocks(pool)
    queue = _require(pool, "free_block_queue", "BlockPool")
    append_n = _require(queue, "append_n", "FreeKVCacheBlockQueue")
    if new_blocks <= old_blocks:
        raise GrowError(f"num_blocks: {new_blocks} is not more than the current {old_blocks}")
    added = [KVCacheBlock(i, pool=pool) for i in range(old_blocks, new_blocks)]
    blocks.extend(added)
    append_n(added)
    pool.num_gpu_blocks = new_blocks
    return old_blocks


def shrink_block_pool(pool: Any, new_blocks: int) -> int:
    """Cut vLLM's BlockPool back to blocks `0..new_blocks-1`; returns the old count.

    Only an idle pool with an empty prefix cache can shrink: every block but the null block must
    be free and unhashed. That is the state a split leaves (drained, prefix cache reset), and it
    lets the free queue be rebuilt from scratch with vLLM's own `FreeKVCacheBlockQueue`, in block
    id order as vLLM builds it at startup, instead of unlinking blocks from an LRU order. The
    kept `KVCacheBlock` objects (the null block included, which managers hold references to)
    stay the same objects. A block in use refuses the shrink before anything changes.
    """
    blocks, old_blocks = _counted_blocks(pool)
    if not 1 < new_blocks < old_blocks:
        raise GrowError(f"num_blocks: {new_blocks} is not between 2 and the current {old_blocks} - 1")
    null_block = _require(pool, "null_block", "BlockPool")
    if blocks[0] is not null_block:
        raise GrowError("BlockPool.blocks[0] is not the pool's null block")
    queue = _require(pool, "free_block_queue", "BlockPool")
    free = int(_require(queue, "num_free_blocks", "FreeKVCacheBlockQueue"))
    busy = [
        b.block_id for b in blocks[1:] if _require(b, "ref_cnt", "KVCacheBlock") or b.block_hash is not None
    ]
    if busy or free != old_blocks - 1:
        raise GrowError(
            f"cannot shrink the block pool to {new_blocks}: {len(busy)} blocks are in use or cached "
            f"(first ids {busy[:8]}), {free} of {old_blocks - 1} are free; drain the engine and reset "
            "its prefix cache first"
        )
    for name in ("cached_block_hash_to_block", "cached_block_hashes_by_block", "_reuse_watchers"):
        if len(_require(pool, name, "BlockPool")):
            raise GrowError(f"cannot shrink the block pool: BlockPool.{name} is not empty")
    for block in blocks:
        block.prev_free_block = block.next_free_block = None
    del blocks[new_blocks:]
    pool.free_block_queue = FreeKVCacheBlockQueue(blocks[1:])
    pool.num_gpu_blocks = new_blocks
    return old_blocks
