"""Llumnix live migration in the simulator: the policy's migrations are enacted without losing or
duplicating work, they relieve an overloaded instance, a request that finishes during its copy is
not counted as moved, a scale-in victim is emptied by migration, and with migration off every
result is what it was before migration existed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slofleet.calibration import load_calibration
from slofleet.cli import main
from slofleet.instance import InstanceLoad, Pool, RequestInfo
from slofleet.policies.baselines import StaticAutoscaler
from slofleet.policies.global_autoscaler import ChironAutoscaler, FleetObservation, ScaleDecision
from slofleet.policies.migration import MigrationConfig, Strategy
from slofleet.sim.migration import MigrationCosts, Outcome
from slofleet.sim.simulator import SimConfig, SimResult, Simulator, SloSpec
from slofleet.sim.traces import Trace, load_trace, shape
from slofleet.sim.workload import make_batch_jobs

H100 = load_calibration("llama3-8b-h100")
# Little KV per instance, so that a few requests exhaust one.
SMALL = replace(H100, kv_capacity_tokens=20_000)


def onto_first(loads: Sequence[InstanceLoad], request: RequestInfo) -> str | None:
    """A dispatcher that piles everything on mixed-0 (the imbalance migration is for)."""
    return "mixed-0" if any(ld.instance_id == "mixed-0" for ld in loads) else None


def run_static(
    trace: Trace,
    migration: MigrationConfig | None,
    instances: int = 2,
    costs: MigrationCosts | None = None,
    control_interval_s: float = 0.25,
) -> tuple[Simulator, SimResult]:
    cfg = SimConfig(
        calibration=SMALL,
        initial_replicas={Pool.MIXED: instances},
        dispatch=onto_first,
        control_interval_s=control_interval_s,
        migration=migration,
        migration_costs=costs or MigrationCosts(),
    )
    sim = Simulator(trace, (), StaticAutoscaler(instances), cfg)
    return sim, sim.run()


def burst(n: int, prompt: int, output: int, over_s: float = 1.0) -> Trace:
    return Trace("burst", np.linspace(0.0, over_s, n), np.full(n, prompt), np.full(n, output))


def assert_settled(sim: Simulator, res: SimResult, trace: Trace) -> None:
    """Every request finished once, nothing is left anywhere, and the decode work done is exactly
    the output tokens: each prefill yields one token and decoding the rest, up to the part of an
    iteration lost when a request stops decoding somewhere (a preemption or a move)."""
    n = len(trace)
    assert len(res.ttft) == res.interactive_total == n
    assert not sim.moves and not sim.giq
    assert all(i.in_flight == 0 and i.reserved == 0 and not i.run and i.pf is None for i in sim.instances)
    decoded = sum(i.gen_tokens for i in sim.instances)
    expected = int(trace.output_tokens.sum()) - (n + res.preemptions)
    interrupted = res.preemptions + res.migrations
    assert expected - 1e-6 * n <= decoded <= expected + interrupted + 1e-6 * n
    started = sum(res.migrations_by_outcome.values())
    assert res.migrations == res.migrations_by_outcome.get(Outcome.MIGRATED, 0) <= started
    assert sum(res.migrations_by_reason.values()) == res.migrations


def test_copy_time_is_the_kv_over_the_link() -> None:
    costs = MigrationCosts(link_bytes_per_s=1e9)
    assert costs.copy_seconds(H100, 1000) == pytest.approx(1000 * H100.kv_bytes_per_token / 1e9)
    doubled = replace(H100, kv_bytes_per_token=2 * H100.kv_bytes_per_token)
    assert costs.copy_seconds(doubled, 1000) == pytest.approx(2 * costs.copy_seconds(H100, 1000))
    unsized = replace(H100, kv_bytes_per_token=0)
    assert costs.copy_seconds(unsized, 1000) == pytest.approx(1000 * costs.default_kv_bytes_per_token / 1e9)
    with pytest.raises(ValueError):
        MigrationCosts(max_concurrent=0)


@settings(max_examples=30, deadline=None)
@given(
    reqs=st.lists(
        st.tuples(st.floats(0.0, 3.0), st.integers(1, 4000), st.integers(1, 1500)), min_size=1, max_size=30
    ),
    instances=st.integers(2, 3),
    strategy=st.sampled_from(list(Strategy)),
)
def test_every_request_finishes_once_with_its_tokens(
    reqs: list[tuple[float, int, int]], instances: int, strategy: Strategy
) -> None:
    reqs.sort()
    trace = Trace(
        "random",
        np.array([a for a, _, _ in reqs]),
        np.array([p for _, p, _ in reqs]),
        np.array([o for _, _, o in reqs]),
    )
    sim, res = run_static(trace, MigrationConfig(strategy=strategy), instances)
    assert_settled(sim, res, trace)


def test_conservation_holds_when_many_requests_move() -> None:
    """The property above on a workload where many moves happen (so that it has teeth)."""
    rng = np.random.default_rng(1)
    n = 30
    trace = Trace("random", np.sort(rng.uniform(0, 2, n)), rng.integers(1, 3000, n), rng.integers(1, 1500, n))
    sim, res = run_static(trace, MigrationConfig(), instances=3)
    assert res.migrations >= 10
    assert_settled(sim, res, trace)


def test_migration_relieves_an_overloaded_instance() -> None:
    """All work on one KV-exhausted instance beside an idle one: moving running requests to the idle
    one lets the queue start sooner and preempts less."""
    trace = burst(24, 1000, 1000)
    _, off = run_static(trace, None)
    sim, on = run_static(trace, MigrationConfig())
    assert off.migrations == 0 and off.migrations_by_outcome == {}
    assert on.migrations > 0 and on.migrations_by_reason.get("defragment", 0) > 0
    assert np.percentile(on.ttft, 99) < 0.5 * np.percentile(off.ttft, 99)
    assert on.preemptions < off.preemptions
    assert sim.instances[1].gen_tokens > 0
    assert_settled(sim, on, trace)


def test_the_downtime_shows_in_the_moved_requests_latency() -> None:
    """A longer downtime makes the moved requests' inter-token latency longer, nothing else."""
    trace = burst(24, 1000, 1000)
    _, fast = run_static(trace, MigrationConfig(), costs=MigrationCosts(downtime_s=0.0))
    _, slow = run_static(trace, MigrationConfig(), costs=MigrationCosts(downtime_s=2.0))
    assert slow.migrations > 0
    assert slow.itl.max() > fast.itl.max() + 1.0 / 1000


def test_a_request_finishing_during_its_copy_is_aborted_not_migrated() -> None:
    """On a link so slow that no copy ends before its request does, every migration aborts."""
    trace = burst(24, 1000, 1000)
    sim, res = run_static(trace, MigrationConfig(), costs=MigrationCosts(link_bytes_per_s=1e4))
    assert res.migrations == 0 and res.migrations_by_reason == {}
    assert res.migrations_by_outcome.get(Outcome.ABORTED_FINISHED, 0) > 0
    assert Outcome.MIGRATED not in res.migrations_by_outcome
    assert_settled(sim, res, trace)


class ScaleInAt(StaticAutoscaler):
    """Two instances, then one from `at_s` on, removing mixed-1."""

    def __init__(self, at_s: float) -> None:
        super().__init__(2)
        self.at_s = at_s

    def decide(self, obs: FleetObservation) -> ScaleDecision:
        n = 1 if obs.now_s >= self.at_s else 2
        cur = {Pool.MIXED: int(obs.replicas.get(Pool.MIXED, 0))}
        victims = {Pool.MIXED: ("mixed-1",)} if n < cur[Pool.MIXED] else {}
        return ScaleDecision(obs.now_s, cur, {Pool.MIXED: n}, {Pool.MIXED: "test"}, victims)


@pytest.mark.parametrize("migration", [None, MigrationConfig()])
def test_a_scale_in_victim_is_emptied_by_migration(migration: MigrationConfig | None) -> None:
    trace = burst(8, 500, 3000, over_s=0.5)
    cfg = SimConfig(
        calibration=H100, initial_replicas={Pool.MIXED: 2}, control_interval_s=1.0, migration=migration
    )
    sim = Simulator(trace, (), ScaleInAt(2.0), cfg)
    res = sim.run()
    victim = sim.instances[1]
    assert victim.gen_tokens > 0 and victim.stop_t >= 2.0
    if migration is None:
        # Its running interactive requests finish in place: it stays until they are done.
        assert victim.stop_t > 10.0 and res.migrations == 0
    else:
        assert victim.stop_t < 2.5
        assert res.migrations_by_reason == {"drain": res.migrations} and res.migrations > 0
        assert_settled(sim, res, trace)


# Chiron on a mixed trace with scale-ins and batch evictions, as the simulator produced it before
# migration was added (and with it off): migration=None must not change a single result.
PINNED_OFF = (8992, 6723, 800, 0, 29, 9, 0.8016666666666666, 8874.380208140945, 113.25177248793923, 460.0)


def test_off_is_what_the_simulator_did_before_migration() -> None:
    base = shape(load_trace("azure-conv"), start_s=300, duration_s=240, load_scale=8, seed=0)
    jobs = make_batch_jobs(
        jobs=2, requests_per_job=400, deadline_s=400, first_submit_s=0, last_submit_s=60,
        lengths_from=base, seed=0,
    )  # fmt: skip
    cfg = SimConfig(
        calibration=H100,
        slo=SloSpec(1.0, 0.1),
        initial_replicas={Pool.INTERACTIVE: 2, Pool.MIXED: 1},
        control_interval_s=2.0,
        migration=None,
    )
    r = Simulator(base, jobs, ChironAutoscaler(), cfg).run()
    got = (
        r.interactive_total, r.interactive_met, r.batch_on_time, r.preemptions, r.evictions,
        len(r.scale_events), r.gpu_hours, float(r.ttft.sum()), float(r.itl.sum()), r.duration_s,
    )  # fmt: skip
    assert got == PINNED_OFF
    assert r.migrations == 0 and r.migrations_by_outcome == {} and r.migrations_by_reason == {}


def test_cli_turns_migration_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "simulate", "--trace", "azure-conv", "--start", "600", "--duration", "60",
            "--load-scale", "4", "--capacity-rps", "16", "--concurrency", "20", "--policy",
            "static-peak,llumnix-freeness", "--migration", "--migration-strategy", "longest",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "live migration (longest)" in out and "m.fail" in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["static-peak", "llumnix-freeness"]
    assert rows[0]["gpu_hours_vs_static"] == 1.0
    for row in rows:
        outcomes = row["migrations_by_outcome"]
        assert row["migrations"] == outcomes.get("migrated", 0)
        assert row["migrations_aborted"] == sum(outcomes.values()) - row["migrations"]
