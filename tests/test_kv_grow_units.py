"""The pure parts of the runtime KV grow against the installed vLLM's own classes (no engine):
the re-sized KV cache config must be exactly what vLLM computes for the new block count (else the
workers' views would address the wrong bytes), the block copy must keep every block, and the
scheduler's BlockPool must hand out exactly the new ids. tests/test_kv_grow_engine.py runs the
whole path on a real engine.
"""

from __future__ import annotations

from typing import Any

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from slofleet.sidecar.vllm_ext.kv_resize import KvResizeError, copy_kv_blocks, scaled_kv_cache_config  # noqa: E402
from slofleet.sidecar.vllm_ext.scheduler import GrowError, grow_block_pool  # noqa: E402

# The tiny model's attention: 2 KV heads of 32 (CPU block size 128, bf16).
SPEC = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]


def _vllm_config(layout: str, blocks: int) -> tuple[VllmConfig, Any]:
    config = VllmConfig()
    config.cache_config.kv_cache_layout = layout
    groups = [KVCacheGroupSpec(list(LAYERS), SPEC)]
    return config, get_kv_cache_config_from_groups(
        config, groups, SPEC.page_size_bytes * len(LAYERS) * blocks
    )


@pytest.mark.parametrize("layout", [m.name for m in KVCacheLayout])
def test_scaled_config_is_what_vllm_computes_for_the_new_count(layout: str) -> None:
    config, small = _vllm_config(layout, 4)
    _, big = _vllm_config(layout, 37)
    scaled = scaled_kv_cache_config(small, 37, config.cache_config.get_resolved_kv_cache_layout())
    assert scaled == big
    assert small.num_blocks == 4, "the runner's own config must not change"


@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC", "LHBNC"])
def test_copy_keeps_every_block_and_layers_do_not_overlap(layout: str) -> None:
    config, small = _vllm_config(layout, 4)
    kv_layout = config.cache_config.get_resolved_kv_cache_layout()
    big = scaled_kv_cache_config(small, 9, kv_layout)
    old = allocate_kv_cache(small, torch.device("cpu"), kv_layout)
    new = allocate_kv_cache(big, torch.device("cpu"), kv_layout)
    gen = torch.Generator().manual_seed(0)
    for view in old.values():
        view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))
    copied = copy_kv_blocks(old, new, (4, 9))
    assert copied == small.kv_cache_tensors[0].size
    for name in LAYERS:
        assert new[name].shape[0] == 9
        assert torch.equal(new[name][:4], old[name]), name
        assert not new[name][4:].any(), f"{name}: the new blocks must start empty"
    # Every (layer, block) of the grown buffer is its own memory: write a distinct value to each
    # and read them all back.
    for li, name in enumerate(LAYERS):
        for b in range(9):
            new[name][b].fill_(li * 16 + b)
    for li, name in enumerate(LAYERS):
        for b in range(9):
            assert torch.all(new[name][b] == li * 16 + b), (name, b)


def test_scaling_refuses_a_shrink_and_a_layout_it_does_not_understand() -> None:
    config, small = _vllm_config("LBHNC", 4)
    layout = config.cache_config.get_resolved_kv_cache_layout()
    with pytest.raises(KvResizeError, match="not more than the current 4"):
        scaled_kv_cache_config(small, 4, layout)
    small.kv_cache_tensors[0].layer_stride += 1  # not whole blocks: some other placement scheme
    with pytest.raises(KvResizeError, match="layer_stride"):
        scaled_kv_cache_config(small, 8, layout)


def test_copy_refuses_views_that_did_not_grow_as_asked() -> None:
    old = {"a": torch.zeros(4, 2, 8)}
    with pytest.raises(KvResizeError, match="has 6 blocks"):
        copy_kv_blocks(old, {"a": torch.zeros(6, 2, 8)}, (4, 8))
    with pytest.raises(KvResizeError, match="block shape changed"):
        copy_kv_blocks(old, {"a": torch.zeros(8, 2, 9)}, (4, 8))


def test_grown_block_pool_hands_out_the_new_ids_after_the_old_free_ones() -> None:
    pool = BlockPool(num_gpu_blocks=4, enable_caching=True, hash_block_size=128)
    held = pool.get_new_blocks(3)  # blocks 1..3 (0 is the null block): the pool is full
    assert pool.get_num_free_blocks() == 0
    assert grow_block_pool(pool, 10) == 4
    assert pool.num_gpu_blocks == 10 and len(pool.blocks) == 10
    assert pool.get_num_free_blocks() == 6
    assert pool.get_usage() == pytest.approx(3 / 9)
    assert [b.block_id for b in pool.get_new_blocks(6)] == [4, 5, 6, 7, 8, 9]
    pool.free_blocks(held)
    assert sorted(b.block_id for b in pool.get_new_blocks(3)) == [1, 2, 3]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)  # exactly 10 blocks: nothing beyond the grown count
    with pytest.raises(GrowError, match="not more than"):
        grow_block_pool(pool, 10)
