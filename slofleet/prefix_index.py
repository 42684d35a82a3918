"""Which prompt prefixes each instance has recently seen, in blocks (pure, bounded memory).

vLLM's prefix cache matches whole blocks of a prompt, each identified by a hash chained over the
blocks before it. The gateway keeps the same kind of chain for the prompts it sent to each
instance, so dispatch can tell how many leading blocks of a new prompt are probably cached where.
It is a hint, not the engine's truth (the engine evicts on its own), so each instance keeps only
its most recent `capacity_blocks` hashes.

The units are whatever the caller has before dispatch: token ids when it knows them, or
characters of the prompt text (a block is then `chars_per_block` characters, about a block of
tokens), which costs no tokenizer round trip on the request path.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def block_hashes(units: str | Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `units` (a trailing partial block is not cacheable)."""
    out: list[bytes] = []
    prev = b""
    for start in range(0, len(units) - block_size + 1, block_size):
        chunk = units[start : start + block_size]
        data = chunk.encode() if isinstance(chunk, str) else b",".join(str(u).encode() for u in chunk)
        prev = hashlib.blake2b(prev + data, digest_size=12).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """Per instance, an LRU set of block hashes; lookups count leading blocks in common."""

    def __init__(self, capacity_blocks: int = 65536) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._by_instance: dict[str, OrderedDict[bytes, None]] = {}

    def record(self, instance_id: str, hashes: Iterable[bytes]) -> None:
        seen = self._by_instance.setdefault(instance_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity_blocks:
            seen.popitem(last=False)

    def hits(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """instance_id -> number of leading blocks of `hashes` recorded there (0s omitted)."""
        result: dict[str, int] = {}
        for instance_id, seen in self._by_instance.items():
            n = 0
            for h in hashes:
                if h not in seen:
                    break
                n += 1
            if n:
                result[instance_id] = n
        return result

    def forget(self, instance_id: str) -> None:
        """Drop an instance (it restarted or left: its cache is gone)."""
        self._by_instance.pop(instance_id, None)

    def size(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, ()))
