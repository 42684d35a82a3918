"""Methods that slofleet adds to every vLLM worker (`--worker-extension-cls`).

vLLM mixes this class into its Worker class (it appends it to the worker's bases and refuses any
name that the worker already has), so every method here sees the worker's `model_runner`,
`vllm_config` and KV cache tensors. The sidecar calls them through the engine's HTTP
`POST /collective_rpc {"method": "slofleet_...", "args": [...], "kwargs": {...}}` (dev mode).

Conventions, for the methods that later issues add here (layer drop/restore, KV transfer hooks):
- every public name starts with `slofleet_`, so it never collides with a vLLM worker attribute;
- arguments arrive as strings (the HTTP route only forwards strings) and each method parses its
  own; results are plain JSON dicts, because the route stringifies anything that is not a dict or
  a list;
- methods read vLLM's typed objects (`KVCacheConfig`, `AttentionSpec`) instead of guessing from
  tensor shapes, and fail with a message naming what is missing.
"""

from __future__ import annotations

from typing import Any

import torch

from slofleet.sidecar.vllm_ext.kv_layout import KvLayoutExtension
from slofleet.sidecar.vllm_ext.kv_resize import KvResizeExtension
from slofleet.sidecar.vllm_ext.layers import LayerDropExtension
from slofleet.sidecar.vllm_ext.pipeline import PipelineExtension

# The protocol version of the dicts below; the sidecar checks it (see slofleet.sidecar.engine).
EXTENSION_PROTOCOL = 1


class SlofleetWorkerExtension(LayerDropExtension, KvResizeExtension, KvLayoutExtension, PipelineExtension):
    """Mixed into vLLM's Worker; see the module docstring for the rules of adding methods."""

    # Provided by vLLM's Worker once this class is mixed in.
    model_runner: Any
    vllm_config: Any
    rank: int

    def slofleet_kv_layout(self) -> dict[str, Any]:
        """Describe this worker's KV cache: what the sidecar's `Info` reports and what KV
        transfer needs to address a block (bytes per block across all layers, dtype, layout).

        Read from the runner's resolved `kv_cache_config` (the block count the scheduler uses)
        and checked against the allocated tensors, so a disagreement shows up here and not as a
        corrupt transfer later.
        """
        runner = self.model_runner
        config = getattr(runner, "kv_cache_config", None)
        if config is None:
            raise RuntimeError("kv_cache_config: the worker has not allocated its KV cache yet")
        groups = []
        bytes_per_block = 0
        layer_names: list[str] = []
        for group in config.kv_cache_groups:
            spec = group.kv_cache_spec
            page = int(spec.page_size_bytes)
            bytes_per_block += page * len(group.layer_names)
            layer_names.extend(group.layer_names)
            groups.append(
                {
                    "spec": type(spec).__name__,
                    "layers": list(group.layer_names),
                    "block_size_tokens": int(spec.block_size),
                    "num_kv_heads": int(getattr(spec, "num_kv_heads", 0)),
                    "head_size": int(getattr(spec, "head_size", 0)),
                    "dtype": str(getattr(spec, "dtype", "")).removeprefix("torch."),
                    "page_size_bytes": page,
                }
            )
        if not groups:
            raise RuntimeError("kv_cache_config.kv_cache_groups: the model has no KV cache group")
        first = groups[0]
        tensors = [t for t in runner.kv_caches if isinstance(t, torch.Tensor)]
        allocated_bytes = sum(t.numel() * t.element_size() for t in tensors)
        layout = self.vllm_config.cache_config.kv_cache_layout
        return {
            "protocol": EXTENSION_PROTOCOL,
            "rank": int(self.rank),
            "num_blocks": int(config.num_blocks),
            "block_size_tokens": first["block_size_tokens"],
            "bytes_per_block": bytes_per_block,
            "dtype": first["dtype"],
            "layout": str(getattr(layout, "name", layout) or ""),
            "num_layers": len(layer_names),
            "num_kv_heads": first["num_kv_heads"],
            "head_size": first["head_size"],
            "layer_names": layer_names,
            "tensor_shapes": [list(t.shape) for t in tensors],
            "allocated_bytes": allocated_bytes,
            "groups": groups,
        }
