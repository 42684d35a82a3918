"""Every vLLM internal that sidecar/vllm_ext/layers.py touches, checked against the installed vLLM.

layers.py reaches into vLLM (the packed CPU GEMM closure, the Llama module tree, config fields)
through `_Internals` only. These tests pin each of those touches without starting an engine, so
a vLLM upgrade that renames or reshapes one fails here with its name, not as a wrong token or a
dead engine in production. (tests/test_memory_engine.py runs the whole path on a real engine.)
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

vllm = pytest.importorskip("vllm")


def _source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_cpu_gemm_dispatch_is_what_restore_calls() -> None:
    from vllm.model_executor.layers import utils

    params = list(inspect.signature(utils.dispatch_cpu_unquantized_gemm).parameters)
    assert params == ["layer", "remove_weight"]
    src = _source(utils.dispatch_cpu_unquantized_gemm)
    assert "layer.cpu_linear = " in src, "the packed GEMM no longer lives in layer.cpu_linear"
    assert "if remove_weight:" in src
    # The weight read-back feeds the identity through the closure with this calling convention.
    assert "layer.cpu_linear(x, weight, bias)" in _source(utils.cpu_unquantized_gemm)


def test_linear_layers_pack_with_weight_removed_and_keep_their_sizes() -> None:
    from vllm.model_executor.layers import linear

    src = _source(linear.UnquantizedLinearMethod.process_weights_after_loading)
    assert "dispatch_cpu_unquantized_gemm(layer, remove_weight=True)" in src
    base = _source(linear.LinearBase.__init__) + _source(linear.ColumnParallelLinear.__init__)
    base += _source(linear.RowParallelLinear.__init__)
    assert "self.output_partition_sizes" in base and "self.input_size_per_partition" in base


def test_the_embedding_keeps_its_weight_beside_its_packed_copy() -> None:
    from vllm.model_executor.layers import vocab_parallel_embedding as vpe

    src = _source(vpe.UnquantizedEmbeddingMethod.process_weights_after_loading)
    assert "dispatch_cpu_unquantized_gemm(layer, remove_weight=False)" in src


def test_llama_module_tree() -> None:
    from vllm.model_executor.models import llama

    top = _source(llama.LlamaForCausalLM.__init__)
    assert "self.model = " in top and "self.lm_head = " in top
    inner = _source(llama.LlamaModel)  # __init__ is wrapped by @support_torch_compile
    for attr in ("self.embed_tokens", "self.layers", "self.norm"):
        assert attr in inner, attr


def test_worker_and_runner_attributes() -> None:
    from vllm.v1.worker import cpu_worker, gpu_model_runner, gpu_worker

    assert "self.model_runner" in _source(cpu_worker.CPUWorker)
    assert "self.model = " in _source(gpu_model_runner.GPUModelRunner)
    assert "rank" in inspect.signature(gpu_worker.Worker.__init__).parameters


def test_config_fields() -> None:
    from vllm.config import CompilationConfig, ModelConfig, ParallelConfig

    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert {"model", "revision", "dtype", "quantization", "enable_sleep_mode"} <= fields(ModelConfig)
    assert {"tensor_parallel_size", "pipeline_parallel_size"} <= fields(ParallelConfig)
    assert "cudagraph_mode" in fields(CompilationConfig)


def test_the_platform_tells_cpu_from_gpu() -> None:
    from vllm.platforms import current_platform

    assert current_platform.is_cpu() in (True, False)


def test_extension_names_do_not_collide_with_the_worker() -> None:
    """vLLM mixes the extension into its Worker and refuses names the worker already has."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from slofleet.sidecar.vllm_ext.layers import LayerDropExtension

    ours = {n for n in vars(LayerDropExtension) if not n.startswith("__")}
    assert all(n.startswith(("slofleet_", "_slofleet_")) for n in ours), ours
    assert not ours & (set(dir(CPUWorker)) | set(dir(Worker)))
