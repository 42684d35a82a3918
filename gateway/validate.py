"""Checks of OpenAI request bodies before anything reaches an engine.

Every rejection names the field (`param`) and says what would be accepted, so a client can fix the
request without reading engine logs. Fields the gateway does not know pass through to vLLM, which
validates its own extensions. Features whose output cannot be carried across an instance (several
choices, echo) are refused here rather than half-supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from slofleet.gateway.errors import ApiError, invalid

Kind = Literal["completions", "chat"]
ROUTES: dict[str, Kind] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


@dataclass(slots=True)
class ParsedRequest:
    kind: Kind
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    return_token_ids: bool
    max_tokens: int | None
    prompt_ids: list[int] | None
    # Prompt as text (for the prefix index and the prompt-size estimate before tokenization).
    prompt_key: str


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body: not valid JSON ({exc})", param="body", code="invalid_json") from exc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _opt_int(body: Mapping[str, Any], name: str, lo: int, hi: int, prefix: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(prefix + name, f"must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise invalid(prefix + name, f"must be between {lo} and {hi}, got {v}")
    return int(v)


def _opt_num(body: Mapping[str, Any], name: str, lo: float, hi: float, prefix: str) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_num(v):
        raise invalid(prefix + name, f"must be a number, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise invalid(prefix + name, f"must be between {lo} and {hi}, got {v}")


def _opt_bool(body: Mapping[str, Any], name: str, prefix: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(prefix + name, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(t) and t >= 0 for t in v)


def _prompt(body: Mapping[str, Any], max_model_len: int, prefix: str) -> tuple[list[int] | None, str]:
    if "prompt" not in body or body["prompt"] is None:
        raise invalid(prefix + "prompt", "is required (a string or a list of token ids)", "missing_field")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if isinstance(p, str):
        return None, p
    if _token_list(p):
        if not p:
            raise invalid(prefix + "prompt", "must not be empty")
        if len(p) >= max_model_len:
            raise invalid(prefix + "prompt", f"has {len(p)} tokens; the model's context is {max_model_len}")
        return list(p), " ".join(map(str, p))
    raise invalid(
        prefix + "prompt",
        "must be a string or a list of non-negative token ids (one prompt per request)",
    )


def _messages(body: Mapping[str, Any], prefix: str) -> str:
    msgs = body.get("messages")
    if msgs is None:
        raise invalid(prefix + "messages", "is required (a list of {role, content} objects)", "missing_field")
    if not isinstance(msgs, list) or not msgs:
        raise invalid(prefix + "messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(msgs):
        where = f"{prefix}messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise invalid(
                f"{where}.role", f"must be one of {sorted(CHAT_ROLES)}, got {json.dumps(role)[:40]}"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"{where}.content", "must be a string or a list of content parts")
    return json.dumps(msgs, separators=(",", ":"), ensure_ascii=False)


def parse_request(kind: Kind, body: Any, models: Mapping[str, int], prefix: str = "") -> ParsedRequest:
    """Validate a completions/chat body; `models` maps served model names to their context length.

    `prefix` names where the body sits (e.g. "line 3: body.") for batch input files.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"{prefix or 'body'}: must be a JSON object", param=prefix.rstrip(".") or "body")
    model = body.get("model")
    if model is None:
        raise invalid(prefix + "model", f"is required; served models: {sorted(models)}", "missing_field")
    if not isinstance(model, str):
        raise invalid(prefix + "model", "must be a string")
    if model not in models:
        raise ApiError(
            404,
            f"{prefix}model: '{model[:100]}' is not served here; served models: {sorted(models)}",
            param=prefix + "model",
            code="model_not_found",
        )
    max_len = models[model]
    if kind == "completions":
        prompt_ids, prompt_key = _prompt(body, max_len, prefix)
        max_tokens = _opt_int(body, "max_tokens", 1, max_len, prefix)
        if _opt_bool(body, "echo", prefix):
            raise invalid(prefix + "echo", "is not supported by the gateway (streams must be resumable)")
        _opt_int(body, "logprobs", 0, 20, prefix)
        if body.get("best_of") not in (None, 1):
            raise invalid(prefix + "best_of", "only 1 is supported")
    else:
        prompt_ids = None
        prompt_key = _messages(body, prefix)
        max_tokens = _opt_int(body, "max_completion_tokens", 1, max_len, prefix)
        legacy = _opt_int(body, "max_tokens", 1, max_len, prefix)
        max_tokens = max_tokens if max_tokens is not None else legacy
        _opt_bool(body, "logprobs", prefix)
        _opt_int(body, "top_logprobs", 0, 20, prefix)
    if body.get("n") not in (None, 1):
        raise invalid(prefix + "n", "only 1 choice per request is supported")
    stream = _opt_bool(body, "stream", prefix)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid(prefix + "stream_options", 'must be an object like {"include_usage": true}')
        include_usage = _opt_bool(opts, "include_usage", prefix + "stream_options.")
    _opt_num(body, "temperature", 0.0, 2.0, prefix)
    _opt_num(body, "top_p", 0.0, 1.0, prefix)
    _opt_num(body, "presence_penalty", -2.0, 2.0, prefix)
    _opt_num(body, "frequency_penalty", -2.0, 2.0, prefix)
    _opt_int(body, "seed", -(2**63), 2**63 - 1, prefix)
    _opt_int(body, "priority", -(2**31), 2**31 - 1, prefix)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise invalid(prefix + "stop", "must be a string or a list of strings")
    return ParsedRequest(
        kind=kind,
        body=body,
        model=model,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_opt_bool(body, "return_token_ids", prefix),
        max_tokens=max_tokens,
        prompt_ids=prompt_ids,
        prompt_key=prompt_key,
    )
