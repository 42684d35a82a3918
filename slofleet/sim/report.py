"""Comparison table and plots of simulation results.

The table is what `slofleet simulate` prints: one row per policy, with the GPU-hours ratio to the
static-peak row measured in the same run (the reference every claim is made against). Migrations
are counted as completed (`migr`) and as planned but not completed (`m.fail`: aborted or not
startable; results.json splits them by outcome and the completed ones by reason).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slofleet.sim.simulator import SimResult


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if len(a) else math.nan


def rows(results: Sequence[SimResult]) -> list[dict[str, object]]:
    base = next((r.gpu_hours for r in results if r.policy == "static-peak"), None)
    out = []
    for r in results:
        out.append(
            {
                "policy": r.policy,
                "interactive_attainment": r.interactive_attainment,
                "ttft_p50_s": _pct(r.ttft, 50),
                "ttft_p99_s": _pct(r.ttft, 99),
                "itl_p50_ms": _pct(r.itl, 50) * 1e3,
                "itl_p99_ms": _pct(r.itl, 99) * 1e3,
                "batch_on_time": r.batch_on_time_fraction,
                "batch_unfinished": r.batch_unfinished,
                "gpu_hours": r.gpu_hours,
                "gpu_hours_vs_static": r.gpu_hours / base if base else math.nan,
                "peak_replicas": r.peak_replicas,
                "scale_events": len(r.scale_events),
                "migrations": r.migrations,
                "migrations_aborted": sum(r.migrations_by_outcome.values()) - r.migrations,
                "migrations_by_outcome": dict(r.migrations_by_outcome),
                "migrations_by_reason": dict(r.migrations_by_reason),
                "batch_evictions": r.evictions,
                "engine_preemptions": r.preemptions,
                "pipeline_groups": r.groups_formed,
                "wall_s": r.wall_s,
            }
        )
    return out


def table(results: Sequence[SimResult]) -> str:
    header = (
        f"{'policy':<18} {'int.SLO':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'batch ok':>8} {'GPU-h':>8} {'vs static':>9} {'peak':>5} {'scale':>6} {'migr':>5} {'m.fail':>6} "
        f"{'evict':>6} {'preempt':>7} {'groups':>6} {'wall':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows(results):
        lines.append(
            f"{row['policy']:<18} {row['interactive_attainment']:>8.2%} {row['ttft_p50_s']:>8.3f}s "
            f"{row['ttft_p99_s']:>8.3f}s {row['itl_p50_ms']:>6.1f}ms {row['itl_p99_ms']:>6.1f}ms "
            f"{row['batch_on_time']:>8.2%} {row['gpu_hours']:>8.1f} {row['gpu_hours_vs_static']:>9.2f} "
            f"{row['peak_replicas']:>5} {row['scale_events']:>6} {row['migrations']:>5} "
            f"{row['migrations_aborted']:>6} {row['batch_evictions']:>6} {row['engine_preemptions']:>7} "
            f"{row['pipeline_groups']:>6} {row['wall_s']:>5.0f}s"
        )
    return "\n".join(lines)


def plot(results: Sequence[SimResult], out_dir: Path) -> list[Path]:
    """One PNG per policy (load, replicas per pool, attainment over time) and one comparing the
    total replicas of every policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        s = r.samples
        t = np.asarray(s["t"]) / 60.0
        fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        ax[0].plot(t, s["interactive_rps"], label="interactive arrivals/s")
        ax[0].plot(t, s["interactive_queue"], label="interactive queued", alpha=0.7)
        ax[0].plot(t, s["batch_queue"], label="batch queued", alpha=0.7)
        ax[0].set_yscale("symlog")
        ax[0].set_ylabel("load")
        ax[0].legend(loc="upper right", fontsize=8)
        ax[1].stackplot(t, s["interactive"], s["mixed"], s["batch"], labels=["interactive", "mixed", "batch"])
        ax[1].plot(t, s["ready"], color="k", lw=1, label="ready")
        ax[1].set_ylabel("replicas")
        ax[1].legend(loc="upper right", fontsize=8)
        ax[2].plot(t, s["attainment"], label="interactive SLO attainment (60 s window)")
        ax[2].axhline(0.99, color="r", ls="--", lw=0.8)
        ax[2].set_ylim(0, 1.02)
        ax[2].set_xlabel("minutes")
        ax[2].legend(loc="lower right", fontsize=8)
        fig.suptitle(
            f"{r.policy}: attainment {r.interactive_attainment:.2%}, batch on time "
            f"{r.batch_on_time_fraction:.2%}, {r.gpu_hours:.1f} GPU-h"
        )
        path = out_dir / f"sim_{r.policy}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        s = r.samples
        total = np.asarray(s["interactive"]) + np.asarray(s["mixed"]) + np.asarray(s["batch"])
        ax.plot(np.asarray(s["t"]) / 60.0, total, label=f"{r.policy} ({r.gpu_hours:.1f} GPU-h)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("replicas")
    ax.legend(fontsize=8)
    path = out_dir / "sim_replicas.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
