"""Growing a serving vLLM engine's KV cache with requests in flight (issue 10, item 2's building
block), on the real CPU engine: no mocks.

The engine is started the project's way (`python -m vllm.entrypoints.openai.api_server`, dev mode,
the worker extension) plus slofleet's `--scheduler-cls` and its control socket, with a KV cache of
4 blocks (`--num-gpu-blocks-override`; block 0 is vLLM's null block, so 3 are usable). Every
request is a short prompt plus 480 greedy tokens inside one block, so exactly 3 run and the rest
wait for KV. Growing to 64 blocks while 3 run and 3 wait must let all 6 run at once and give each
the same tokens as when it ran alone.

Blocks are 512 tokens (`--block-size 512`; CPU default 128) only to make a request long enough
(480 decode steps) that the "3 running, 3 waiting" state outlasts the test's reaction time on a
busy 2-core box; the grow code does not depend on the block size.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, start_vllm

from slofleet.sidecar.memory.kv_grow import KvGrowError, grow_kv, scheduler_command

pytestmark = pytest.mark.engine

SCHEDULER_CLS = "slofleet.sidecar.vllm_ext.scheduler.SlofleetScheduler"
START_BLOCKS = 4  # 3 usable: block 0 is vLLM's null block
GROWN_BLOCKS = 64
BLOCK_TOKENS = 512
MAX_TOKENS = 480
PROMPTS = [
    "the cluster answers the request",
    "memory cache layer batch",
    "python function return value",
    "kubernetes pod deployment replica",
    "decode prefill stream throughput",
    "hello world user system assistant",
]


@pytest.fixture(scope="module")
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="slofleet-kvgrow-") as d:
        yield str(Path(d) / "sched.sock")


@pytest.fixture(scope="module")
def engine(tiny_model: Path, socket_path: str) -> Iterator[VllmServer]:
    args = (
        *PROJECT_ENGINE_ARGS,
        "--scheduler-cls",
        SCHEDULER_CLS,
        "--num-gpu-blocks-override",
        str(START_BLOCKS),
        "--block-size",
        str(BLOCK_TOKENS),
    )
    server = start_vllm(
        tiny_model,
        extra_args=args,
        env={"SLOFLEET_SCHEDULER_SOCKET": socket_path},
        max_model_len=BLOCK_TOKENS,
    )
    try:
        yield server
    finally:
        server.stop()


async def _complete(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> dict[str, Any]:
    body = {
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True,
    }  # fmt: skip
    async with session.post(url + "/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        data = await resp.json(content_type=None)
    choice = data["choices"][0]
    prompt_ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    assert prompt_ids, f"no prompt_token_ids in {data}"
    return {"prompt_ids": list(prompt_ids), "ids": list(choice["token_ids"])}


async def _post(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.post(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(content_type=None)


async def _info(socket_path: str) -> dict[str, Any]:
    reply = await scheduler_command(socket_path, {"op": "info"})
    assert reply["ok"], reply
    return reply


async def _wait_for(socket_path: str, predicate: Any, within: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + within
    info = await _info(socket_path)
    while not predicate(info):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {within} s; last scheduler info {info}")
        await asyncio.sleep(0.002)
        info = await _info(socket_path)
    return info


@pytest.fixture(scope="module")
async def references(engine: VllmServer) -> list[list[int]]:
    """Each prompt's greedy tokens when it runs alone on the (small) engine."""
    out = []
    async with aiohttp.ClientSession() as session:
        for prompt in PROMPTS:
            result = await _complete(session, engine.url, engine.model, prompt)
            assert len(result["prompt_ids"]) + MAX_TOKENS < BLOCK_TOKENS, "a request must fit one block"
            out.append(result["ids"])
    return out


async def test_grow_admits_waiting_requests_and_keeps_every_output(
    engine: VllmServer, socket_path: str, references: list[list[int]]
) -> None:
    info = await _info(socket_path)
    assert (info["num_blocks"], info["running"], info["waiting"]) == (START_BLOCKS, 0, 0), info

    async with aiohttp.ClientSession() as session:
        # Queue all six while paused, so they arrive together however slow the API server is.
        await _post(session, engine.url + "/pause?mode=keep&clear_cache=false")
        tasks = [asyncio.create_task(_complete(session, engine.url, engine.model, p)) for p in PROMPTS]
        try:
            await _wait_for(socket_path, lambda i: i["waiting"] == 6, 60, "6 queued requests")
            # KV for 3: the first step admits three and the rest wait. Freeze that state (keep:
            # nothing runs, nothing is lost).
            await _post(session, engine.url + "/resume")
            await _wait_for(socket_path, lambda i: i["running"] == 3, 60, "3 running requests")
            await _post(session, engine.url + "/pause?mode=keep&clear_cache=false")
            before = await _info(socket_path)
            assert (before["running"], before["waiting"], before["free_blocks"]) == (3, 3, 0), (
                f"expected 3 running and 3 waiting for KV with no free block at the pause: {before}"
            )

            result = await grow_kv(engine.url, socket_path, GROWN_BLOCKS, pause=False)
            print(f"\nKV grow {START_BLOCKS} -> {GROWN_BLOCKS} blocks: {result}")
            assert (result.old_blocks, result.new_blocks) == (START_BLOCKS, GROWN_BLOCKS)
            assert (result.running, result.waiting) == (3, 3)
            assert result.new_bytes == result.old_bytes // START_BLOCKS * GROWN_BLOCKS
            assert result.copied_bytes == result.old_bytes, "every old block (all layers) is copied"

            grown = await _info(socket_path)
            assert grown["num_blocks"] == GROWN_BLOCKS
            assert grown["free_blocks"] == GROWN_BLOCKS - 1 - 3, grown
            assert (grown["running"], grown["waiting"]) == (3, 3), "nothing may run while paused"

            await _post(session, engine.url + "/resume")
            # The three waiting are admitted at the first step after the resume, while the first
            # three (paused with hundreds of tokens to go) still run: all six run together.
            after = await _wait_for(
                socket_path, lambda i: i["waiting"] == 0, 60, "the waiting requests admitted"
            )
            assert after["running"] == 6, f"the grown KV should hold all six at once: {after}"
            outputs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await _post(session, engine.url + "/resume")

    for i, (out, ref) in enumerate(zip(outputs, references, strict=True)):
        assert len(out["ids"]) == MAX_TOKENS
        assert out["ids"] == ref, f"request {i} ({PROMPTS[i]!r}) differs from its undisturbed run"

    # The workers agree with the scheduler about the new size.
    async with aiohttp.ClientSession() as session:
        body = {"method": "slofleet_kv_layout", "args": [], "timeout": 60}
        async with session.post(engine.url + "/collective_rpc", json=body) as resp:
            assert resp.status == 200, await resp.text()
            layout = (await resp.json())["results"][0]
    assert layout["num_blocks"] == GROWN_BLOCKS
    assert layout["allocated_bytes"] == result.new_bytes
    assert all(shape[0] == GROWN_BLOCKS for shape in layout["tensor_shapes"]), layout["tensor_shapes"]


async def test_grown_engine_serves_more_requests_at_once_with_the_same_tokens(
    engine: VllmServer, socket_path: str, references: list[list[int]]
) -> None:
    """Twelve at once (12 of the 63 usable blocks, most of them new) give the reference tokens."""
    async with aiohttp.ClientSession() as session:
        outputs = await asyncio.gather(
            *(_complete(session, engine.url, engine.model, PROMPTS[i % len(PROMPTS)]) for i in range(12))
        )
    for i, out in enumerate(outputs):
        assert out["ids"] == references[i % len(PROMPTS)], f"request {i} differs"
    assert (await _info(socket_path))["waiting"] == 0


async def test_scheduler_refuses_to_grow_an_engine_that_is_not_paused(socket_path: str) -> None:
    blocks = (await _info(socket_path))["num_blocks"]
    reply = await scheduler_command(socket_path, {"op": "grow", "num_blocks": blocks * 2})
    assert not reply["ok"] and "PAUSED_ALL" in reply["error"], reply
    assert (await _info(socket_path))["num_blocks"] == blocks


async def test_failed_grow_leaves_the_engine_serving(
    engine: VllmServer, socket_path: str, references: list[list[int]]
) -> None:
    """A missing socket fails before anything is paused; a worker refuses to shrink and the engine
    keeps serving the same tokens."""
    with pytest.raises(KvGrowError) as missing:
        await grow_kv(engine.url, socket_path + ".missing", 4096)
    assert missing.value.stage == "scheduler-info" and missing.value.resumed

    async with aiohttp.ClientSession() as session:
        body = {"method": "slofleet_grow_kv", "args": ["2"], "timeout": 60}
        async with session.post(engine.url + "/collective_rpc", json=body) as resp:
            refusal = (await resp.json())["results"][0]
        assert not refusal["ok"] and "not more than the current" in refusal["error"], refusal
        async with session.get(engine.url + "/is_paused") as resp:
            assert (await resp.json())["is_paused"] is False
        out = await _complete(session, engine.url, engine.model, PROMPTS[0])
    assert out["ids"] == references[0]
