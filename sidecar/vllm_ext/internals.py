"""The one way slofleet's engine-side code reads a vLLM internal (an attribute vLLM does not
promise to keep): by name, failing with the feature's own error that names the internal and the
vLLM version it was written against. So an upgrade that renames one fails loudly at the first
use instead of corrupting KV or state silently; vLLM is pinned in pyproject.toml for the same
reason.
"""

from __future__ import annotations

from typing import Any

WRITTEN_AGAINST = "vllm 0.32"


def require(obj: Any, attr: str, where: str, *, error: type[Exception], feature: str) -> Any:
    """`obj.attr`, or `error` saying that vLLM internal `where.attr` is missing."""
    if not hasattr(obj, attr):
        raise error(
            f"vLLM internal {where}.{attr} is missing (vLLM changed; slofleet's {feature} was written "
            f"against {WRITTEN_AGAINST})"
        )
    return getattr(obj, attr)
