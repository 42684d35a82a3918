"""The host weight store: dropped layers' weights as files in the pod's shared memory (/dev/shm).

Why files in /dev/shm and not a Python object: the engine's worker process writes a layer when it
drops it and reads it back when it restores, while the sidecar (another container of the pod,
sharing the same /dev/shm) serves the same bytes to peers and writes layers fetched from peers.
Either process can restart without losing the store, because the store is just a directory:

    <root>/manifest.json     what is stored: one entry per unit (JSON, replaced atomically)
    <root>/<unit>.bin        the unit's tensors, concatenated, each at a 64-byte aligned offset
    <root>/.lock             flock() taken around every manifest update

A *unit* is what drops and restores as a whole: `layer.<i>` (one decoder layer), `embed`, `head`.
Each entry records the tensors (name, dtype, shape, byte range, and how the engine rebuilds it),
a `model` fingerprint (which checkpoint the bytes came from), a `signature` (the unit's tensor
names/dtypes/shapes) and a BLAKE2b `digest` of the file, so a restore never loads bytes of another
model or a torn copy. This module is plain Python (no torch, no vLLM) so the sidecar can use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
ALIGN_BYTES = 64
DEFAULT_CHUNK_BYTES = 1 << 20
# The default root; the sidecar passes its own (one directory per instance) to the engine.
DEFAULT_ROOT = "/dev/shm/slofleet-weights"
_UNIT_RE = re.compile(r"^(layer\.\d+|embed|head)$")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message names the unit and the reason."""


def validate_unit(unit: str) -> str:
    if not _UNIT_RE.match(unit):
        raise StoreError(f"unit: {unit!r} is not a weight unit; use 'layer.<index>', 'embed' or 'head'")
    return unit


def layer_unit(index: int) -> str:
    return f"layer.{index}"


def aligned(offset: int) -> int:
    return (offset + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a unit. `kind` tells the engine how to rebuild it on restore
    (e.g. a plain parameter, or a linear weight that must be re-packed for the CPU GEMM)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    offset: int = 0
    nbytes: int = 0


def signature_of(tensors: Iterable[TensorEntry]) -> str:
    """A digest of the unit's structure (names, dtypes, shapes, kinds), not of its bytes."""
    items = sorted((t.name, t.dtype, list(t.shape), t.kind) for t in tensors)
    return hashlib.blake2b(json.dumps(items).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class UnitEntry:
    unit: str
    file: str
    nbytes: int
    digest: str
    model: str
    signature: str
    tensors: tuple[TensorEntry, ...]
    written_unix: float = 0.0
    writer: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tensors"] = [asdict(t) for t in self.tensors]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitEntry:
        tensors = tuple(
            TensorEntry(
                name=str(t["name"]),
                dtype=str(t["dtype"]),
                shape=tuple(int(d) for d in t["shape"]),
                kind=str(t["kind"]),
                offset=int(t["offset"]),
                nbytes=int(t["nbytes"]),
            )
            for t in data["tensors"]
        )
        return cls(
            unit=validate_unit(str(data["unit"])),
            file=str(data["file"]),
            nbytes=int(data["nbytes"]),
            digest=str(data["digest"]),
            model=str(data["model"]),
            signature=str(data["signature"]),
            tensors=tensors,
            written_unix=float(data.get("written_unix", 0.0)),
            writer=str(data.get("writer", "")),
        )


def layout(tensors: Iterable[TensorEntry]) -> tuple[tuple[TensorEntry, ...], int]:
    """Place tensors (with `nbytes` set) at aligned offsets; returns the placed entries and the
    file size."""
    placed = []
    offset = 0
    for t in tensors:
        offset = aligned(offset)
        placed.append(TensorEntry(t.name, t.dtype, tuple(t.shape), t.kind, offset, t.nbytes))
        offset += t.nbytes
    return tuple(placed), offset


@dataclass
class UnitWriter:
    """Streams one unit into the store: `write()` chunks in order, then `commit()` checks the
    size and digest and publishes it (until then, readers see the previous version, if any)."""

    store: WeightStore
    entry: UnitEntry
    _tmp: Path = field(init=False)
    _fh: Any = field(init=False)
    _hash: Any = field(init=False)
    _written: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._tmp = self.store.root / f".{self.entry.file}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self._fh = open(self._tmp, "wb")
        self._hash = hashlib.blake2b(digest_size=16)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self._written += len(data)

    def pad_to(self, offset: int) -> None:
        if offset > self._written:
            self.write(bytes(offset - self._written))

    def commit(self) -> UnitEntry:
        self._fh.close()
        digest = self._hash.hexdigest()
        if self._written != self.entry.nbytes:
            self.abort()
            raise StoreError(
                f"unit {self.entry.unit}: got {self._written} bytes, the manifest entry says "
                f"{self.entry.nbytes}; the copy is incomplete"
            )
        if self.entry.digest and digest != self.entry.digest:
            self.abort()
            raise StoreError(f"unit {self.entry.unit}: digest {digest} != expected {self.entry.digest}")
        entry = UnitEntry(
            unit=self.entry.unit,
            file=self.entry.file,
            nbytes=self.entry.nbytes,
            digest=digest,
            model=self.entry.model,
            signature=self.entry.signature,
            tensors=self.entry.tensors,
            written_unix=time.time(),
            writer=self.entry.writer,
        )
        with self.store.locked():
            os.replace(self._tmp, self.store.root / entry.file)
            manifest = self.store._read_manifest()
            manifest[entry.unit] = entry
            self.store._write_manifest(manifest)
        return entry

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class WeightStore:
    """One instance's store directory. Safe to use from several processes at once."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def ensure(self) -> WeightStore:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_manifest(self) -> dict[str, UnitEntry]:
        path = self.root / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON ({e}); delete the store directory to reset it") from e
        if data.get("format") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: format {data.get('format')!r}, this code reads {FORMAT_VERSION}; "
                "delete the store directory to reset it"
            )
        return {unit: UnitEntry.from_json(e) for unit, e in data.get("units", {}).items()}

    def _write_manifest(self, manifest: dict[str, UnitEntry]) -> None:
        path = self.root / "manifest.json"
        tmp = self.root / f".manifest.json.tmp-{os.getpid()}"
        body = {"format": FORMAT_VERSION, "units": {u: e.to_json() for u, e in sorted(manifest.items())}}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, path)

    def manifest(self) -> dict[str, UnitEntry]:
        return self._read_manifest()

    def get(self, unit: str) -> UnitEntry | None:
        return self._read_manifest().get(validate_unit(unit))

    def matching(self, unit: str, model: str, signature: str | None = None) -> UnitEntry | None:
        """The stored entry for `unit` if it holds this model's bytes (and structure), else None."""
        entry = self.get(unit)
        if entry is None or entry.model != model:
            return None
        if signature is not None and entry.signature != signature:
            return None
        if not (self.root / entry.file).exists():
            return None
        return entry

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._read_manifest().values())

    def writer(
        self, unit: str, *, model: str, tensors: Iterable[TensorEntry], digest: str = "", writer: str = ""
    ) -> UnitWriter:
        """Start writing `unit`: `tensors` need name/dtype/shape/kind/nbytes; offsets are assigned
        here (or kept, when `digest` is given: a copy of a peer's entry must stay byte-identical)."""
        validate_unit(unit)
        self.ensure()
        tensors = tuple(tensors)
        if digest:
            placed, size = tensors, max((t.offset + t.nbytes for t in tensors), default=0)
        else:
            placed, size = layout(tensors)
        entry = UnitEntry(
            unit=unit,
            file=f"{unit}.bin",
            nbytes=size,
            digest=digest,
            model=model,
            signature=signature_of(placed),
            tensors=placed,
            writer=writer,
        )
        return UnitWriter(self, entry)

    def copy_writer(self, entry: UnitEntry, *, writer: str = "") -> UnitWriter:
        """Write a byte-identical copy of another store's `entry` (a peer's); commit() checks the
        digest, so a torn or altered transfer is never published."""
        w = self.writer(
            entry.unit, model=entry.model, tensors=entry.tensors, digest=entry.digest, writer=writer
        )
        if w.entry.nbytes != entry.nbytes or w.entry.signature != entry.signature:
            w.abort()
            raise StoreError(f"unit {entry.unit}: the peer's manifest entry is inconsistent")
        return w

    def read_bytes(self, entry: UnitEntry) -> bytearray:
        """The unit's file in one buffer (the engine builds tensors on it without another copy)."""
        path = self.root / entry.file
        buf = bytearray(entry.nbytes)
        try:
            with open(path, "rb", buffering=0) as fh:
                n = fh.readinto(buf)
        except FileNotFoundError as e:
            raise StoreError(f"unit {entry.unit}: {path} is missing; the store was cleared") from e
        if n != entry.nbytes:
            raise StoreError(f"unit {entry.unit}: {path} has {n} bytes, the manifest says {entry.nbytes}")
        return buf

    def iter_chunks(self, entry: UnitEntry, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        path = self.root / entry.file
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(chunk_bytes):
                    yield chunk
        except FileNotFoundError as e:
            raise StoreError(f"unit {entry.unit}: {path} is missing; the store was cleared") from e

    def verify(self, entry: UnitEntry) -> bool:
        h = hashlib.blake2b(digest_size=16)
        for chunk in self.iter_chunks(entry):
            h.update(chunk)
        return h.hexdigest() == entry.digest

    def delete(self, unit: str) -> bool:
        with self.locked():
            manifest = self._read_manifest()
            entry = manifest.pop(validate_unit(unit), None)
            if entry is None:
                return False
            with contextlib.suppress(FileNotFoundError):
                (self.root / entry.file).unlink()
            self._write_manifest(manifest)
        return True
