"""Rates and latency percentiles over a sliding window of engine samples (no I/O).

vLLM exports totals since its start: token counters and cumulative latency histograms. What a
policy needs is *recent* behaviour, so the window keeps timestamped samples and answers with
differences between its newest and oldest sample: tokens per second from counter deltas and
TTFT/ITL percentiles from histogram bucket deltas (PromQL's `rate` and `histogram_quantile`,
computed locally so that the sidecar does not need Prometheus to make decisions).

A counter that goes down means the engine restarted; the window then starts over from that sample.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from slofleet.sidecar.enginemetrics import EngineSample, Histogram


def histogram_quantile(q: float, upper_bounds: tuple[float, ...], counts: tuple[float, ...]) -> float:
    """The q-quantile of cumulative bucket counts, interpolated linearly inside the bucket that
    holds it (Prometheus' `histogram_quantile`). Returns 0.0 for an empty histogram and the
    largest finite bound when the quantile falls into the +inf bucket."""
    if not counts or counts[-1] <= 0:
        return 0.0
    rank = q * counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(upper_bounds, counts, strict=True):
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def histogram_delta(new: Histogram, old: Histogram) -> tuple[float, ...]:
    """Bucket-wise `new - old` (same bounds); the observations made between the two samples."""
    if new.upper_bounds != old.upper_bounds:
        return new.cumulative_counts
    return tuple(max(0.0, a - b) for a, b in zip(new.cumulative_counts, old.cumulative_counts, strict=True))


@dataclass(frozen=True, slots=True)
class WindowStats:
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    ttft_p50_seconds: float
    ttft_p99_seconds: float
    itl_p50_seconds: float
    itl_p99_seconds: float
    # p99 over finished requests of each one's mean ITL (vLLM's TPOT): the ITL SLO's measure.
    request_itl_p99_seconds: float = 0.0


class SampleWindow:
    """Timestamped samples covering at least `rate_seconds` and `latency_seconds` (the longer)."""

    def __init__(self, rate_seconds: float = 10.0, latency_seconds: float = 60.0) -> None:
        if rate_seconds <= 0 or latency_seconds <= 0:
            raise ValueError("rate_seconds and latency_seconds: must be > 0")
        self.rate_seconds = rate_seconds
        self.latency_seconds = latency_seconds
        self._samples: deque[tuple[float, EngineSample]] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    def clear(self) -> None:
        self._samples.clear()

    def add(self, t: float, sample: EngineSample) -> None:
        if self._samples:
            last = self._samples[-1][1]
            if (
                sample.prompt_tokens_total < last.prompt_tokens_total
                or sample.generation_tokens_total < last.generation_tokens_total
                or sample.ttft.count < last.ttft.count
            ):
                self._samples.clear()  # the engine restarted: its totals began again
        self._samples.append((t, sample))
        horizon = t - max(self.rate_seconds, self.latency_seconds)
        # Keep one sample at or before the horizon so that the window spans all of it.
        while len(self._samples) > 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()

    def _oldest_since(self, t0: float) -> tuple[float, EngineSample]:
        for t, s in self._samples:
            if t >= t0:
                return t, s
        return self._samples[-1]

    def stats(self) -> WindowStats:
        if len(self._samples) < 2:
            return WindowStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        t_new, new = self._samples[-1]
        t_old, old = self._oldest_since(t_new - self.rate_seconds)
        if t_old == t_new:
            t_old, old = self._samples[-2]
        dt = max(1e-9, t_new - t_old)
        _, lat_old = self._oldest_since(t_new - self.latency_seconds)
        if lat_old is new:
            lat_old = self._samples[0][1]
        ttft = histogram_delta(new.ttft, lat_old.ttft)
        itl = histogram_delta(new.itl, lat_old.itl)
        tpot = histogram_delta(new.tpot, lat_old.tpot)
        return WindowStats(
            prompt_tokens_per_second=(new.prompt_tokens_total - old.prompt_tokens_total) / dt,
            generation_tokens_per_second=(new.generation_tokens_total - old.generation_tokens_total) / dt,
            ttft_p50_seconds=histogram_quantile(0.5, new.ttft.upper_bounds, ttft),
            ttft_p99_seconds=histogram_quantile(0.99, new.ttft.upper_bounds, ttft),
            itl_p50_seconds=histogram_quantile(0.5, new.itl.upper_bounds, itl),
            itl_p99_seconds=histogram_quantile(0.99, new.itl.upper_bounds, itl),
            request_itl_p99_seconds=histogram_quantile(0.99, new.tpot.upper_bounds, tpot),
        )
