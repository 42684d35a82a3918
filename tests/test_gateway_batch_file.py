"""Batch input files are split into lines the way JSONL defines them."""

from __future__ import annotations

import json

import pytest

from slofleet.gateway.batch import validate_batch_file
from slofleet.gateway.errors import ApiError

MODELS = {"tiny": 2048}


def _line(cid: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body},
                      ensure_ascii=False)  # fmt: skip


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_breaks_inside_a_string_stay_in_their_line(sep: str) -> None:
    """Raw in a JSON string (valid JSON, e.g. text a model wrote; the control characters that
    str.splitlines also breaks at must be escaped in JSON) they are not line ends."""
    text = _line("a", f"one{sep}two") + "\n" + _line("b", "three") + "\n"
    lines = validate_batch_file(text.encode(), MODELS)
    assert [ln["custom_id"] for ln in lines] == ["a", "b"]
    assert lines[0]["body"]["prompt"] == f"one{sep}two"


def test_crlf_files_and_blank_lines_keep_their_line_numbers() -> None:
    text = _line("a", "x") + "\r\n\r\n" + _line("b", "y") + "\r\n"
    assert [(ln["line"], ln["custom_id"]) for ln in validate_batch_file(text.encode(), MODELS)] == [
        (1, "a"),
        (3, "b"),
    ]
    bad = _line("a", "x") + "\r\n{not json\r\n"
    with pytest.raises(ApiError) as exc:
        validate_batch_file(bad.encode(), MODELS)
    assert "line 2" in exc.value.message
