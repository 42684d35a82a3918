"""The pure parts of the owned-layers KV re-layout and the pool shrink against the installed
vLLM's own classes (no engine): a config placing only the owned layers must be what vLLM itself
computes for those layers (else the workers' views would address the wrong bytes), re-laying back
to all layers must give the startup config exactly, the budget arithmetic must match the issue's
formula, and a shrunk BlockPool must hand out exactly the kept ids. tests/test_pipeline_engine.py
runs the whole path on real engines.
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

from slofleet.sidecar.vllm_ext.block_pool import GrowError, grow_block_pool, shrink_block_pool  # noqa: E402
from slofleet.sidecar.vllm_ext.kv_layout import (  # noqa: E402
    empty_kv_view,
    fitting_blocks,
    layer_block_bytes,
    owned_kv_cache_config,
    owned_layer_names,
)
from slofleet.sidecar.vllm_ext.kv_resize import KvResizeError  # noqa: E402

# The tiny model's attention: 2 KV heads of 32 (CPU block size 128, bf16), here with 4 layers.
SPEC = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
LAYOUTS = [m.name for m in KVCacheLayout]


def _config(layout: str, layers: list[str], blocks: int) -> tuple[VllmConfig, Any]:
    config = VllmConfig()
    config.cache_config.kv_cache_layout = layout
    groups = [KVCacheGroupSpec(list(layers), SPEC)]
    return config, get_kv_cache_config_from_groups(
        config, groups, SPEC.page_size_bytes * len(layers) * blocks
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("lo", "hi"), [(0, 2), (2, 4), (1, 2)])
def test_owned_config_places_what_vllm_computes_for_the_owned_layers(layout: str, lo: int, hi: int) -> None:
    config, full = _config(layout, LAYERS, 6)
    kv_layout = config.cache_config.get_resolved_kv_cache_layout()
    owned = owned_layer_names(full, lo, hi)
    assert owned == LAYERS[lo:hi]
    placed = owned_kv_cache_config(full, owned, 23, kv_layout)
    _, vllm_owned = _config(layout, LAYERS[lo:hi], 23)
    assert placed.kv_cache_tensors == vllm_owned.kv_cache_tensors
    assert placed.num_blocks == 23
    assert placed.kv_cache_groups == full.kv_cache_groups, "every layer keeps its metadata and block table"
    assert full.num_blocks == 6 and len(full.kv_cache_tensors[0].layers) == 4, (
        "the runner's config is untouched"
    )
    # Back to all layers at the startup count: exactly the startup config.
    assert owned_kv_cache_config(placed, list(LAYERS), 6, kv_layout) == full


@pytest.mark.parametrize("layout", ["LBHNC", "LHBNC", "BLHNC"])
def test_owned_views_are_disjoint_full_pages_and_empty_views_index_like_them(layout: str) -> None:
    config, full = _config(layout, LAYERS, 6)
    kv_layout = config.cache_config.get_resolved_kv_cache_layout()
    placed = owned_kv_cache_config(full, LAYERS[2:], 13, kv_layout)
    views = allocate_kv_cache(placed, torch.device("cpu"), kv_layout)
    assert sorted(views) == LAYERS[2:]
    whole = allocate_kv_cache(full, torch.device("cpu"), kv_layout)
    for name, view in views.items():
        assert view.shape[1:] == whole[name].shape[1:] and view.shape[0] == 13 and view.dtype == SPEC.dtype
    for li, name in enumerate(LAYERS[2:]):
        for b in range(13):
            views[name][b].fill_(li * 16 + b)
    for li, name in enumerate(LAYERS[2:]):
        for b in range(13):
            assert torch.all(views[name][b] == li * 16 + b), (name, b)
    empty = empty_kv_view(views[LAYERS[2]])
    assert empty.shape[0] == 13 and empty.numel() == 0 and empty.data_ptr() == 0
    empty[12].zero_()  # what CPUModelRunner._zero_block_ids does to every layer


def test_budget_arithmetic_is_freed_bytes_over_bytes_per_block_per_owned_layer() -> None:
    _, full = _config("LBHNC", LAYERS[:2], 8)
    page = layer_block_bytes(full)
    assert page == SPEC.page_size_bytes == 2 * 128 * 2 * 32 * 2
    buffer = full.kv_cache_tensors[0].size
    freed = 426_752  # what the 2-layer tiny model's leader drops: layer 1 and the head
    # Keeping 1 of 2 layers doubles the blocks; the freed weights add whole blocks on top.
    assert fitting_blocks(buffer, page, 1) == 16
    assert fitting_blocks(buffer + freed, page, 1) == 16 + freed // page == 29
    assert fitting_blocks(buffer + page - 1, page, 2) == 8, "a partial block holds no token"
    with pytest.raises(KvResizeError):
        fitting_blocks(buffer, page, 0)


def test_owned_config_refuses_what_it_does_not_understand() -> None:
    config, full = _config("LBHNC", LAYERS, 6)
    kv_layout = config.cache_config.get_resolved_kv_cache_layout()
    with pytest.raises(KvResizeError, match="hold none"):
        owned_layer_names(full, 4, 6)
    with pytest.raises(KvResizeError, match="not in the KV group"):
        owned_kv_cache_config(full, ["model.layers.9.self_attn.attn"], 8, kv_layout)
    with pytest.raises(KvResizeError, match="fewer than 2"):
        owned_kv_cache_config(full, LAYERS[:1], 1, kv_layout)
    full.kv_cache_tensors[0].layer_stride += 1  # not whole blocks: some other placement scheme
    with pytest.raises(KvResizeError, match="layer_stride"):
        owned_kv_cache_config(full, LAYERS[:1], 8, kv_layout)
    two = VllmConfig()
    two.cache_config.kv_cache_layout = "LBHNC"
    groups = [KVCacheGroupSpec(LAYERS[:2], SPEC), KVCacheGroupSpec(LAYERS[2:], SPEC)]
    split = get_kv_cache_config_from_groups(two, groups, SPEC.page_size_bytes * 4 * 6)
    with pytest.raises(KvResizeError, match="one group"):
        owned_layer_names(split, 0, 1)


def test_shrunk_block_pool_hands_out_only_the_kept_ids() -> None:
    pool = BlockPool(num_gpu_blocks=4, enable_caching=True, hash_block_size=128)
    null = pool.null_block
    grow_block_pool(pool, 12)
    held = pool.get_new_blocks(5)
    with pytest.raises(GrowError, match="in use or cached"):
        shrink_block_pool(pool, 4)
    assert pool.num_gpu_blocks == 12 and pool.get_num_free_blocks() == 6, "a refused shrink changes nothing"
    pool.free_blocks(held)
    assert shrink_block_pool(pool, 4) == 12
    assert pool.num_gpu_blocks == 4 and len(pool.blocks) == 4 and pool.blocks[0] is null
    assert pool.get_num_free_blocks() == 3 and pool.get_usage() == 0
    assert sorted(b.block_id for b in pool.get_new_blocks(3)) == [1, 2, 3]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(GrowError, match="between 2"):
        shrink_block_pool(pool, 4)
