"""Core placement of local engines: each engine its own share, shares handed back and reused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slofleet.local.cpus import CpuPlacer, bind_value, cpu_groups


@given(st.sets(st.integers(0, 127), min_size=1, max_size=64), st.integers(1, 16))
def test_groups_cover_every_core_once_in_balanced_contiguous_runs(cpus: set[int], slots: int) -> None:
    groups = cpu_groups(sorted(cpus), slots)
    assert len(groups) == min(slots, len(cpus))
    assert [c for g in groups for c in g] == sorted(cpus)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_two_engines_on_two_cores_get_one_core_each_and_a_replacement_reuses_the_freed_one() -> None:
    placer = CpuPlacer([0, 1], slots=2)
    assert placer.assign("a") == "0"
    assert placer.assign("b") == "1"
    placer.release("a")
    assert placer.assign("c") == "0"
    # More instances than cores share, least used first.
    assert placer.assign("d") == "0"
    assert placer.assign("e") == "1"


def test_sixteen_cores_four_instances_and_vllm_list_syntax() -> None:
    placer = CpuPlacer(range(16), slots=4)
    assert [placer.assign(str(i)) for i in range(4)] == [
        "0,1,2,3", "4,5,6,7", "8,9,10,11", "12,13,14,15",
    ]  # fmt: skip
    assert bind_value((5, 2, 3)) == "5,2,3"


def test_the_format_is_what_vllm_parses() -> None:
    from vllm.utils import cpu_resource_utils as cr_utils

    assert cr_utils.parse_id_list(bind_value(cpu_groups([0, 1, 2, 5, 6], 2)[1])) == [5, 6]


def test_no_cpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="no CPU"):
        cpu_groups([], 2)
