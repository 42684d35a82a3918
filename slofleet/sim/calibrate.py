"""Measure an engine's costs from a running vLLM OpenAI server and fit an `EngineCalibration`.

Why from the outside: the simulator needs four numbers (see `slofleet.calibration`), and every one
of them shows up in request timings the public API gives: a 1-token completion is a prefill (its
time grows with the prompt: per-token compute), B concurrent decodes of short prompts give the step
time at batch B (intercept: the weight read; slope: per-token compute plus per-sequence host work),
and the same with long prompts adds the context term. KV capacity comes from
`vllm:cache_config_info` on /metrics.
Standard library only (urllib + threads), so the core package stays free of HTTP frameworks.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np

from slofleet.calibration import EngineCalibration


def _post(url: str, body: dict[str, object], timeout: float = 120.0) -> dict[str, object]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _get(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def _completion(base: str, model: str, prompt_len: int, max_tokens: int) -> float:
    body = {
        "model": model,
        "prompt": [7 + (i % 100) for i in range(prompt_len)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    _post(base + "/v1/completions", body)
    return time.perf_counter() - t0


def _concurrent(base: str, model: str, n: int, prompt_len: int, max_tokens: int) -> float:
    """Wall time for n identical requests sent at once."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            _completion(base, model, prompt_len, max_tokens)
        except BaseException as e:  # re-raised below with the measurement that failed
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{n} concurrent requests of {prompt_len} tokens failed: {errors[0]}") from errors[
            0
        ]
    return time.perf_counter() - t0


def measure_server(
    url: str,
    *,
    name: str = "measured",
    hardware: str = "",
    decode_tokens: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] = lambda _: None,
) -> EngineCalibration:
    """Fit a calibration to the server at `url` (prompts must fit its --max-model-len >= 1024)."""
    base = url.rstrip("/")
    model = str(json.loads(_get(base + "/v1/models"))["data"][0]["id"])  # type: ignore[index]
    _completion(base, model, 16, 4)  # warm-up (compiled graphs, allocator)

    prompts = [32, 128, 256, 512, 896]
    ttft = [min(_completion(base, model, p, 1) for _ in range(repeats)) for p in prompts]
    slope, intercept = np.polyfit(prompts, ttft, 1)
    progress(f"prefill: {intercept * 1e3:.2f} ms + {slope * 1e6:.2f} us/token")

    batches = [1, 4, 16, 64]
    steps = []
    for b in batches:
        wall = min(_concurrent(base, model, b, 16, decode_tokens) for _ in range(repeats))
        steps.append((wall - intercept - slope * 16 * b) / (decode_tokens - 1))
    d_slope, d_intercept = np.polyfit(batches, steps, 1)
    progress(f"decode step: {d_intercept * 1e3:.2f} ms + {d_slope * 1e6:.2f} us/sequence")

    long_prompt = 768
    b = 16
    wall_long = min(_concurrent(base, model, b, long_prompt, decode_tokens) for _ in range(repeats))
    step_long = (wall_long - intercept - slope * long_prompt * b) / (decode_tokens - 1)
    step_short = d_intercept + d_slope * b
    per_ctx = max(0.0, (step_long - step_short) / (b * (long_prompt - 16)))
    progress(f"context: {per_ctx * 1e9:.2f} ns per context token per step")

    metrics = _get(base + "/metrics")
    blocks = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', metrics)
    bsize = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', metrics)
    if not blocks or not bsize:
        raise RuntimeError(f"{base}/metrics: no vllm:cache_config_info with num_gpu_blocks and block_size")
    block_size = int(bsize.group(1))
    overhead = max(0.0, min(float(intercept), float(d_intercept)) * 0.5)
    return EngineCalibration(
        name=name,
        model=model,
        hardware=hardware,
        source=(
            f"MEASURED by slofleet.sim.calibrate.measure_server against {base} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: prefill {prompts} tokens x1 output, "
            f"decode batches {batches} x {decode_tokens} tokens (16-token prompts), context {long_prompt} "
            f"tokens x {b}; best of {repeats}. Linear fits; times include HTTP and API-server overhead."
        ),
        overhead_s=overhead,
        weight_read_s=max(0.0, float(d_intercept) - overhead),
        # prefill's slope is compute per token; the decode slope beyond it is per-sequence host work
        per_token_compute_s=max(float(slope), 1e-9),
        per_ctx_token_s=per_ctx,
        per_seq_s=max(0.0, float(d_slope) - float(slope)),
        kv_capacity_tokens=int(blocks.group(1)) * block_size,
        block_size_tokens=block_size,
        max_num_seqs=256,
        max_batched_tokens=2048,
        cold_start_s=45.0,
        wake_s=0.0,
    )
