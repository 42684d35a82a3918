"""Generate slofleet's Grafana dashboards (JSON, Grafana's dashboard schema) from one table.

    python deploy/grafana/generate.py          # rewrites deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check  # exit 1 when the committed JSON is stale

Why a generator: every panel of four dashboards shares the same datasource variable, label
selector and SLO thresholds; written by hand they drift. Why not grafanalib or the foundation SDK:
a 200-line table of panels is all this needs, and tests/test_dashboards.py reads the same
table (`DASHBOARDS`) to run every query against a real Prometheus.

Every series is filtered by `namespace` and `llmservice`. In a cluster these are target labels
(the PodMonitors in deploy/monitoring/ copy the pod's `slofleet.io/service` label into
`llmservice`; the operator's own series carry both and are scraped with honorLabels). Locally,
deploy/grafana/snapshot.py sets them in the scrape config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

# SLO thresholds the SLO panels and alert rules use. Each must be a bucket boundary of the gateway's
# latency histograms (gateway/metrics.py), since an attainment ratio reads one bucket.
TTFT_TARGET_SECONDS = 1.0
ITL_TARGET_SECONDS = 0.1
SLO_OBJECTIVE = 0.99

SEL = 'namespace=~"$namespace", llmservice=~"$llmservice"'
RATE = "$__rate_interval"


def le(value: float) -> str:
    """The `le` label value prometheus_client writes for a bucket bound (1.0 -> "1.0")."""
    return repr(float(value))


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | heatmap | stat
    description: str = ""
    # Thresholds drawn as lines (e.g. an SLO target), in the panel's unit.
    targets: tuple[float, ...] = ()
    # Why this panel may have no data while a local fleet replays a trace (None: it must have data).
    may_be_empty: str | None = None


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def rated(metric: str, by: str = "", fn: str = "rate") -> str:
    """`sum [by (...)] (fn(metric{selector}[$__rate_interval]))`."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({fn}({metric}{{{SEL}}}[{RATE}]))"


def quantiles(metric: str, extra: str = "", by: str = "") -> tuple[Query, ...]:
    grouping = f"le{', ' + by if by else ''}"
    sel = SEL + (", " + extra if extra else "")
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        q(
            f"histogram_quantile({p}, sum by ({grouping}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
            f"p{round(p * 100)}{suffix}",
        )
        for p in (0.5, 0.99)
    )


def attainment(metric: str, target: float) -> str:
    """Share of interactive requests within the target over the window (the SLI of the SLO)."""
    sel = f'{SEL}, request_class="interactive"'
    return (
        f'sum(rate({metric}_bucket{{{sel}, le="{le(target)}"}}[{RATE}]))'
        f" / sum(rate({metric}_count{{{sel}}}[{RATE}]))"
    )


NOT_LOCAL_RECONCILE = (
    "reconciles happen only in a cluster (kopf handlers); `slofleet up` runs the control loop "
    "without Kubernetes objects. The query still runs; tests/test_ops_operator_metrics.py runs the "
    "operator process against the kmock API emulator and reads the counted reconciles."
)
NO_SCALING = (
    "the replay's spec pins every pool (min = max), so the autoscaler never changes replicas in "
    "the replay: two vLLM processes are all the test machine can hold."
)
NO_MIGRATION = (
    "no migration is triggered during the replay (the local control loop has no rescheduler yet); "
    "tests/test_sidecar_migration*.py drive MigrateOut directly."
)
NO_MEMORY_ACTION = (
    "no drop/restore/standby command is issued during the replay (the memory planner is not in "
    "the control loop yet); the Memory gRPC service's tests drive the commands directly."
)

SERVICE = Dashboard(
    uid="slofleet-service",
    title="slofleet / Service",
    description="One LLMService as its users see it: traffic by class, SLO attainment, latency "
    "percentiles against the targets, batch queue and deadline slack.",
    panels=(
        Panel(
            "Requests by class and outcome",
            (
                q(
                    rated("slofleet_gateway_requests_total", "request_class, outcome"),
                    "{{request_class}} {{outcome}}",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Requests in flight",
            (
                q(
                    f"sum by (request_class) (slofleet_gateway_requests_in_flight{{{SEL}}})",
                    "{{request_class}}",
                ),
            ),
        ),
        Panel(
            "SLO attainment (interactive)",
            (
                q(
                    attainment("slofleet_gateway_time_to_first_token_seconds", TTFT_TARGET_SECONDS),
                    f"TTFT <= {TTFT_TARGET_SECONDS:g} s",
                ),
                q(
                    attainment("slofleet_gateway_inter_token_latency_seconds", ITL_TARGET_SECONDS),
                    f"ITL <= {ITL_TARGET_SECONDS * 1000:g} ms",
                ),
            ),
            unit="percentunit",
            targets=(SLO_OBJECTIVE,),
            description=f"Objective {SLO_OBJECTIVE:.0%}. Thresholds are the sample spec's; "
            "regenerate with other TTFT_TARGET_SECONDS/ITL_TARGET_SECONDS for yours.",
        ),
        Panel(
            "Time to first token vs target",
            quantiles("slofleet_gateway_time_to_first_token_seconds", by="request_class"),
            unit="s",
            targets=(TTFT_TARGET_SECONDS,),
        ),
        Panel(
            "Inter-token latency vs target",
            quantiles("slofleet_gateway_inter_token_latency_seconds", by="request_class"),
            unit="s",
            targets=(ITL_TARGET_SECONDS,),
        ),
        Panel(
            "Queue depth",
            (q(f"sum by (queue) (slofleet_gateway_queue_depth{{{SEL}}})", "{{queue}}"),),
            description="interactive: waiting in memory for a slot; batch: durable, not yet sent.",
        ),
        Panel(
            "Batch deadline slack",
            (q(f"min(slofleet_gateway_batch_deadline_slack_seconds{{{SEL}}})", "earliest deadline - now"),),
            unit="s",
            targets=(0.0,),
            description="Negative: a batch request is late. 0 while no batch request waits.",
        ),
        Panel(
            "Rejected (429) by class",
            (q(rated("slofleet_gateway_rejected_total", "request_class"), "{{request_class}}"),),
            unit="reqps",
            may_be_empty="requests are rejected only when the interactive queue is full; the replay "
            "stays below that load.",
        ),
    ),
)

FLEET = Dashboard(
    uid="slofleet-fleet",
    title="slofleet / Fleet",
    description="The instances of one LLMService: replicas per pool, load, freeness, KV usage, "
    "local limits and resident layers.",
    panels=(
        Panel(
            "Replicas per pool (desired)",
            (q(f"sum by (pool) (slofleet_operator_desired_replicas{{{SEL}}})", "{{pool}}"),),
        ),
        Panel(
            "Instances by phase",
            (
                q(f"sum by (phase) (slofleet_operator_instances{{{SEL}}})", "{{phase}}"),
                q(f"sum(slofleet_gateway_instances_ready{{{SEL}}})", "ready (gateway)"),
                q(f"sum(slofleet_instance_healthy{{{SEL}}})", "healthy (sidecars)"),
            ),
        ),
        Panel(
            "Standby instances",
            (q(f"sum(slofleet_memory_standby{{{SEL}}})", "standby"),),
            may_be_empty=NO_MEMORY_ACTION,
        ),
        Panel(
            "Running and waiting requests",
            (
                q(f"slofleet_instance_running_requests{{{SEL}}}", "running {{pod}}"),
                q(f"slofleet_instance_waiting_requests{{{SEL}}}", "waiting {{pod}}"),
            ),
        ),
        Panel(
            "Freeness per instance",
            (q(f"clamp_min(slofleet_instance_freeness_blocks{{{SEL}}}, -1)", "{{pod}}"),),
            kind="heatmap",
            description="Llumnix freeness (free KV blocks per running request); -1 stands for "
            "draining/unhealthy (-Inf).",
        ),
        Panel(
            "KV cache usage",
            (q(f"slofleet_instance_kv_usage_ratio{{{SEL}}}", "{{pod}}"),),
            unit="percentunit",
        ),
        Panel(
            "Local concurrency limit vs tracked requests",
            (
                q(f"slofleet_instance_concurrency_limit{{{SEL}}}", "limit {{pod}}"),
                q(f"slofleet_instance_tracked_requests{{{SEL}}}", "tracked {{pod}}"),
            ),
        ),
        Panel(
            "Layers resident",
            (
                q(
                    f"slofleet_instance_layers_resident{{{SEL}}}\n/ slofleet_instance_layers{{{SEL}}}",
                    "{{pod}}",
                ),
            ),
            unit="percentunit",
        ),
        Panel(
            "Token throughput",
            (
                q(f"sum(slofleet_instance_prompt_tokens_per_second{{{SEL}}})", "prompt"),
                q(f"sum(slofleet_instance_generation_tokens_per_second{{{SEL}}})", "generation"),
            ),
            unit="short",
        ),
    ),
)

ACTIONS = Dashboard(
    uid="slofleet-actions",
    title="slofleet / Actions",
    description="What the control plane did: scale events, drains, replacements, migrations and "
    "their downtime, parameter drops and restores.",
    panels=(
        Panel(
            "Scale events",
            (
                q(
                    rated("slofleet_operator_scale_events_total", "pool, direction", "increase"),
                    "{{pool}} {{direction}}",
                ),
            ),
            may_be_empty=NO_SCALING,
        ),
        Panel(
            "Drains before scale-in",
            (q(rated("slofleet_operator_drains_total", "result", "increase"), "{{result}}"),),
            may_be_empty=NO_SCALING,
        ),
        Panel(
            "Instance replacements",
            (q(rated("slofleet_operator_instance_replacements_total", fn="increase"), "replaced"),),
        ),
        Panel(
            "Migrations by outcome",
            (q(rated("slofleet_migrations_total", "outcome"), "{{outcome}}"),),
            unit="ops",
            may_be_empty=NO_MIGRATION,
        ),
        Panel(
            "Migration downtime (stop to commit)",
            quantiles("slofleet_migration_stop_seconds"),
            unit="s",
            may_be_empty=NO_MIGRATION,
        ),
        Panel(
            "Gateway resumes by reason (since gateway start)",
            # The raw counter, not rate(): the gateway creates a reason's series at its first resume,
            # so rate() would never see that first increase.
            (q(f"sum by (reason) (slofleet_gateway_resumes_total{{{SEL}}})", "{{reason}}"),),
            description="instance_lost: its engine died and the stream went on elsewhere (the "
            "snapshot replay kills one engine to show it); move: a migration.",
        ),
        Panel(
            "Layer drop / restore duration",
            (
                *quantiles("slofleet_memory_drop_seconds", by="command"),
                *quantiles("slofleet_memory_restore_seconds", by="command"),
            ),
            unit="s",
            may_be_empty=NO_MEMORY_ACTION,
        ),
        Panel(
            "Engine preemptions",
            (q(rated("slofleet_instance_preemptions_total", "pod"), "{{pod}}"),),
            unit="ops",
        ),
    ),
)

OPERATOR = Dashboard(
    uid="slofleet-operator",
    title="slofleet / Operator",
    description="The operator itself: reconciles and their errors, control-loop latency and errors, "
    "sidecar scrapes and refused gRPC calls.",
    panels=(
        Panel(
            "Reconciles by outcome",
            (q(rated("slofleet_operator_reconciles_total", "outcome"), "{{outcome}}"),),
            unit="ops",
            may_be_empty=NOT_LOCAL_RECONCILE,
        ),
        Panel(
            "Reconcile latency",
            quantiles("slofleet_operator_reconcile_duration_seconds"),
            unit="s",
            may_be_empty=NOT_LOCAL_RECONCILE,
        ),
        Panel(
            "Control-loop step latency",
            quantiles("slofleet_operator_control_loop_duration_seconds"),
            unit="s",
        ),
        Panel(
            "Control-loop errors",
            (q(rated("slofleet_operator_control_loop_errors_total"), "errors"),),
            unit="ops",
            description="Steps that raised; the next step retries. Zero when all is well.",
        ),
        Panel(
            "Engine scrape latency (sidecars)",
            quantiles("slofleet_instance_engine_scrape_duration_seconds"),
            unit="s",
        ),
        Panel(
            "Engine scrape errors and refused gRPC calls",
            (
                q(rated("slofleet_instance_engine_scrape_errors_total"), "scrape errors"),
                q(rated("slofleet_instance_grpc_auth_failures_total", "reason"), "auth {{reason}}"),
            ),
            unit="ops",
        ),
    ),
)

DASHBOARDS = (SERVICE, FLEET, ACTIONS, OPERATOR)


def variables() -> list[dict[str, object]]:
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def label_var(name: str, label: str, query: str) -> dict[str, object]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": ds,
            "query": {"query": query, "refId": name},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": False,
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "refresh": 1,
        },
        label_var("namespace", "Namespace", "label_values(slofleet_gateway_instances_ready, namespace)"),
        label_var(
            "llmservice",
            "LLMService",
            'label_values(slofleet_gateway_instances_ready{namespace=~"$namespace"}, llmservice)',
        ),
    ]


def panel_json(panel: Panel, index: int) -> dict[str, object]:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    width = 12
    steps: list[dict[str, object]] = [{"color": "green", "value": None}]
    steps += [{"color": "red", "value": t} for t in panel.targets]
    out: dict[str, object] = {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": ds,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "targets": [
            {"datasource": ds, "expr": qq.expr, "legendFormat": qq.legend, "refId": chr(ord("A") + i)}
            for i, qq in enumerate(panel.queries)
        ],
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if panel.targets else "off"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }
    if panel.kind == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": panel.unit}, "legend": {"show": True}}
    return out


def dashboard_json(d: Dashboard) -> dict[str, object]:
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["slofleet"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [
            {
                "title": "slofleet dashboards",
                "type": "dashboards",
                "tags": ["slofleet"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            },
        ],
        "panels": [panel_json(p, i) for i, p in enumerate(d.panels)],
    }


def render() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2) + "\n" for d in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed files are stale")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        extra = sorted({p.name for p in OUT.glob("*.json")} - set(files))
        if stale or extra:
            print(f"stale: {stale}, not generated: {extra}; run python deploy/grafana/generate.py")
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
