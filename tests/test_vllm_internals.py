"""Engine-side code reads vLLM internals only through `require`: a vLLM upgrade that renames one
must fail with the feature's error naming the internal, not with an AttributeError deep inside a
step (or, worse, silently)."""

from __future__ import annotations

import pytest

from slofleet.sidecar.vllm_ext.block_pool import GrowError
from slofleet.sidecar.vllm_ext.internals import WRITTEN_AGAINST, require
from slofleet.sidecar.vllm_ext.pipeline_scheduler import PipelineOpError


class Runner:
    kv_caches: list[int] = [1]


def test_present_internal_is_returned() -> None:
    assert require(Runner(), "kv_caches", "GPUModelRunner", error=GrowError, feature="KV grow") == [1]


@pytest.mark.parametrize("error", [GrowError, PipelineOpError])
def test_missing_internal_names_itself_and_the_version(error: type[Exception]) -> None:
    with pytest.raises(error) as failed:
        require(Runner(), "_kernel_block_sizes", "GPUModelRunner", error=error, feature="KV grow")
    message = str(failed.value)
    assert "GPUModelRunner._kernel_block_sizes" in message
    assert WRITTEN_AGAINST in message and "KV grow" in message
