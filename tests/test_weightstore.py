"""The host weight store: layout, atomic publish, digest checks, several processes at once."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from slofleet.sidecar.weightstore import (
    ALIGN_BYTES,
    StoreError,
    TensorEntry,
    WeightStore,
    layout,
    signature_of,
)


def _tensors(sizes: list[int]) -> list[TensorEntry]:
    return [TensorEntry(f"t{i}", "bfloat16", (n // 2,), "param", 0, n) for i, n in enumerate(sizes)]


def _write(store: WeightStore, unit: str, sizes: list[int], model: str = "m1", fill: int = 7) -> None:
    w = store.writer(unit, model=model, tensors=_tensors(sizes), writer="test")
    for t in w.entry.tensors:
        w.pad_to(t.offset)
        w.write(bytes([fill]) * t.nbytes)
    w.commit()


def test_layout_aligns_every_tensor() -> None:
    placed, size = layout(_tensors([10, 130, 2]))
    assert [t.offset for t in placed] == [0, 64, 256]
    assert all(t.offset % ALIGN_BYTES == 0 for t in placed) and size == 258


def test_write_read_and_manifest_survive_a_new_store_object(tmp_path: Path) -> None:
    _write(WeightStore(tmp_path), "layer.0", [10, 130])
    again = WeightStore(tmp_path)  # e.g. a restarted sidecar
    entry = again.get("layer.0")
    assert entry is not None and entry.nbytes == 194 and entry.model == "m1" and entry.writer == "test"
    data = again.read_bytes(entry)
    assert data[:10] == b"\x07" * 10 and data[10:64] == bytes(54) and again.verify(entry)
    assert again.total_bytes() == 194
    assert again.matching("layer.0", "m1") == entry
    assert again.matching("layer.0", "m2") is None  # another model's bytes are never used
    assert again.matching("layer.0", "m1", signature="other") is None
    assert b"".join(again.iter_chunks(entry, 50)) == bytes(data)


def test_an_incomplete_or_altered_copy_is_never_published(tmp_path: Path) -> None:
    src, dst = WeightStore(tmp_path / "a"), WeightStore(tmp_path / "b")
    _write(src, "layer.3", [100])
    entry = src.get("layer.3")
    assert entry is not None
    short = dst.copy_writer(entry)
    short.write(b"\x07" * 99)
    with pytest.raises(StoreError, match="incomplete"):
        short.commit()
    altered = dst.copy_writer(entry)
    altered.write(b"\x08" * 100)
    with pytest.raises(StoreError, match="digest"):
        altered.commit()
    assert dst.manifest() == {} and list(dst.root.iterdir()) == []  # no temp file left behind
    good = dst.copy_writer(entry, writer="peer x")
    for chunk in src.iter_chunks(entry, 33):
        good.write(chunk)
    copied = good.commit()
    assert copied.digest == entry.digest and copied.signature == entry.signature


def test_delete_and_bad_names(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    _write(store, "embed", [8])
    assert store.delete("embed") and not store.delete("embed")
    assert not (tmp_path / "embed.bin").exists()
    with pytest.raises(StoreError, match=r"unit: 'layer\.x'"):
        store.get("layer.x")
    with pytest.raises(StoreError, match="unit"):
        store.writer("../etc", model="m", tensors=[])


def test_a_reader_never_sees_a_torn_file(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    _write(store, "layer.1", [64], fill=1)
    entry = store.get("layer.1")
    assert entry is not None
    with open(tmp_path / entry.file, "rb") as old:  # a reader holding the old version open
        _write(store, "layer.1", [64], fill=2)
        assert old.read() == b"\x01" * 64
    new = store.get("layer.1")
    assert new is not None and store.read_bytes(new) == b"\x02" * 64 and new.digest != entry.digest


def test_signature_ignores_offsets_and_order() -> None:
    a = _tensors([10, 20])
    assert signature_of(a) == signature_of(reversed(layout(a)[0]))
    assert signature_of(a) != signature_of(_tensors([10, 22]))


def test_a_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match="delete the store directory"):
        WeightStore(tmp_path).manifest()
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(StoreError, match="format 99"):
        WeightStore(tmp_path).manifest()


def _writer_process(root: str, start: int) -> None:
    store = WeightStore(root)
    for i in range(start, start + 20):
        _write(store, f"layer.{i}", [256], fill=i % 250)


def test_two_processes_write_at_once_and_every_unit_lands(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), s)) for s in (0, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = WeightStore(tmp_path)
    manifest = store.manifest()
    assert sorted(manifest) == sorted(f"layer.{i}" for i in range(40))
    assert all(store.verify(e) for e in manifest.values())
