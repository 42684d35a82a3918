"""The operator's metrics (operator/metrics.py): what the control loop and reconcile record, and
that the served page is what Prometheus accepts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from slofleet.operator import metrics as om


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = free_port()
    om.serve(port, "127.0.0.1")
    om.METRICS.loop("ns", "served").observe_targets({}, {"mixed": 1})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read()
    assert b'slofleet_operator_desired_replicas{llmservice="served",namespace="ns",pool="mixed"} 1.0' in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_operator_process_serves_reconcile_metrics(tmp_path: Path) -> None:
    """`slofleet operator --metrics-port P` (as deploy/monitoring/ runs it) against the kmock API
    emulator of tests/test_operator.py: after reconciling a sample, /metrics counts it."""
    import test_operator as t  # the operator tests' emulator and helpers (tests/ is on sys.path)

    async with t.emulator() as (server, url):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                    "users": [{"name": "tester", "user": {"token": "t0ken"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
                    "current-context": "kmock",
                }
            )
        )
        liveness, metrics_port = free_port(), free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "slofleet.cli", "operator", "-A", "--kubeconfig", str(kubeconfig),
            "--liveness", f"http://127.0.0.1:{liveness}/healthz", "--metrics-port", str(metrics_port),
            env={**os.environ, "SLOFLEET_IMAGE": "reg/x:1", "SLOFLEET_ENGINE_CPU_IMAGE": "reg/e:1"},
        )  # fmt: skip
        try:
            await t.user("POST", t.llms_url(url), t.sample())
            await t.until(lambda: t.owned(server) == t.OWNED, "every owned object", within=60)

            def reconciled() -> bytes | None:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                    body = resp.read()
                ok = (
                    f'slofleet_operator_reconciles_total{{llmservice="tiny",namespace="{t.NS}",outcome="ok"}}'
                )
                return body if ok.encode() in body else None

            body = await t.until(reconciled, "a counted reconcile", within=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert b"slofleet_operator_reconcile_duration_seconds_count" in body
    if shutil.which("promtool"):
        check = await asyncio.create_subprocess_exec(
            "promtool",
            "check",
            "metrics",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await check.communicate(body)
        assert check.returncode == 0, out.decode()
