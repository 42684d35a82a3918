"""The host buffer that carries one migrating request's KV blocks between the engine and its sidecar.

A segment is one file in a tmpfs (`/dev/shm`, an `emptyDir` with `medium: Memory` in a pod): the
engine's KV connector maps it and copies whole KV blocks in or out, the sidecar maps it and
streams block ranges to or from its peer. A file (not a socket) because both sides then copy each
byte once, and a sparse file because a segment is sized for the request's longest possible length
while only the blocks written so far take memory.

Layout: a fixed header region (magic, JSON length, JSON), then block `i` at
`HEADER_BYTES + i * block_bytes`, each block holding every layer's slice of that block in layer
order. This module imports neither vLLM nor torch: the sidecar runtime uses it as is, and the
connector wraps the same bytes in tensors.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAGIC = b"SLFKV001"
# Room for the JSON header: layout plus the token ids of the blocks (about 6 bytes a token), so a
# 1 MiB header holds well over 100k tokens. The data starts page-aligned after it.
HEADER_BYTES = 1 << 20
_PREFIX = struct.Struct("<8sQ")


class SegmentError(RuntimeError):
    """A segment is missing, malformed, or does not fit the engine that opens it."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What a KV block is on one engine: both ends of a migration must agree on all of it."""

    block_size: int
    dtype: str
    layer_names: tuple[str, ...]
    # Shape of one block of one layer (e.g. [2, 128, 256] for K/V x tokens x kv_heads*head_dim).
    layer_block_shape: tuple[int, ...]
    layer_block_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def block_bytes(self) -> int:
        return self.layer_block_bytes * self.num_layers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KVLayout:
        return cls(
            block_size=int(data["block_size"]),
            dtype=str(data["dtype"]),
            layer_names=tuple(data["layer_names"]),
            layer_block_shape=tuple(int(x) for x in data["layer_block_shape"]),
            layer_block_bytes=int(data["layer_block_bytes"]),
        )

    def mismatch(self, other: KVLayout) -> str | None:
        """None if blocks of `other` can be loaded here, else which field differs and how."""
        for name in ("block_size", "dtype", "layer_names", "layer_block_shape", "layer_block_bytes"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layout field {name!r} differs: source {theirs!r}, destination {mine!r}"
        return None


def segment_size(layout: KVLayout, max_blocks: int) -> int:
    return HEADER_BYTES + layout.block_bytes * max_blocks


def create(path: str | Path, layout: KVLayout, max_blocks: int) -> None:
    """Create a sparse segment for up to `max_blocks` blocks (memory is taken only when written)."""
    if max_blocks <= 0:
        raise SegmentError(f"max_blocks must be > 0, got {max_blocks}")
    with open(path, "wb") as f:
        f.truncate(segment_size(layout, max_blocks))
    write_header(
        path, {"layout": layout.to_json(), "max_blocks": max_blocks, "valid_blocks": 0, "token_ids": []}
    )


def write_header(path: str | Path, header: dict[str, Any]) -> None:
    payload = json.dumps(header, separators=(",", ":")).encode()
    if len(payload) + _PREFIX.size > HEADER_BYTES:
        raise SegmentError(f"segment header of {len(payload)} bytes exceeds {HEADER_BYTES}")
    with open(path, "r+b") as f:
        f.write(_PREFIX.pack(MAGIC, len(payload)))
        f.write(payload)


def read_header(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            magic, length = _PREFIX.unpack(f.read(_PREFIX.size))
            if magic != MAGIC:
                raise SegmentError(f"{path} is not a KV segment (magic {magic!r})")
            header: dict[str, Any] = json.loads(f.read(length))
            return header
    except FileNotFoundError as e:
        raise SegmentError(f"KV segment {path} does not exist") from e


def block_offset(layout: KVLayout, index: int) -> int:
    return HEADER_BYTES + index * layout.block_bytes


def read_blocks(path: str | Path, layout: KVLayout, first: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block_offset(layout, first))
        data = f.read(count * layout.block_bytes)
    if len(data) != count * layout.block_bytes:
        raise SegmentError(f"{path}: blocks {first}..{first + count} are beyond the segment")
    return data


def write_blocks(path: str | Path, layout: KVLayout, first: int, data: bytes | memoryview) -> None:
    if len(data) % layout.block_bytes:
        raise SegmentError(f"{len(data)} bytes is not a whole number of {layout.block_bytes}-byte blocks")
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if block_offset(layout, first) + len(data) > size:
            raise SegmentError(f"{path}: write of blocks from {first} overruns the segment")
        f.seek(block_offset(layout, first))
        f.write(data)


def map_segment(path: str | Path, writable: bool) -> mmap.mmap:
    """Map the whole segment (the connector wraps it in a tensor; the caller closes it)."""
    with open(path, "r+b" if writable else "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)


def remove(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
