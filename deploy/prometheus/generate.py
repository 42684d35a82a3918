"""Generate slofleet's Prometheus alert and recording rules, in two shapes from one table.

    python deploy/prometheus/generate.py          # rewrites the files below
    python deploy/prometheus/generate.py --check  # exit 1 when the committed files are stale

- `slofleet.rules.yaml`: a plain rules file (`rule_files:` of any Prometheus; the ConfigMap that
  deploy/monitoring-plain/ ships);
- `prometheusrule/prometheusrule.yaml`: the same groups as a PrometheusRule for the Prometheus
  operator (deploy/monitoring/).

Every alert links its runbook section in docs/runbooks.md (tests check that each one exists).
SLO thresholds come from deploy/grafana/generate.py, so the dashboards and the alerts agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PLAIN = HERE / "slofleet.rules.yaml"
CRD = HERE / "prometheusrule" / "prometheusrule.yaml"
RUNBOOKS = "https://github.com/slofleet/slofleet/blob/main/docs/runbooks.md"


def _dashboards():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "slofleet_dashboards", HERE.parent / "grafana" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


D = _dashboards()
BY = "namespace, llmservice"
SVC = "{{ $labels.namespace }}/{{ $labels.llmservice }}"
BUDGET = round(1.0 - D.SLO_OBJECTIVE, 6)
# Multiwindow, multi-burn-rate alerts (Google SRE workbook, ch. 5): a fast burn pages when 2 % of
# a 30-day budget goes in an hour, a slow burn tickets when 5 % goes in six hours.
BURN = (
    ("Fast", 14.4, "5m", "1h", "critical", "2m"),
    ("Slow", 6.0, "30m", "6h", "warning", "15m"),
)
SLIS = (
    (
        "TTFT",
        "ttft",
        "slofleet_gateway_time_to_first_token_seconds",
        D.TTFT_TARGET_SECONDS,
        "time to first token",
    ),
    (
        "ITL",
        "itl",
        "slofleet_gateway_inter_token_latency_seconds",
        D.ITL_TARGET_SECONDS,
        "inter-token latency",
    ),
)
WINDOWS = sorted({w for b in BURN for w in b[2:4]}, key=lambda w: (w[-1], int(w[:-1])))


def runbook(anchor: str) -> str:
    return f"{RUNBOOKS}#{anchor}"


def recording_rules() -> list[dict[str, object]]:
    """Error ratio of each SLI per LLMService and window: share of interactive requests (or token
    gaps) over the target. One series per window keeps each alert's expression short."""
    out: list[dict[str, object]] = []
    for _, key, metric, target, _ in SLIS:
        sel = 'request_class="interactive"'
        for w in WINDOWS:
            good = f'sum by ({BY}) (rate({metric}_bucket{{{sel}, le="{D.le(target)}"}}[{w}]))'
            total = f"sum by ({BY}) (rate({metric}_count{{{sel}}}[{w}]))"
            out.append({"record": f"slofleet:{key}_error_ratio:rate{w}", "expr": f"1 - ({good} / {total})"})
    return out


def burn_alerts() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for name, key, _, target, what in SLIS:
        for speed, factor, short, long, severity, for_ in BURN:
            threshold = round(factor * BUDGET, 6)
            out.append(
                {
                    "alert": f"Slofleet{name}BudgetBurn{speed}",
                    "expr": (
                        f"slofleet:{key}_error_ratio:rate{short} > {threshold}\n"
                        f"and\nslofleet:{key}_error_ratio:rate{long} > {threshold}"
                    ),
                    "for": for_,
                    "labels": {"severity": severity, "slo": key},
                    "annotations": {
                        "summary": f"LLMService {SVC} burns its {what} error budget {factor:g}x too fast",
                        "description": f"Over {short} and {long}, more than {threshold:.2%} of interactive "
                        f"requests missed {what} <= {target:g} s (objective {D.SLO_OBJECTIVE:.0%}). "
                        "Now: {{ $value | humanizePercentage }}.",
                        "runbook_url": runbook("slo-budget-burn"),
                    },
                }
            )
    return out


def service_alerts() -> list[dict[str, object]]:
    failing = 'outcome=~"peer_failed|recompute|source_lost"'

    def flaps(direction: str) -> str:
        events = f'slofleet_operator_scale_events_total{{direction="{direction}"}}'
        return f"(sum by ({BY}, pool) (increase({events}[30m])) >= 2)"

    return [
        {
            "alert": "SlofleetAutoscalerFlapping",
            "expr": (f"{flaps('up')}\nand\n{flaps('down')}"),
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Pool {{ $labels.pool }} of {{ $labels.namespace }}/{{ $labels.llmservice }} "
                "scaled up and down repeatedly in 30 minutes",
                "description": "Each flap restarts engines (minutes of cold start) and drains requests. "
                "Raise spec.autoscaling.scaleDownStabilizationSeconds or widen the pool's bounds.",
                "runbook_url": runbook("autoscaler-flapping"),
            },
        },
        {
            "alert": "SlofleetMigrationsFailing",
            "expr": (
                f"sum by ({BY}) (rate(slofleet_migrations_total{{{failing}}}[15m]))\n"
                f"/ sum by ({BY}) (rate(slofleet_migrations_total[15m])) > 0.1"
            ),
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"More than 10 % of migrations of {SVC} fail",
                "description": "Failed migrations fall back to recompute (longer stalls for clients) or "
                "leave load where it is. Share failing now: {{ $value | humanizePercentage }}.",
                "runbook_url": runbook("migrations-failing"),
            },
        },
        {
            "alert": "SlofleetInstanceUnhealthy",
            "expr": "slofleet_instance_healthy == 0 and slofleet_instance_draining == 0",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Instance {{ $labels.pod }} of {{ $labels.namespace }}/{{ $labels.llmservice }} "
                "has been unhealthy for 5 minutes",
                "description": "Its sidecar cannot reach the engine's /health or /metrics; the gateway "
                "sends it nothing and the control loop replaces it when its pod fails.",
                "runbook_url": runbook("instance-unhealthy"),
            },
        },
        {
            "alert": "SlofleetInstanceDown",
            "expr": 'up{llmservice!=""} == 0',
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Prometheus cannot scrape {{ $labels.instance }} of "
                "{{ $labels.namespace }}/{{ $labels.llmservice }}",
                "description": "A sidecar or gateway of the service does not answer /metrics.",
                "runbook_url": runbook("instance-unhealthy"),
            },
        },
        {
            "alert": "SlofleetNoReadyInstances",
            "expr": "slofleet_gateway_instances_ready == 0",
            "for": "2m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": f"The gateway of {SVC} has no ready instance",
                "description": "Interactive requests queue and then get 429; batch requests wait.",
                "runbook_url": runbook("instance-unhealthy"),
            },
        },
        {
            "alert": "SlofleetBatchDeadlineAtRisk",
            "expr": (
                f"min by ({BY}) (slofleet_gateway_batch_deadline_slack_seconds) < 300\n"
                f'and on ({BY}) sum by ({BY}) (slofleet_gateway_queue_depth{{queue="batch"}}) > 0'
            ),
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Batch requests of {{ $labels.namespace }}/{{ $labels.llmservice }} are due "
                "within 5 minutes and still queued",
                "description": "Earliest deadline minus now: {{ $value | humanizeDuration }} "
                "(negative: late).",
                "runbook_url": runbook("batch-deadline-at-risk"),
            },
        },
    ]


def operator_alerts() -> list[dict[str, object]]:
    return [
        {
            "alert": "SlofleetReconcileErrors",
            "expr": (
                f'sum by ({BY}) (increase(slofleet_operator_reconciles_total{{outcome="error"}}[15m])) > 0'
            ),
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Reconciling {{ $labels.namespace }}/{{ $labels.llmservice }} keeps failing",
                "description": "The operator retries; until it succeeds, spec changes do not take effect.",
                "runbook_url": runbook("operator-errors"),
            },
        },
        {
            "alert": "SlofleetControlLoopErrors",
            "expr": f"sum by ({BY}) (increase(slofleet_operator_control_loop_errors_total[10m])) > 2",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"The control loop of {SVC} keeps failing",
                "description": "No autoscaling, draining or replacement happens while steps fail.",
                "runbook_url": runbook("operator-errors"),
            },
        },
    ]


def groups() -> list[dict[str, object]]:
    return [
        {"name": "slofleet.slo.recording", "interval": "30s", "rules": recording_rules()},
        {"name": "slofleet.slo.alerts", "rules": burn_alerts()},
        {"name": "slofleet.service.alerts", "rules": service_alerts()},
        {"name": "slofleet.operator.alerts", "rules": operator_alerts()},
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks: readable in review and in `kubectl get -o yaml`."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> dict[Path, str]:
    header = "# Generated by deploy/prometheus/generate.py from one table; edit that, not this file.\n"
    plain = header + yaml.dump({"groups": groups()}, Dumper=_Dumper, sort_keys=False, width=200)
    crd = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "slofleet",
            "labels": {"app.kubernetes.io/name": "slofleet", "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": groups()},
    }
    return {PLAIN: plain, CRD: header + yaml.dump(crd, Dumper=_Dumper, sort_keys=False, width=200)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed files are stale")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {stale}; run python deploy/prometheus/generate.py")
            return 1
        return 0
    for path, text in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
