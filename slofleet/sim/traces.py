"""Request traces: parsing the shipped public traces and shaping them (slice, time/load scaling).

A trace is three parallel arrays (arrival seconds relative to the first request, prompt tokens,
output tokens), kept as numpy arrays because a scaled trace has millions of rows and the simulator
only walks them in order. Formats: the Azure LLM inference trace 2023 CSV (`TIMESTAMP`,
`ContextTokens`, `GeneratedTokens`, wall-clock timestamps: replayed relative to the first row, as
their SOURCES note advises) and the Mooncake FAST'25 JSONL (`timestamp` in ms, `input_length`,
`output_length`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np

SHIPPED = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "mooncake-conv": "mooncake_conversation_trace.jsonl",
}


@dataclass(frozen=True)
class Trace:
    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def per_minute_rate(self) -> np.ndarray:
        """Requests per second in each full minute from the first arrival."""
        return self.rate_per_window(60.0)

    def rate_per_window(self, window_s: float) -> np.ndarray:
        """Requests per second in each `window_s`-long window from the first arrival."""
        if not len(self):
            return np.zeros(0)
        counts = np.bincount((self.arrival_s // window_s).astype(np.int64))
        return counts / window_s


def _parse_azure_time(text: str) -> float:
    # 100 ns resolution ("2023-11-16 18:15:46.6805900"): datetime takes at most 6 digits.
    head, _, frac = text.partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def parse_azure_csv(path: Path) -> Trace:
    times, prompts, outputs = [], [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected Azure trace columns {sorted(need)}, got {reader.fieldnames}")
        for row in reader:
            times.append(_parse_azure_time(row["TIMESTAMP"]))
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
    return _build(path.stem, times, prompts, outputs, scale=1.0)


def parse_mooncake_jsonl(path: Path) -> Trace:
    times, prompts, outputs = [], [], []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                times.append(float(row["timestamp"]))
                prompts.append(int(row["input_length"]))
                outputs.append(int(row["output_length"]))
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"{path}:{n}: expected JSON with timestamp, input_length, output_length ({e})"
                ) from e
    return _build(path.stem, times, prompts, outputs, scale=1e-3)


def _build(name: str, times: list[float], prompts: list[int], outputs: list[int], scale: float) -> Trace:
    if not times:
        raise ValueError(f"trace {name}: no rows")
    t = np.asarray(times, dtype=np.float64) * scale
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    p = np.maximum(np.asarray(prompts, dtype=np.int64)[order], 1)
    o = np.maximum(np.asarray(outputs, dtype=np.int64)[order], 1)
    return Trace(name, t, p, o)


def shipped_path(name: str) -> Path:
    """Path of a trace shipped in `slofleet/data/traces` (by short name or file name)."""
    filename = SHIPPED.get(name, name)
    res = resources.files("slofleet") / "data" / "traces" / filename
    if not res.is_file():
        raise ValueError(f"trace {name!r}: not shipped (shipped: {', '.join(SHIPPED)})")
    return Path(str(res))


def load_trace(name_or_path: str) -> Trace:
    """A shipped trace by short name (`azure-conv`, ...) or any Azure CSV / Mooncake JSONL file."""
    path = Path(name_or_path)
    if not path.exists():
        path = shipped_path(name_or_path)
    if path.suffix == ".csv":
        return parse_azure_csv(path)
    if path.suffix == ".jsonl":
        return parse_mooncake_jsonl(path)
    raise ValueError(f"trace {name_or_path!r}: use an Azure .csv or a Mooncake .jsonl file")


def shape(
    trace: Trace,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    time_scale: float = 1.0,
    load_scale: float = 1.0,
    jitter_s: float = 1.0,
    seed: int = 0,
) -> Trace:
    """Slice [start, start + duration), then compress time by `time_scale` (2 = twice as fast,
    same requests) and multiply the load by `load_scale`.

    Load scaling replicates each request floor(k) times, plus once more with probability frac(k),
    each copy shifted by a uniform jitter in [0, jitter_s): the per-minute shape of the trace and
    its length distribution are kept, while copies do not arrive in lockstep.
    """
    if time_scale <= 0 or load_scale <= 0:
        raise ValueError(f"time_scale={time_scale}, load_scale={load_scale}: both must be > 0")
    end = np.inf if duration_s is None else start_s + duration_s
    keep = (trace.arrival_s >= start_s) & (trace.arrival_s < end)
    t = (trace.arrival_s[keep] - start_s) / time_scale
    p, o = trace.prompt_tokens[keep], trace.output_tokens[keep]
    if load_scale != 1.0:
        rng = np.random.default_rng(seed)
        whole = int(load_scale)
        copies = np.full(len(t), whole, dtype=np.int64) + (rng.random(len(t)) < load_scale - whole)
        idx = np.repeat(np.arange(len(t)), copies)
        t = t[idx] + rng.random(len(idx)) * jitter_s
        p, o = p[idx], o[idx]
        order = np.argsort(t, kind="stable")
        t, p, o = t[order], p[order], o[order]
    return Trace(f"{trace.name}", t, p, o)
