"""Drop/restore, standby/wake and peer restore on the real vLLM CPU engine (issue 9).

One vLLM server (the 8-layer "small" model) for the module, driven through the Memory gRPC
service running as its own process (`python -m slofleet.sidecar.memory`), so the restart test
kills a real sidecar process. Every test leaves the engine with all weights resident and resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, free_port, start_vllm
from throttle import EngineThrottle

from slofleet.api.v1 import memory_pb2 as pb
from slofleet.api.v1 import memory_pb2_grpc as pb_grpc
from slofleet.sidecar.weightstore import WeightStore

pytestmark = pytest.mark.engine

# Long enough that 16 greedy streams are still running when DropLayers pauses the engine (at 400
# tokens a warm engine on a quiet box finished them all first).
MAX_TOKENS = 900
STREAMS = 16


@pytest.fixture(scope="module")
def small_model() -> Path:
    from slofleet.tinymodel import ensure_tiny_model

    return ensure_tiny_model("small")


@pytest.fixture(scope="module")
def engine(small_model: Path) -> Iterator[VllmServer]:
    server = start_vllm(small_model, extra_args=PROJECT_ENGINE_ARGS)
    try:
        yield server
    finally:
        server.stop()


class MemorySidecar:
    """`python -m slofleet.sidecar.memory` as a child process group (killable like a pod's
    sidecar container)."""

    def __init__(self, engine_url: str, store_dir: Path) -> None:
        self.metrics_port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "slofleet.sidecar.memory", "--engine-url", engine_url,
             "--store-dir", str(store_dir), "--metrics-port", str(self.metrics_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            lines.append(line)
            if line.startswith("memory service listening on "):
                self.address = f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}"
                return
            if not line and self.process.poll() is not None:
                break
        self.kill()
        raise RuntimeError("memory sidecar did not start:\n" + "".join(lines[-20:]))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def store_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="slofleet-test-store-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sidecar(engine: VllmServer, store_dir: Path) -> Iterator[MemorySidecar]:
    proc = MemorySidecar(engine.url, store_dir)
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
async def memory(sidecar: MemorySidecar, engine: VllmServer) -> AsyncIterator[pb_grpc.MemoryStub]:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.MemoryStub(channel)
        yield stub
        status = await stub.Status(pb.MemoryStatusRequest())
        if status.dropped_layers or status.standby:
            await stub.Wake(pb.WakeRequest())
        status = await stub.Status(pb.MemoryStatusRequest())
        assert status.layers_resident == status.layers_total and not status.paused, status


def _prompt(i: int) -> list[int]:
    return [11 + i, 200 + 7 * i, 42, 300 + i, 77, 5 + 3 * i]


async def _stream(
    http: aiohttp.ClientSession, url: str, i: int, progress: dict[int, int], max_tokens: int = MAX_TOKENS
) -> list[int]:
    body = {
        "prompt": _prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    tokens: list[int] = []
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            tokens.extend(chunk["choices"][0].get("token_ids") or [])
            progress[i] = len(tokens)
    return tokens


async def _run_streams(url: str, n: int = STREAMS) -> list[list[int]]:
    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(_stream(http, url, i, {}) for i in range(n))))


@pytest.fixture(scope="module")
def reference(engine: VllmServer) -> list[list[int]]:
    """Greedy outputs of the undisturbed engine (the same prompts, run once, all resident)."""
    return asyncio.run(_run_streams(engine.url))


def _sample(metrics: str, name: str, default: float | None = None) -> float:
    values = [float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith(name + " ")]
    if values:
        return values[0]
    if default is None:
        raise AssertionError(f"{name} not exported")
    return default


def _worker_rss(engine: VllmServer) -> int:
    """RSS of the engine's VLLM::Worker process, read from /proc (not from the engine itself)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != engine.process.pid:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ProcessLookupError):
            continue
        if "VLLM::Worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) * 1024
    raise AssertionError("no VLLM::Worker process in the engine's process group")


async def _complete(url: str, i: int, max_tokens: int = 32) -> list[int]:
    async with aiohttp.ClientSession() as http:
        return await _stream(http, url, i, {}, max_tokens)


async def test_drop_and_restore_under_16_streams(
    memory: pb_grpc.MemoryStub, engine: VllmServer, reference: list[list[int]]
) -> None:
    progress: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        # Throttled until the drop has paused the engine: a quiet box otherwise decodes all 900
        # tokens of every stream before the drop lands.
        with EngineThrottle():
            tasks = [asyncio.create_task(_stream(http, engine.url, i, progress)) for i in range(STREAMS)]
            # Drop once half the streams decode: waiting for all 16 raced on a loaded box, where the
            # last stream got its first token only after the others had finished.
            while len([n for n in progress.values() if n >= 8]) < STREAMS // 2:
                assert not any(t.done() and t.exception() for t in tasks)
                await asyncio.sleep(0.005)
            dropped = await memory.DropLayers(pb.DropLayersRequest(layers=[2, 3, 4]))
            at_pause = dict(progress)
        assert list(dropped.dropped_layers) == [2, 3, 4] and dropped.layers_resident == 5
        assert dropped.paused and dropped.dropped_weight_bytes > 0 and dropped.last_operation_bytes > 0
        in_flight = [i for i, n in at_pause.items() if n < MAX_TOKENS]
        if len(in_flight) < STREAMS // 2:
            # A quiet box decodes all 900 tokens before the drop lands (seen in CI): the test's
            # precondition, not the engine, failed. Put the layers back for the next tests.
            await memory.RestoreLayers(pb.RestoreLayersRequest())
            await asyncio.gather(*tasks)
            pytest.skip(f"streams finished before the drop, nothing in flight to check: {at_pause}")

        # While layers are dropped the engine is paused: nothing advances, a new request waits.
        late = asyncio.create_task(_complete(engine.url, 99))
        await asyncio.sleep(1.0)
        assert dict(progress) == at_pause and not late.done()
        assert not any(t.done() for i, t in enumerate(tasks) if i in in_flight)

        restored = await memory.RestoreLayers(pb.RestoreLayersRequest())
        assert restored.layers_resident == restored.layers_total == 8 and not restored.paused
        outputs = await asyncio.gather(*tasks)
        late_tokens = await asyncio.wait_for(late, 60)
    assert outputs == reference, "greedy tokens changed across drop/restore"
    assert late_tokens == (await _complete(engine.url, 99))


async def test_memory_is_really_released(
    memory: pb_grpc.MemoryStub, engine: VllmServer, reference: list[list[int]]
) -> None:
    # A first drop/restore cycle above already let glibc trim unrelated garbage; measure now.
    before = _worker_rss(engine)
    dropped = await memory.DropLayers(pb.DropLayersRequest(fraction=1.0))
    after_drop = _worker_rss(engine)
    freed = dropped.last_operation_bytes
    assert dropped.layers_resident == 0 and freed > 8 * 1_500_000
    assert before - after_drop >= 0.8 * freed, (before, after_drop, freed)
    restored = await memory.RestoreLayers(pb.RestoreLayersRequest())
    after_restore = _worker_rss(engine)
    assert after_restore - after_drop >= 0.8 * freed, (after_drop, after_restore, freed)
    assert restored.layers_resident == 8
    assert (await _run_streams(engine.url, 4)) == reference[:4]


async def test_standby_and_wake(
    memory: pb_grpc.MemoryStub, engine: VllmServer, sidecar: MemorySidecar, reference: list[list[int]]
) -> None:
    before = _worker_rss(engine)
    wake_count = 'slofleet_memory_restore_seconds_count{command="wake"}'
    standby_count = 'slofleet_memory_drop_seconds_count{command="standby"}'
    # Counts before, not absolute values: an earlier test's teardown may have woken the engine.
    wakes, standbys = (_sample(sidecar.metrics(), n, 0.0) for n in (wake_count, standby_count))
    parked = await memory.Standby(pb.StandbyRequest())
    assert parked.standby and parked.paused and parked.resident_weight_bytes == 0
    assert (
        parked.layers_resident == 0
        and "embed" in parked.host_store_units
        and "head" in parked.host_store_units
    )
    assert before - _worker_rss(engine) >= 0.8 * parked.dropped_weight_bytes
    metrics = sidecar.metrics()
    assert "slofleet_memory_standby 1.0" in metrics
    assert _sample(metrics, standby_count) == standbys + 1

    waiting = asyncio.create_task(_complete(engine.url, 3, MAX_TOKENS))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await memory.Standby(pb.StandbyRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "standby" in (
        err.value.details() or ""
    )

    awake = await memory.Wake(pb.WakeRequest())
    assert not awake.standby and not awake.paused and awake.resident_weight_bytes > 0
    assert await asyncio.wait_for(waiting, 60) == reference[3]
    metrics = sidecar.metrics()
    assert "slofleet_memory_standby 0.0" in metrics
    assert _sample(metrics, wake_count) == wakes + 1
    assert _sample(metrics, "slofleet_memory_host_store_bytes") == awake.host_store_bytes > 0


async def test_bad_commands_get_clear_errors_and_leave_the_engine_serving(
    memory: pb_grpc.MemoryStub, engine: VllmServer, reference: list[list[int]]
) -> None:
    async def refused(call, request, code: grpc.StatusCode, field: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == code, err.value.details()
        assert (err.value.details() or "").startswith(field + ":"), err.value.details()

    await refused(
        memory.DropLayers, pb.DropLayersRequest(layers=[8]), grpc.StatusCode.INVALID_ARGUMENT, "layers"
    )
    await refused(memory.DropLayers, pb.DropLayersRequest(), grpc.StatusCode.INVALID_ARGUMENT, "layers")
    await refused(
        memory.DropLayers, pb.DropLayersRequest(fraction=1.5), grpc.StatusCode.INVALID_ARGUMENT, "fraction"
    )
    await refused(
        memory.RestoreLayers, pb.RestoreLayersRequest(), grpc.StatusCode.FAILED_PRECONDITION, "layers"
    )
    await refused(memory.Wake, pb.WakeRequest(), grpc.StatusCode.FAILED_PRECONDITION, "wake")
    status = await memory.Status(pb.MemoryStatusRequest())
    assert not status.paused and status.layers_resident == 8
    assert (await _complete(engine.url, 0)) == reference[0][:32]

    await memory.DropLayers(pb.DropLayersRequest(layers=[6]))
    await refused(
        memory.DropLayers, pb.DropLayersRequest(layers=[6, 7]), grpc.StatusCode.FAILED_PRECONDITION, "layers"
    )
    await refused(
        memory.RestoreLayers,
        pb.RestoreLayersRequest(layers=[5]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "layers",
    )
    await refused(
        memory.RestoreLayers, pb.RestoreLayersRequest(layers=[-1]), grpc.StatusCode.INVALID_ARGUMENT, "layers"
    )
    status = await memory.Status(pb.MemoryStatusRequest())
    assert list(status.dropped_layers) == [6] and status.paused
    await memory.RestoreLayers(pb.RestoreLayersRequest(layers=[6]))
    assert (await _complete(engine.url, 1)) == reference[1][:32]


async def test_restore_after_the_sidecar_restarts(
    engine: VllmServer, store_dir: Path, reference: list[list[int]]
) -> None:
    first = MemorySidecar(engine.url, store_dir)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            status = await pb_grpc.MemoryStub(channel).DropLayers(pb.DropLayersRequest(fraction=0.5))
        assert list(status.dropped_layers) == [4, 5, 6, 7]
    finally:
        first.kill()  # SIGKILL: nothing is flushed or handed over
    second = MemorySidecar(engine.url, store_dir)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.MemoryStub(channel)
            status = await stub.Status(pb.MemoryStatusRequest())
            assert list(status.dropped_layers) == [4, 5, 6, 7] and status.paused
            restored = await stub.RestoreLayers(pb.RestoreLayersRequest())
            assert restored.layers_resident == 8 and not restored.paused
    finally:
        second.kill()
    assert (await _run_streams(engine.url, 4)) == reference[:4]


async def test_restore_from_a_peer(
    memory: pb_grpc.MemoryStub,
    engine: VllmServer,
    small_model: Path,
    store_dir: Path,
    reference: list[list[int]],
) -> None:
    """A second engine of the same model saves layers 0-1 into its own host store; this engine
    drops them discarding its host copy, so the peer's store holds the only copy, and the restore
    pulls it over gRPC (digest-checked)."""
    peer_dir = Path(tempfile.mkdtemp(prefix="slofleet-test-peer-", dir="/dev/shm"))
    peer_engine = start_vllm(small_model, extra_args=PROJECT_ENGINE_ARGS)
    peer = MemorySidecar(peer_engine.url, peer_dir)
    try:
        async with grpc.aio.insecure_channel(peer.address) as channel:
            saved = await pb_grpc.MemoryStub(channel).SaveLayers(pb.SaveLayersRequest(layers=[0, 1]))
        assert {"layer.0", "layer.1"} <= set(saved.host_store_units) and saved.layers_resident == 8
        peer_entries = WeightStore(peer_dir).manifest()

        dropped = await memory.DropLayers(pb.DropLayersRequest(layers=[0, 1], discard_host_copy=True))
        assert dropped.model_fingerprint == saved.model_fingerprint
        assert "layer.0" not in dropped.host_store_units and "layer.1" not in dropped.host_store_units
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.SaveLayers(pb.SaveLayersRequest(layers=[1]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.RestoreLayers(pb.RestoreLayersRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (err.value.details() or "").startswith("source_peer:")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await memory.RestoreLayers(pb.RestoreLayersRequest(source_peer=f"127.0.0.1:{free_port()}"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert list((await memory.Status(pb.MemoryStatusRequest())).dropped_layers) == [0, 1]

        restored = await memory.RestoreLayers(pb.RestoreLayersRequest(source_peer=peer.address))
        assert restored.layers_resident == 8 and not restored.paused
        local = WeightStore(store_dir).manifest()
        for unit in ("layer.0", "layer.1"):
            assert local[unit].digest == peer_entries[unit].digest
            assert local[unit].writer == f"peer {peer.address}"
    finally:
        peer.kill()
        peer_engine.stop()
        shutil.rmtree(peer_dir, ignore_errors=True)
    assert (await _run_streams(engine.url, 4)) == reference[:4]


def test_store_holds_exactly_the_checkpoint_weights(small_model: Path, store_dir: Path) -> None:
    """What the engine wrote for layer 0 (read back out of oneDNN's packed handles) equals the
    checkpoint's tensors, fused the way vLLM fuses them and cast to the engine's bf16."""
    import torch
    from safetensors.torch import load_file

    ckpt: dict[str, torch.Tensor] = {}
    for f in sorted(small_model.glob("*.safetensors")):
        ckpt.update(load_file(f))
    store = WeightStore(store_dir)
    entry = store.get("layer.0")
    assert entry is not None, "earlier tests dropped layer 0 into the store"
    buf = store.read_bytes(entry)
    stored = {
        t.name: torch.frombuffer(buf, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        .view(getattr(torch, t.dtype))
        .reshape(t.shape)
        for t in entry.tensors
    }
    p = "model.layers.0."
    expected = {
        p + "self_attn.qkv_proj.weight": torch.cat([ckpt[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        p + "self_attn.o_proj.weight": ckpt[p + "self_attn.o_proj.weight"],
        p + "mlp.gate_up_proj.weight": torch.cat(
            [ckpt[p + "mlp.gate_proj.weight"], ckpt[p + "mlp.up_proj.weight"]]
        ),
        p + "mlp.down_proj.weight": ckpt[p + "mlp.down_proj.weight"],
        p + "input_layernorm.weight": ckpt[p + "input_layernorm.weight"],
        p + "post_attention_layernorm.weight": ckpt[p + "post_attention_layernorm.weight"],
    }
    assert set(stored) == set(expected)
    for name, want in expected.items():
        assert torch.equal(stored[name], want.to(torch.bfloat16)), name
