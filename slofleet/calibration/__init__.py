"""Engine cost models for the simulator: what one instance of a model on some hardware costs.

Why this form: an iteration of a continuous-batching engine (vLLM with chunked prefill) processes
T = (running decodes + prefill chunk) tokens and reads every weight once plus the KV of every
context token. Its time is therefore about

    step(T, ctx, n) = overhead + max(weight_read_s, T * per_token_compute_s) + ctx * per_ctx_token_s
                      + n * per_seq_s

(the roofline: small batches are bound by reading the weights, big ones by compute; attention
reads grow with the total context; `per_seq_s` is per-running-sequence host work, sampling and
detokenizing, which dominates a tiny model on a CPU and is negligible for an 8B model on a GPU).
Five numbers, each measurable (batch-1 step, prefill per token, decode slope per sequence, context
slope, overhead), describe an engine well enough to size a fleet, and the same
formula serves an H100 and the local CPU build. Calibrations are JSON files under
`slofleet/data/calibration/` carrying their `source`, so every simulated number can be traced to
where its inputs came from.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EngineCalibration:
    """Costs of one engine instance. Times in seconds, sizes in tokens."""

    name: str
    model: str
    hardware: str
    source: str
    overhead_s: float
    weight_read_s: float
    per_token_compute_s: float
    per_ctx_token_s: float
    per_seq_s: float
    kv_capacity_tokens: int
    block_size_tokens: int
    max_num_seqs: int
    max_batched_tokens: int
    cold_start_s: float
    wake_s: float
    # Latency outside the engine's iterations that every response carries (client -> gateway ->
    # API server -> scheduler and back: HTTP, tokenization, detokenization); the simulator adds
    # it to the TTFT and end-to-end time a client sees. 0 where the source does not give it.
    response_path_s: float = 0.0
    # Model sizes for KunServe's parameter drop (simulated by `slofleet.sim.kunserve`): bytes of
    # the decoder layers' weights (what a drop can free; embeddings and the head stay), of one
    # token's KV over all layers, and the decoder layer count. 0 where the source does not give
    # them (the mode is then unavailable).
    layer_weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    num_layers: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and v < 0:
                raise ValueError(f"calibration {self.name!r}: {f.name}={v} must be >= 0")
        if self.kv_capacity_tokens <= 0 or self.max_num_seqs <= 0 or self.max_batched_tokens <= 0:
            raise ValueError(
                f"calibration {self.name!r}: kv_capacity_tokens, max_num_seqs and max_batched_tokens "
                "must be > 0"
            )

    def step_s(self, tokens: float, ctx_tokens: float, seqs: float = 0.0) -> float:
        """Time of one engine iteration over `tokens` new tokens with `ctx_tokens` of KV read and
        `seqs` running sequences."""
        return (
            self.overhead_s
            + max(self.weight_read_s, tokens * self.per_token_compute_s)
            + ctx_tokens * self.per_ctx_token_s
            + seqs * self.per_seq_s
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def builtin_names() -> list[str]:
    root = resources.files("slofleet") / "data" / "calibration"
    return sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))


def load_calibration(name_or_path: str) -> EngineCalibration:
    """A built-in calibration by name (e.g. `llama3-8b-h100`) or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("slofleet") / "data" / "calibration" / f"{name_or_path}.json"
        if not res.is_file():
            raise ValueError(
                f"calibration {name_or_path!r}: not a JSON file and not built in "
                f"(built in: {', '.join(builtin_names())})"
            )
        text = res.read_text()
    data = json.loads(text)
    known = {f.name for f in fields(EngineCalibration)}
    unknown = sorted(set(data) - known)
    optional = {f.name for f in fields(EngineCalibration) if f.default is not MISSING}
    missing = sorted(known - optional - set(data))
    if unknown or missing:
        raise ValueError(f"calibration {name_or_path!r}: unknown fields {unknown}, missing fields {missing}")
    return EngineCalibration(**data)
