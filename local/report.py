"""The replay report: what users of each class saw, and what the fleet did meanwhile."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slofleet.instance import RequestClass
from slofleet.local.replay import Outcome


@dataclass(frozen=True, slots=True)
class SloTargets:
    ttft_seconds: float
    itl_seconds: float
    batch_deadline_seconds: float


@dataclass(frozen=True, slots=True)
class ClassSummary:
    request_class: RequestClass
    sent: int
    completed: int
    failed: int
    attainment: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    output_tokens: int


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarise(outcomes: Sequence[Outcome], slo: SloTargets) -> list[ClassSummary]:
    """Attainment: interactive requests meet TTFT and their mean ITL target; batch meet the deadline."""
    rows = []
    for cls in RequestClass:
        mine = [o for o in outcomes if o.arrival.request_class == cls]
        if not mine:
            continue
        ok = [o for o in mine if o.completed]
        ttfts = [o.ttft_seconds for o in ok if o.ttft_seconds is not None]
        itls = [x for o in ok for x in o.itl_seconds]
        if cls == RequestClass.INTERACTIVE:
            met = sum(
                1
                for o in ok
                if o.ttft_seconds is not None
                and o.ttft_seconds <= slo.ttft_seconds
                and (not o.itl_seconds or float(np.mean(o.itl_seconds)) <= slo.itl_seconds)
            )
        else:
            met = sum(1 for o in ok if o.e2e_seconds <= slo.batch_deadline_seconds)
        rows.append(
            ClassSummary(
                request_class=cls,
                sent=len(mine),
                completed=len(ok),
                failed=len(mine) - len(ok),
                attainment=met / len(mine),
                ttft_p50=_pct(ttfts, 50),
                ttft_p99=_pct(ttfts, 99),
                itl_p50=_pct(itls, 50),
                itl_p99=_pct(itls, 99),
                output_tokens=sum(o.output_tokens for o in ok),
            )
        )
    return rows


def format_report(
    rows: Sequence[ClassSummary],
    duration_seconds: float,
    fleet_events: dict[str, float],
    slo: SloTargets,
) -> str:
    lines = [
        f"SLO: interactive TTFT <= {slo.ttft_seconds:g} s and mean ITL <= {slo.itl_seconds * 1e3:g} ms;"
        f" batch within {slo.batch_deadline_seconds / 60:g} min",
        f"{'class':<12} {'sent':>6} {'done':>6} {'failed':>6} {'SLO met':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
        f" {'ITL p50':>8} {'ITL p99':>8} {'tok/s':>8}",
    ]

    def sec(v: float, width: int) -> str:
        return f"{v:>{width - 1}.3f}s" if v == v else f"{'-':>{width}}"  # NaN: none measured

    def ms(v: float) -> str:
        return f"{v * 1e3:>6.1f}ms" if v == v else f"{'-':>8}"

    for r in rows:
        lines.append(
            f"{r.request_class.value:<12} {r.sent:>6} {r.completed:>6} {r.failed:>6} {r.attainment:>8.1%}"
            f" {sec(r.ttft_p50, 9)} {sec(r.ttft_p99, 9)} {ms(r.itl_p50)} {ms(r.itl_p99)}"
            f" {r.output_tokens / max(duration_seconds, 1e-9):>8.1f}"
        )
    events = ", ".join(f"{k} {v:g}" for k, v in fleet_events.items())
    lines.append(f"duration {duration_seconds:.1f} s; {events}")
    return "\n".join(lines)


def plot(
    outcomes: Sequence[Outcome],
    samples: Sequence[tuple[float, int, int]],
    out_dir: Path,
) -> list[Path]:
    """PNG plots of load, replicas and latency over time; samples are (t, in_flight, replicas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t = [s[0] for s in samples]
    axes[0].plot(t, [s[1] for s in samples], label="requests in flight (gateway)")
    axes[0].set_ylabel("requests")
    axes[0].legend(loc="upper left")
    axes[1].step(t, [s[2] for s in samples], where="post", color="tab:green", label="ready instances")
    axes[1].set_ylabel("instances")
    axes[1].legend(loc="upper left")
    for cls, color in ((RequestClass.INTERACTIVE, "tab:blue"), (RequestClass.BATCH, "tab:orange")):
        pts = [
            (o.sent_at, o.ttft_seconds)
            for o in outcomes
            if o.arrival.request_class == cls and o.ttft_seconds is not None
        ]
        if pts:
            axes[2].scatter(*zip(*pts, strict=True), s=4, color=color, label=f"TTFT {cls.value}")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("seconds")
    axes[2].set_xlabel("time since replay start (s)")
    axes[2].legend(loc="upper left")
    fig.tight_layout()
    path = out_dir / "replay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
