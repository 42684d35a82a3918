"""Request validation of the Memory service (the engine-free part; the engine tests run the rest)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slofleet.sidecar.memory.service import CommandError, resolve_drop_layers, resolve_restore_layers


def refused(fn, *args) -> CommandError:  # type: ignore[no-untyped-def]
    with pytest.raises(CommandError) as err:
        fn(*args)
    return err.value


def test_drop_requests_name_their_faulty_field() -> None:
    e = refused(resolve_drop_layers, [8], 0.0, 8, [])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith("layers: [8] do not exist")
    e = refused(resolve_drop_layers, [], 0.0, 8, [])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith("layers:")
    e = refused(resolve_drop_layers, [1], 0.5, 8, [])
    assert e.message.startswith("layers, fraction:")
    e = refused(resolve_drop_layers, [], 1.5, 8, [])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith("fraction:")
    e = refused(resolve_drop_layers, [2, 2], 0.0, 8, [])
    assert "twice" in e.message
    e = refused(resolve_drop_layers, [3, 4], 0.0, 8, [4])
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.message.startswith(
        "layers: [4] already dropped"
    )


def test_restore_requests_name_their_faulty_field() -> None:
    e = refused(resolve_restore_layers, [], 8, [])
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to restore" in e.message
    e = refused(resolve_restore_layers, [9], 8, [1])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith("layers: [9]")
    e = refused(resolve_restore_layers, [2], 8, [1])
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.message.startswith(
        "layers: [2] are not dropped"
    )
    assert resolve_restore_layers([], 8, [5, 1]) == [1, 5]
    assert resolve_restore_layers([5], 8, [5, 1]) == [5]


@given(st.integers(1, 80), st.floats(0.001, 1.0))
def test_a_fraction_drops_a_suffix_and_keeps_a_contiguous_prefix(total: int, fraction: float) -> None:
    layers = resolve_drop_layers([], fraction, total, [])
    assert layers == list(range(total - len(layers), total))
    assert 1 <= len(layers) <= total and abs(len(layers) - fraction * total) <= max(1, 0.5 + 1e-9)
