"""Two served engines merge into one leader/follower pipeline at runtime and split again (issue 10,
item 1), on real vLLM CPU engines: no mocks.

Both engines are started the project's way (`python -m vllm.entrypoints.openai.api_server`, dev
mode, the worker extension) plus slofleet's `--scheduler-cls` with a control socket each. The
tiny model has 2 layers: merged, the leader runs the embedding and layer 0, the follower layer 1,
the norm and lm_head, each with the other's weights dropped; requests go to the leader only.

`--enforce-eager`: pipeline steps always run eagerly (pipeline.py sets `do_not_compile`, because a
compiled model ignores the replaced forward), so with a compiled reference a bf16 near-tie can
flip one token (vllm-kunserve-facts.md, section 1). Eager engines make "identical token ids" an
exact check of the pipeline itself.

`--num-gpu-blocks-override 12`: a small KV cache (11 usable blocks of 128 tokens), so the batch of
`BIG` requests (2 blocks each) queues on one engine and shows the capacity the merge adds (issue
10 item 2); `PROMPTS` (8 blocks) and the long request (3) still run at once unmerged.
`--max-model-len 1024` because vLLM refuses a KV cache that cannot hold one max-length request.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, start_vllm

from slofleet.sidecar.enginemetrics import parse_engine_metrics
from slofleet.sidecar.memory.kv_grow import scheduler_command
from slofleet.sidecar.memory.pipeline import (
    PipelineMember,
    PipelineSwitchError,
    merge_pipeline,
    split_pipeline,
)

pytestmark = pytest.mark.engine

SCHEDULER_CLS = "slofleet.sidecar.vllm_ext.scheduler.SlofleetScheduler"
BLOCKS = 12
ENGINE_ARGS = (
    *PROJECT_ENGINE_ARGS, "--scheduler-cls", SCHEDULER_CLS, "--enforce-eager",
    "--num-gpu-blocks-override", str(BLOCKS), "--max-model-len", "1024",
)  # fmt: skip
# Different lengths, so requests finish at different steps and the follower must free them from
# outputs that carry only finished_req_ids.
PROMPTS: list[tuple[str, int]] = [
    ("the cluster answers the request", 48),
    ("memory cache layer batch", 96),
    ("python function return value", 17),
    ("kubernetes pod deployment replica " * 20, 64),  # ~100-token prompt: a longer prefill
    ("decode prefill stream throughput", 128),
    ("hello world user system assistant", 33),
]
LONG_TOKENS = 256  # one long greedy request, for the step time normal vs pipeline
# ~150-token prompts (distinct from the first token: no shared prefix blocks) + 40 tokens: 2 blocks
# each, 16 for the batch, more than one engine's 11 usable blocks.
BIG: list[tuple[str, int]] = [
    (f"{w} " + "kubernetes pod deployment replica " * 36, 40)
    for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
]


class Pair:
    def __init__(self, leader: VllmServer, follower: VllmServer, root: Path) -> None:
        self.leader, self.follower = leader, follower
        self.leader_member = PipelineMember(leader.url, str(root / "leader.sock"), str(root / "store-leader"))
        self.follower_member = PipelineMember(
            follower.url, str(root / "follower.sock"), str(root / "store-follower")
        )


@pytest.fixture(scope="module")
def pair(tiny_model: Path) -> Iterator[Pair]:
    with tempfile.TemporaryDirectory(prefix="slofleet-pipeline-") as d:
        root = Path(d)
        servers = [
            start_vllm(tiny_model, extra_args=ENGINE_ARGS, wait=False,
                       env={"SLOFLEET_SCHEDULER_SOCKET": str(root / f"{name}.sock")})
            for name in ("leader", "follower")
        ]  # fmt: skip
        try:
            for server in servers:
                server.wait_healthy()
            yield Pair(servers[0], servers[1], root)
        finally:
            for server in servers:
                server.stop()


async def _complete(
    session: aiohttp.ClientSession, server: VllmServer, prompt: str, max_tokens: int
) -> list[int]:
    body = {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    }  # fmt: skip
    async with session.post(server.url + "/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        data = await resp.json(content_type=None)
    ids = list(data["choices"][0]["token_ids"])
    assert len(ids) == max_tokens
    return ids


async def _all_at_once(server: VllmServer, prompts: list[tuple[str, int]] = PROMPTS) -> list[list[int]]:
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(_complete(session, server, p, n) for p, n in prompts)))


async def _one_by_one(server: VllmServer, prompts: list[tuple[str, int]] = PROMPTS) -> list[list[int]]:
    async with aiohttp.ClientSession() as session:
        return [await _complete(session, server, p, n) for p, n in prompts]


async def _timed_long(server: VllmServer) -> tuple[list[int], float]:
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        ids = await _complete(session, server, PROMPTS[0][0], LONG_TOKENS)
        return ids, time.perf_counter() - start


async def _rpc(server: VllmServer, method: str, *args: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        body = {"method": method, "args": list(args), "timeout": 60}
        async with session.post(server.url + "/collective_rpc", json=body) as resp:
            assert resp.status == 200, await resp.text()
            result = (await resp.json())["results"][0]
    assert isinstance(result, dict), result
    return result


async def _pipeline_info(member: PipelineMember) -> dict[str, Any]:
    reply = await scheduler_command(member.scheduler_socket, {"op": "info"})
    assert reply["ok"], reply
    return reply


@pytest.fixture(scope="module")
async def references(pair: Pair) -> dict[str, Any]:
    """Each prompt's greedy tokens on the normal (unmerged) engines, one at a time, and the time
    of one long request on the leader."""
    leader = await _one_by_one(pair.leader)
    follower = await _one_by_one(pair.follower)
    assert leader == follower, "two engines of one model must agree before any merge"
    long_ids, long_seconds = await _timed_long(pair.leader)
    return {"ids": leader, "long_ids": long_ids, "long_seconds": long_seconds}


async def _caught_up(pair: Pair) -> tuple[dict[str, Any], dict[str, Any]]:
    """The leader's and follower's scheduler info once the follower has replayed every output the
    leader published. The leader publishes the step that frees the last finished request after
    the client already has its answer, so right after the last answer the follower may be one
    replay behind (the split waits the same way, in its catch-up stage)."""
    deadline = time.monotonic() + 10.0
    while True:
        lead_info = await _pipeline_info(pair.leader_member)
        fol_info = await _pipeline_info(pair.follower_member)
        caught_up = fol_info["pipeline"]["completed"] == lead_info["pipeline"]["published"]
        if caught_up and not fol_info["pipeline"]["pending"]:
            return lead_info, fol_info
        assert time.monotonic() < deadline, ("the follower never caught up", lead_info, fol_info)
        await asyncio.sleep(0.01)


async def test_merged_pair_serves_the_reference_and_splits_back(
    pair: Pair, references: dict[str, Any]
) -> None:
    ref = references["ids"]
    merged = await merge_pipeline(pair.leader_member, pair.follower_member)
    print(f"\nmerge: {merged}")
    assert merged.leader_layers == (0, 1) and merged.follower_layers == (1, 2)
    assert merged.leader_units == ("layer.1", "head")
    assert merged.follower_units == ("embed", "layer.0")

    # The layers are really gone from each engine, and each worker is in its role.
    lead_mem = await _rpc(pair.leader, "slofleet_memory_status")
    fol_mem = await _rpc(pair.follower, "slofleet_memory_status")
    assert lead_mem["dropped"] == ["layer.1", "head"], lead_mem
    assert fol_mem["dropped"] == ["embed", "layer.0"], fol_mem
    lead_before = await _rpc(pair.leader, "slofleet_pipeline_status")
    fol_before = await _rpc(pair.follower, "slofleet_pipeline_status")
    assert (lead_before["role"], fol_before["role"]) == ("leader", "follower")
    assert lead_before["layers"] == [0, 1] and fol_before["layers"] == [1, 2]

    # All prompts at once to the leader: identical token ids to the unmerged engine.
    outputs = await _all_at_once(pair.leader)
    for i, (out, want) in enumerate(zip(outputs, ref, strict=True)):
        assert out == want, f"prompt {i} ({PROMPTS[i][0][:40]!r}) differs in the pipeline"
    long_ids, long_seconds = await _timed_long(pair.leader)
    assert long_ids == references["long_ids"]

    # The follower's worker really ran its layers, once per leader step, and its scheduler
    # replayed every output the leader published.
    lead_after = await _rpc(pair.leader, "slofleet_pipeline_status")
    fol_after = await _rpc(pair.follower, "slofleet_pipeline_status")
    steps = fol_after["steps"] - fol_before["steps"]
    assert steps >= max(n for _, n in PROMPTS) + LONG_TOKENS, fol_after
    assert fol_after["steps"] == lead_after["steps"]
    assert fol_after["layer_seconds"] > 0 and fol_after["received_bytes"] > 0 and fol_after["sent_bytes"] > 0
    lead_info, fol_info = await _caught_up(pair)
    assert lead_info["pipeline"]["role"] == "leader" and fol_info["pipeline"]["role"] == "follower"
    # The follower's own scheduler never held any of the leader's requests.
    assert (fol_info["running"], fol_info["waiting"]) == (0, 0)

    split = await split_pipeline(pair.leader_member, pair.follower_member)
    print(f"split: {split}")
    assert split.leader_units == ("layer.1", "head") and split.follower_units == ("embed", "layer.0")
    for server in (pair.leader, pair.follower):
        assert (await _rpc(server, "slofleet_memory_status"))["dropped"] == []
        assert (await _rpc(server, "slofleet_pipeline_status"))["role"] is None
        assert await _all_at_once(server) == ref, f"{server.url} after the split"
    normal_ids, normal_seconds = await _timed_long(pair.leader)
    assert normal_ids == references["long_ids"]
    print(
        f"one request x {LONG_TOKENS} tokens: normal {normal_seconds:.3f} s "
        f"({LONG_TOKENS / normal_seconds:.0f} tok/s; before the merge {references['long_seconds']:.3f} s), "
        f"pipeline {long_seconds:.3f} s ({LONG_TOKENS / long_seconds:.0f} tok/s); follower steps {steps}, "
        f"follower wait {fol_after['wait_seconds']:.3f} s, layers {fol_after['layer_seconds']:.3f} s; "
        f"leader wait {lead_after['wait_seconds']:.3f} s, published "
        f"{lead_info['pipeline']['published']} outputs ({lead_info['pipeline']['published_bytes']} B, "
        f"{lead_info['pipeline']['publish_seconds']:.3f} s)"
    )


async def test_failed_merge_rolls_back_and_both_serve_alone(pair: Pair, references: dict[str, Any]) -> None:
    """The follower's drop fails (its store path is a file): the leader's drop is undone and both
    engines resume serving the reference alone."""
    blocker = Path(pair.follower_member.store_dir + "-file")
    await asyncio.to_thread(blocker.write_text, "not a directory")
    bad = PipelineMember(pair.follower_member.url, pair.follower_member.scheduler_socket, str(blocker))
    with pytest.raises(PipelineSwitchError) as failed:
        await merge_pipeline(pair.leader_member, bad)
    assert failed.value.stage == "drop" and failed.value.paused == (), failed.value
    for server, member in ((pair.leader, pair.leader_member), (pair.follower, pair.follower_member)):
        assert (await _rpc(server, "slofleet_memory_status"))["dropped"] == []
        assert (await _pipeline_info(member))["pipeline"]["role"] is None
        assert await _all_at_once(server) == references["ids"]


async def _engine_running(server: VllmServer) -> int:
    """vLLM's own running-requests gauge, from the API server process: the scheduler's socket
    thread shares the engine core's GIL with vLLM's busy loop and can answer late while it decodes."""
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as resp:
        return parse_engine_metrics(await resp.text()).running_requests


async def test_a_busy_follower_is_refused_before_anything_pauses(
    pair: Pair, references: dict[str, Any]
) -> None:
    """Only the leader's requests carry over: a follower with a request running is refused, at the
    check or, when the check was answered before the request got there, right after the pause;
    either way nothing stays paused or dropped, and its request ends with the reference's tokens."""
    long_one = [(PROMPTS[0][0], 1000)]
    busy = asyncio.create_task(_all_at_once(pair.follower, long_one))
    deadline = time.monotonic() + 60
    while not await _engine_running(pair.follower):
        assert time.monotonic() < deadline and not busy.done(), "the follower never ran its request"
        await asyncio.sleep(0.01)
    with pytest.raises(PipelineSwitchError, match="the follower has 1 running") as refused:
        await merge_pipeline(pair.leader_member, pair.follower_member)
    assert refused.value.stage in ("check", "pause") and refused.value.paused == (), refused.value
    for server, member in ((pair.leader, pair.leader_member), (pair.follower, pair.follower_member)):
        assert (await _rpc(server, "slofleet_memory_status"))["dropped"] == []
        assert (await _pipeline_info(member))["pipeline"]["role"] is None
    assert await busy == await _one_by_one(pair.leader, long_one)


async def test_split_with_requests_in_flight_drains_them_in_the_pipeline(
    pair: Pair, references: dict[str, Any]
) -> None:
    """Merge again (the stores already hold the units: the drop is just a free), start the batch,
    and split while it runs: the leader drains the merged requests in the pipeline, requests that
    arrive meanwhile wait and then run on the leader alone; all give the reference."""
    await merge_pipeline(pair.leader_member, pair.follower_member)
    batch = asyncio.create_task(_all_at_once(pair.leader))
    deadline = time.monotonic() + 60
    while (await _pipeline_info(pair.leader_member))["running"] < len(PROMPTS):
        assert time.monotonic() < deadline, "the batch never ran"
        await asyncio.sleep(0.01)
    split = asyncio.create_task(split_pipeline(pair.leader_member, pair.follower_member))
    await asyncio.sleep(0.2)
    late = asyncio.create_task(_all_at_once(pair.leader))
    outputs, result, late_outputs = await asyncio.wait_for(asyncio.gather(batch, split, late), 300)
    print(f"\nsplit in flight: {result}")
    assert result.stage_seconds["drain"] > 0.1, "the split should have waited for the running batch"
    assert outputs == references["ids"]
    assert late_outputs == references["ids"]
    for server in (pair.leader, pair.follower):
        assert (await _rpc(server, "slofleet_memory_status"))["dropped"] == []
        assert await _all_at_once(server) == references["ids"]


async def _batch_with_peaks(server: VllmServer, member: PipelineMember) -> tuple[list[list[int]], int, int]:
    """Run `BIG` all at once; returns the outputs and the most requests the scheduler held
    running, and waiting, at any poll while the batch ran."""
    batch = asyncio.create_task(_all_at_once(server, BIG))
    peak_running = peak_waiting = 0
    while not batch.done():
        info = await _pipeline_info(member)
        peak_running, peak_waiting = max(peak_running, info["running"]), max(peak_waiting, info["waiting"])
        await asyncio.sleep(0.005)
    return await batch, peak_running, peak_waiting


async def test_merged_pair_turns_freed_memory_into_blocks_for_the_queued_requests(
    pair: Pair, references: dict[str, Any]
) -> None:
    """Issue 10 item 2: merged, each worker's KV holds only its layer and what its dropped weights
    freed, so the leader's pool grows to the expected count; a batch that queued on one engine
    runs all at once; the split gives every engine its original blocks back."""
    big_ref = await _one_by_one(pair.follower, BIG)
    members = ((pair.leader, pair.leader_member, "leader"), (pair.follower, pair.follower_member, "follower"))
    # The expected count, from the engines' own reports before the merge: per member,
    # (KV buffer bytes + bytes of the units it drops) // (bytes per block of one layer x 1 layer kept).
    fits, layouts = [], {}
    for server, member, role in members:
        layout = await _rpc(server, "slofleet_kv_layout")
        layouts[role] = layout
        units = await _rpc(server, "slofleet_memory_status")
        dropped = ("layer.1", "head") if role == "leader" else ("embed", "layer.0")
        freed = sum(units["unit_bytes"][u] for u in dropped)
        per_layer_block = layout["bytes_per_block"] // layout["num_layers"]
        assert layout["num_blocks"] == BLOCKS and layout["num_layers"] == 2
        assert layout["allocated_bytes"] == BLOCKS * layout["bytes_per_block"]
        fits.append((layout["allocated_bytes"] + freed) // per_layer_block)
        assert (await _pipeline_info(member))["num_blocks"] == BLOCKS
    expected = min(fits)

    # Unmerged: the batch needs 16 blocks of 11, so part of it waits.
    alone, alone_running, alone_waiting = await _batch_with_peaks(pair.follower, pair.follower_member)
    assert alone_running < len(BIG) and alone_waiting > 0, (alone_running, alone_waiting)
    assert alone == big_ref

    merged = await merge_pipeline(pair.leader_member, pair.follower_member)
    print(f"\nmerge with KV extension: {merged}")
    assert merged.kv_blocks_before == BLOCKS
    assert merged.kv_blocks_after == merged.kv_blocks_expected == expected
    assert expected >= 1.9 * BLOCKS and merged.kv_gain == expected / BLOCKS
    info = await _pipeline_info(pair.leader_member)
    assert info["num_blocks"] == expected and info["free_blocks"] == expected - 1, info
    for server, _, role in members:
        layout = await _rpc(server, "slofleet_kv_layout")
        assert layout["num_blocks"] == expected
        assert (
            layout["allocated_bytes"]
            == merged.kv_bytes[role][1]
            == expected * (layouts[role]["bytes_per_block"] // 2)
        ), "one layer's blocks only"
        assert len(layout["tensor_shapes"]) == 1 and layout["tensor_shapes"][0][0] == expected

    outputs, merged_running, merged_waiting = await _batch_with_peaks(pair.leader, pair.leader_member)
    assert merged_running == len(BIG), (merged_running, merged_waiting)
    assert outputs == big_ref
    assert await _all_at_once(pair.leader) == references["ids"]

    split = await split_pipeline(pair.leader_member, pair.follower_member)
    print(f"split with KV shrink: {split}")
    assert (split.kv_blocks_before, split.kv_blocks_after) == (expected, BLOCKS)
    for server, member, role in members:
        layout = await _rpc(server, "slofleet_kv_layout")
        assert layout["num_blocks"] == BLOCKS
        assert layout["allocated_bytes"] == layouts[role]["allocated_bytes"]
        assert layout["tensor_shapes"] == layouts[role]["tensor_shapes"]
        info = await _pipeline_info(member)
        assert info["num_blocks"] == BLOCKS and info["pipeline"]["home_blocks"] is None, info
        assert await _all_at_once(server) == references["ids"], f"{server.url} after the split"
    again, again_running, _ = await _batch_with_peaks(pair.leader, pair.leader_member)
    assert again == big_ref and again_running < len(BIG), "the leader is back to 11 usable blocks"
    print(
        f"KV blocks: before {BLOCKS}, merged {merged.kv_blocks_after} (expected {expected}, gain "
        f"{merged.kv_gain:.2f}x); batch of {len(BIG)}: peak running alone {alone_running} (waiting "
        f"{alone_waiting}), merged {merged_running} (waiting {merged_waiting}); relayout s merge "
        f"{merged.kv_relayout_seconds} split {split.kv_relayout_seconds}; stages merge "
        f"{merged.stage_seconds} split {split.stage_seconds}"
    )


# The `BIG` prompts with longer answers: 3 blocks each, so alone 3 run and 5 wait, while merged
# (36 usable blocks) all 8 fit; long enough that the merge lands while they generate.
LONG_BIG: list[tuple[str, int]] = [(prompt, 200) for prompt, _ in BIG]


async def test_merge_with_requests_in_flight_on_the_leader_keeps_their_tokens(
    pair: Pair, references: dict[str, Any]
) -> None:
    """Issue 10 item 3 (by recompute): the leader is mid-burst, some requests generating and the
    rest queued for KV; the merge requeues the running ones, and in the pipeline every request
    runs at once and ends with exactly the tokens of an undisturbed run."""
    ref = await _one_by_one(pair.follower, LONG_BIG)

    batch = asyncio.create_task(_all_at_once(pair.leader, LONG_BIG))
    deadline = time.monotonic() + 60
    while True:
        info = await _pipeline_info(pair.leader_member)
        if info["running"] and info["waiting"]:
            break
        assert time.monotonic() < deadline and not batch.done(), "the burst never queued on the leader"
        await asyncio.sleep(0.01)
    alone_running = info["running"]
    await asyncio.sleep(0.3)  # let the running requests generate some tokens first
    merged = await merge_pipeline(pair.leader_member, pair.follower_member)
    print(f"\nmerge in flight: {merged}")
    assert not batch.done(), "the burst finished before the merge: nothing was in flight"
    assert merged.requeued >= 1 and merged.requeued_tokens > 0, merged
    # What was still in flight at the merge (on a slow box some of the first wave may have
    # finished and let queued ones in before it): merged, all of it runs at once.
    first = await _pipeline_info(pair.leader_member)
    in_flight = first["running"] + first["waiting"]
    peak_running = first["running"]
    while not batch.done():
        peak_running = max(peak_running, (await _pipeline_info(pair.leader_member))["running"])
        await asyncio.sleep(0.005)
    outputs = await batch
    for i, (out, want) in enumerate(zip(outputs, ref, strict=True)):
        assert out == want, f"request {i} changed its tokens across the merge"
    assert peak_running == in_flight, (alone_running, in_flight, peak_running)

    split = await split_pipeline(pair.leader_member, pair.follower_member)
    for server in (pair.leader, pair.follower):
        assert (await _rpc(server, "slofleet_memory_status"))["dropped"] == []
        assert await _all_at_once(server) == references["ids"], f"{server.url} after the split"
    print(
        f"burst of {len(LONG_BIG)} x 200 tokens: {alone_running} ran alone, merge requeued "
        f"{merged.requeued} ({merged.requeued_tokens} tokens to recompute), paused "
        f"{merged.paused_seconds:.3f} s; merged peak running {peak_running}; "
        f"split {split.total_seconds:.2f} s"
    )
