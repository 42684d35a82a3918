"""The operator's metrics (operator/metrics.py): what the control loop and reconcile record, and
that the served page is what Prometheus accepts."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from slofleet.operator import metrics as om


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_targets_count_scale_events_by_direction_and_set_desired_replicas() -> None:
    m = om.OperatorMetrics()
    loop = om.LoopMetrics(m, "ns", "svc")
    loop.observe_targets({"mixed": 1, "interactive": 2}, {"mixed": 3, "interactive": 2})
    loop.observe_targets({"mixed": 3, "interactive": 2}, {"mixed": 2, "interactive": 2})
    r = m.registry
    scope = {"namespace": "ns", "llmservice": "svc"}
    assert value(r, "slofleet_operator_scale_events_total", **scope, pool="mixed", direction="up") == 1
    assert value(r, "slofleet_operator_scale_events_total", **scope, pool="mixed", direction="down") == 1
    assert (
        value(r, "slofleet_operator_scale_events_total", **scope, pool="interactive", direction="up") is None
    )
    assert value(r, "slofleet_operator_desired_replicas", **scope, pool="mixed") == 2
    assert value(r, "slofleet_operator_desired_replicas", **scope, pool="interactive") == 2


def test_fleet_phases_that_vanish_drop_to_zero() -> None:
    m = om.OperatorMetrics()
    loop = om.LoopMetrics(m, "ns", "svc")
    loop.observe_fleet({("mixed", "ready"): 2, ("mixed", "starting"): 1})
    loop.observe_fleet({("mixed", "ready"): 3})
    scope = {"namespace": "ns", "llmservice": "svc", "pool": "mixed"}
    assert value(m.registry, "slofleet_operator_instances", **scope, phase="ready") == 3
    assert value(m.registry, "slofleet_operator_instances", **scope, phase="starting") == 0


def test_loop_series_exist_before_anything_happens() -> None:
    """Errors and replacements start at 0, so that rate() panels show 0, not 'no data'."""
    m = om.OperatorMetrics()
    om.LoopMetrics(m, "ns", "svc")
    scope = {"namespace": "ns", "llmservice": "svc"}
    assert value(m.registry, "slofleet_operator_control_loop_errors_total", **scope) == 0
    assert value(m.registry, "slofleet_operator_instance_replacements_total", **scope) == 0


@dataclass
class _Outcome:
    invalid: tuple[str, str] | None = None


async def test_reconcile_outcomes_are_counted_and_timed() -> None:
    calls = {"n": 0}

    @om.observe_reconcile
    async def reconcile(kube: object, namespace: str, name: str) -> _Outcome:
        calls["n"] += 1
        if name == "broken":
            raise RuntimeError("API down")
        return _Outcome(("InvalidSpec", "spec.model: required") if name == "bad" else None)

    before = {
        o: value(
            om.METRICS.registry, "slofleet_operator_reconciles_total", namespace="t", llmservice=n, outcome=o
        )
        or 0
        for o, n in (("ok", "good"), ("invalid", "bad"), ("error", "broken"))
    }
    assert (await reconcile(None, "t", "good")).invalid is None
    assert (await reconcile(None, "t", "bad")).invalid is not None
    with pytest.raises(RuntimeError):
        await reconcile(None, "t", "broken")
    for outcome, name in (("ok", "good"), ("invalid", "bad"), ("error", "broken")):
        now = value(om.METRICS.registry, "slofleet_operator_reconciles_total", namespace="t", llmservice=name,
                    outcome=outcome)  # fmt: skip
        assert now == before[outcome] + 1, outcome
    assert value(om.METRICS.registry, "slofleet_operator_reconcile_duration_seconds_count",
                 namespace="t", llmservice="good") >= 1  # fmt: skip
    assert calls["n"] == 3


def test_control_loop_labels_namespace_and_name_apart() -> None:
    from slofleet.operator.control_loop import ControlLoop
    from slofleet.policies.baselines import StaticAutoscaler

    async def sink(_: object) -> None:
        return None

    loop = ControlLoop("prod/llama", None, StaticAutoscaler(1), None, None, sink)  # type: ignore[arg-type]
    assert loop.metrics.duration is om.METRICS.loop_duration.labels("prod", "llama")
    local = ControlLoop("tiny", None, StaticAutoscaler(1), None, None, sink)  # type: ignore[arg-type]
    assert local.metrics.duration is om.METRICS.loop_duration.labels("", "tiny")


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing: scripts/install-test-tools.sh"
)
def test_served_page_passes_promtool() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    om.serve(port, "127.0.0.1")
    om.METRICS.loop("ns", "served").observe_targets({}, {"mixed": 1})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read()
    assert b'slofleet_operator_desired_replicas{llmservice="served",namespace="ns",pool="mixed"} 1.0' in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
