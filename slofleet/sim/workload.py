"""The synthetic batch workload mixed into a replayed trace.

Batch traffic (evaluations, document processing) arrives as jobs: N requests submitted at once with
one deadline (`/v1/batches` with a completion window). Public traces carry no such jobs, so they
are generated: job submit times spread evenly over a window, request lengths drawn (seeded) from
the rows of a real trace, so batch requests look like the traffic they are mixed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slofleet.sim.traces import Trace


@dataclass(frozen=True)
class BatchJob:
    job_id: str
    submit_s: float
    deadline_s: float  # absolute, same clock as submit_s
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def expected_output_tokens(self) -> float:
        """What the gateway assumes per request; stands for the job's max_tokens / history."""
        return float(self.output_tokens.mean()) if len(self) else 0.0


def make_batch_jobs(
    *,
    jobs: int,
    requests_per_job: int,
    deadline_s: float,
    first_submit_s: float,
    last_submit_s: float,
    lengths_from: Trace,
    seed: int = 0,
) -> list[BatchJob]:
    """`jobs` jobs submitted evenly over [first_submit_s, last_submit_s], each of
    `requests_per_job` requests with lengths sampled from `lengths_from`, due `deadline_s` after
    submission."""
    if jobs <= 0 or requests_per_job <= 0:
        return []
    if deadline_s <= 0:
        raise ValueError(f"deadline_s={deadline_s}: a batch deadline must be > 0 seconds")
    if len(lengths_from) == 0:
        raise ValueError("lengths_from: the trace to sample batch request lengths from is empty")
    rng = np.random.default_rng(seed + 7919)
    times = np.linspace(first_submit_s, max(first_submit_s, last_submit_s), jobs)
    out = []
    for j, t in enumerate(times):
        idx = rng.integers(0, len(lengths_from), requests_per_job)
        out.append(
            BatchJob(
                f"job-{j}",
                float(t),
                float(t + deadline_s),
                lengths_from.prompt_tokens[idx],
                lengths_from.output_tokens[idx],
            )
        )
    return out
