"""From a validated body to a request the gateway can place: class, priority, size estimates."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from slofleet.gateway.config import ServiceDefaults
from slofleet.gateway.errors import ApiError
from slofleet.gateway.relay import RequestState
from slofleet.gateway.scheduler import Placement
from slofleet.gateway.validate import ParsedRequest
from slofleet.instance import RequestClass
from slofleet.prefix_index import block_hashes

CLASS_HEADER = "X-Slofleet-Class"
PRIORITY_HEADER = "X-Slofleet-Priority"
# vLLM's completions default when max_tokens is absent.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Prompt text -> tokens before the engine has tokenized it (only sizes a dispatch estimate).
CHARS_PER_TOKEN = 4
PRIORITY_RANGE = (-1_000_000, 1_000_000)


def new_request_id() -> str:
    return secrets.token_hex(12)


def classify(
    headers: Mapping[str, str], body: Mapping[str, object], defaults: ServiceDefaults
) -> tuple[RequestClass, int]:
    """Class from the header or the service default; priority from header, body, or class default."""
    raw_class = headers.get(CLASS_HEADER)
    if raw_class is None:
        cls = defaults.request_class
    else:
        try:
            cls = RequestClass(raw_class.strip().lower())
        except ValueError:
            raise ApiError(
                400,
                f"{CLASS_HEADER}: must be 'interactive' or 'batch', got {raw_class[:40]!r}",
                param=CLASS_HEADER,
            ) from None
    raw_prio = headers.get(PRIORITY_HEADER)
    if raw_prio is not None:
        try:
            prio = int(raw_prio)
        except ValueError:
            raise ApiError(
                400, f"{PRIORITY_HEADER}: must be an integer, got {raw_prio[:40]!r}", param=PRIORITY_HEADER
            ) from None
        if not PRIORITY_RANGE[0] <= prio <= PRIORITY_RANGE[1]:
            raise ApiError(400, f"{PRIORITY_HEADER}: must be within {PRIORITY_RANGE}", param=PRIORITY_HEADER)
        return cls, prio
    body_prio = body.get("priority")
    if isinstance(body_prio, int) and not isinstance(body_prio, bool):
        return cls, body_prio
    return cls, defaults.batch_priority if cls is RequestClass.BATCH else defaults.interactive_priority


def new_state(
    request_id: str,
    parsed: ParsedRequest,
    request_class: RequestClass,
    priority: int,
    max_model_len: int,
    chars_per_block: int,
) -> RequestState:
    if parsed.prompt_ids is not None:
        prompt_tokens = len(parsed.prompt_ids)
    else:
        prompt_tokens = -(-len(parsed.prompt_key) // CHARS_PER_TOKEN)
    if parsed.max_tokens is not None:
        max_tokens = parsed.max_tokens
    elif parsed.kind == "completions":
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    else:
        max_tokens = max(max_model_len - prompt_tokens, 1)
    placement = Placement(
        request_id=request_id,
        model=parsed.model,
        request_class=request_class,
        priority=priority,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        prefix_hashes=block_hashes(parsed.prompt_key, chars_per_block),
    )
    return RequestState(
        request_id=request_id,
        parsed=parsed,
        request_class=request_class,
        priority=priority,
        placement=placement,
    )
