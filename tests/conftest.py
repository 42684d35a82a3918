"""Shared fixtures for tests that need a real engine (the launcher itself is tests/enginectl.py).

- `tiny_model` (session): path of the cached ~0.4 M-parameter tiny Llama (made once, no download).
- `vllm_server` (session): one vLLM CPU server on that model with the project's engine flags
  (`PROJECT_ENGINE_ARGS`: the worker extension; the general plugin loads by itself). Shared by all
  tests of the session that ask for it; tests must leave it idle and un-paused when they finish.
- `start_vllm` (function): the launcher, for tests that need their own server (e.g. to stop it);
  servers it started are stopped at the end of the test even if the test forgets.

A vLLM server takes 30-50 s of CPU and ~3.4 GB: prefer `vllm_server`, keep at most two alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from enginectl import PROJECT_ENGINE_ARGS, VllmServer
from enginectl import start_vllm as _start_vllm


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from slofleet.tinymodel import ensure_tiny_model

    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path) -> Iterator[VllmServer]:
    server = _start_vllm(tiny_model, extra_args=PROJECT_ENGINE_ARGS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_vllm() -> Iterator[Callable[..., VllmServer]]:
    started: list[VllmServer] = []

    def start(*args: Any, **kwargs: Any) -> VllmServer:
        server = _start_vllm(*args, **kwargs)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
