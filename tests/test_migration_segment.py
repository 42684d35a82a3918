"""The shared-memory segment format that carries KV blocks between an engine and its sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest

from slofleet.sidecar.migration import segment as seg

LAYOUT = seg.KVLayout(128, "torch.bfloat16", ("l0", "l1"), (2, 128, 64), 32768)


def test_blocks_and_header_round_trip_and_the_file_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "s"
    seg.create(path, LAYOUT, max_blocks=1000)
    assert path.stat().st_size == seg.HEADER_BYTES + 1000 * LAYOUT.block_bytes
    assert path.stat().st_blocks * 512 < 4 * seg.HEADER_BYTES  # 65 MB apparent, nothing written yet
    data = bytes(range(256)) * (2 * LAYOUT.block_bytes // 256)
    seg.write_blocks(path, LAYOUT, 5, data)
    assert seg.read_blocks(path, LAYOUT, 5, 2) == data
    assert seg.read_blocks(path, LAYOUT, 6, 1) == data[LAYOUT.block_bytes :]
    header = seg.read_header(path)
    assert seg.KVLayout.from_json(header["layout"]) == LAYOUT and header["valid_blocks"] == 0
    header.update(valid_blocks=7, token_ids=list(range(7 * 128)))
    seg.write_header(path, header)
    assert seg.read_header(path)["token_ids"][-1] == 7 * 128 - 1


def test_bad_writes_and_foreign_layouts_are_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "s"
    seg.create(path, LAYOUT, max_blocks=2)
    with pytest.raises(seg.SegmentError, match="whole number"):
        seg.write_blocks(path, LAYOUT, 0, b"x" * 10)
    with pytest.raises(seg.SegmentError, match="overruns"):
        seg.write_blocks(path, LAYOUT, 2, b"x" * LAYOUT.block_bytes)
    with pytest.raises(seg.SegmentError, match="does not exist"):
        seg.read_header(tmp_path / "missing")
    other = seg.KVLayout(128, "torch.float32", ("l0", "l1"), (2, 128, 64), 65536)
    assert "dtype" in (LAYOUT.mismatch(other) or "")
    assert LAYOUT.mismatch(LAYOUT) is None
