"""Monitoring artefacts without a fleet: generated files up to date, rules valid for promtool,
every metric name they query exported by the code, manifests rendered and scanned (checkov).

The live counterpart (every query against a real Prometheus scraping a replaying local fleet) is
tests/test_ops_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NAME = re.compile(r"\bslofleet_[a-z0-9_]+\b")


def load(path: Path) -> ModuleType:
    name = f"slofleet_ops_{path.parent.name}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


DASH = load(DEPLOY / "grafana" / "generate.py")
RULES = load(DEPLOY / "prometheus" / "generate.py")


def code_registries() -> dict[str, CollectorRegistry]:
    """Every registry the code defines, as each component builds it (no engine needed)."""
    from slofleet.gateway.metrics import GatewayMetrics
    from slofleet.operator.metrics import OperatorMetrics
    from slofleet.sidecar.exporter import SidecarMetrics
    from slofleet.sidecar.memory.service import MemoryMetrics
    from slofleet.sidecar.migration.service import MigrationMetrics
    from slofleet.sidecar.state import SidecarState

    migration, memory = CollectorRegistry(), CollectorRegistry()
    MigrationMetrics(migration)
    MemoryMetrics(memory)
    return {
        "gateway": GatewayMetrics().registry,
        "operator": OperatorMetrics().registry,
        "sidecar": SidecarMetrics(SidecarState("probe", concurrency_limit=4)).registry,
        "migration": migration,
        "memory": memory,
    }


def sample_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry can expose, including those of label sets not yet used."""
    out: set[str] = set()
    for family in registry.collect():
        kind, base = family.type, family.name
        if kind == "counter":
            out |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            out |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            out.add(base)
    return out


def exported_by_code() -> set[str]:
    return set().union(*(sample_names(r) for r in code_registries().values()))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every template variable of every dashboard."""
    out = []
    for d in DASH.DASHBOARDS:
        data = DASH.dashboard_json(d)
        for var in data["templating"]["list"]:
            if var["type"] == "query":
                out.append((f"{d.uid} variable {var['name']}", var["definition"]))
        for panel in data["panels"]:
            out += [(f"{d.uid} / {panel['title']}", t["expr"]) for t in panel["targets"]]
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in RULES.groups()
        for rule in group["rules"]
    ]


def unknown_names(exprs: list[tuple[str, str]], exported: set[str]) -> dict[str, set[str]]:
    found = {where: set(NAME.findall(expr)) - exported for where, expr in exprs}
    return {where: names for where, names in found.items() if names}


def test_generated_files_are_up_to_date() -> None:
    assert DASH.main(["--check"]) == 0, "run: python deploy/grafana/generate.py"
    assert RULES.main(["--check"]) == 0, "run: python deploy/prometheus/generate.py"
    plain = yaml.safe_load((DEPLOY / "prometheus" / "slofleet.rules.yaml").read_text())
    crd = yaml.safe_load((DEPLOY / "prometheus" / "prometheusrule" / "prometheusrule.yaml").read_text())
    assert crd["spec"]["groups"] == plain["groups"]


def test_every_queried_metric_is_exported_by_the_code() -> None:
    exported = exported_by_code()
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) > 40
    assert unknown_names(exprs, exported) == {}
    # The check itself can fail: a dashboard naming a metric nobody exports is reported.
    bogus = [("a panel", 'sum(rate(slofleet_gateway_requestz_total{namespace="x"}[5m]))')]
    assert unknown_names(bogus, exported) == {"a panel": {"slofleet_gateway_requestz_total"}}


def test_dashboards_use_the_variables() -> None:
    for d in DASH.DASHBOARDS:
        data = json.loads((DEPLOY / "grafana" / "dashboards" / f"{d.uid}.json").read_text())
        names = [v["name"] for v in data["templating"]["list"]]
        assert names == ["datasource", "namespace", "llmservice"], d.uid
        assert data["panels"], d.uid
        for panel in data["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                for name in NAME.findall(target["expr"]):
                    # each selector of each metric is templated, so the variables filter every line
                    assert re.search(rf"{name}\{{namespace=~\"\$namespace\", llmservice=~\"\$llmservice\"",
                                     target["expr"]), (panel["title"], name)  # fmt: skip
    titles = {d.title for d in DASH.DASHBOARDS}
    assert titles == {"slofleet / Service", "slofleet / Fleet", "slofleet / Actions", "slofleet / Operator"}


def test_slo_thresholds_are_gateway_bucket_bounds() -> None:
    from slofleet.gateway.metrics import _LATENCY_BUCKETS

    assert DASH.TTFT_TARGET_SECONDS in _LATENCY_BUCKETS
    assert DASH.ITL_TARGET_SECONDS in _LATENCY_BUCKETS


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section() -> None:
    text = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^## (.+)$", text, flags=re.M)}
    alerts = [r for g in RULES.groups() for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RULES.RUNBOOKS + "#")
        assert url.split("#", 1)[1] in anchors, rule["alert"]
        assert rule["alert"] in text, f"{rule['alert']} is not named in docs/runbooks.md"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: scripts/install-test-tools.sh"
)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    for path in (DEPLOY / "prometheus" / "slofleet.rules.yaml",):
        result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_fire_the_alerts() -> None:
    """deploy/prometheus/tests.yaml feeds series through the rules and expects each alert."""
    tests = DEPLOY / "prometheus" / "tests.yaml"
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, cwd=tests.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fired = set(re.findall(r"alertname=\"(\w+)\"", tests.read_text()))
    alerts = {r["alert"] for g in RULES.groups() for r in g["rules"] if "alert" in r}
    assert fired == alerts, f"alerts without a promtool test: {sorted(alerts - fired)}"


@needs_promtool
@pytest.mark.parametrize(
    "component",
    [
        "gateway",
        "operator",
        "sidecar",
        "migration",
        "memory",
    ],
)
def test_promtool_checks_each_exposition_from_code(component: str) -> None:
    body = generate_latest(code_registries()[component])
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


KUBECTL = shutil.which("kubectl")
OVERLAYS = {
    "deploy": DEPLOY,
    "monitoring": DEPLOY / "monitoring",
    "monitoring-plain": DEPLOY / "monitoring" / "plain",
}


def kustomize(path: Path) -> list[dict[str, object]]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (renders kustomize)")
def test_overlays_render_with_and_without_prometheus_operator_objects() -> None:
    kinds = {name: {d["kind"] for d in kustomize(path)} for name, path in OVERLAYS.items()}
    monitors = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert monitors <= kinds["monitoring"]
    assert not monitors & kinds["monitoring-plain"]
    assert not monitors & kinds["deploy"]
    plain = {
        d["metadata"]["name"]: d for d in kustomize(OVERLAYS["monitoring-plain"]) if d["kind"] == "ConfigMap"
    }
    rules = yaml.safe_load(plain["slofleet-prometheus-rules"]["data"]["slofleet.rules.yaml"])
    assert rules["groups"] == RULES.groups()
    scrape = yaml.safe_load(plain["slofleet-prometheus-scrape"]["data"]["scrape-configs.yaml"])
    assert {j["job_name"] for j in scrape["scrape_configs"]} == {
        "slofleet-operator", "slofleet-sidecars", "slofleet-gateways",
    }  # fmt: skip
    for name in ("monitoring", "monitoring-plain"):
        docs = kustomize(OVERLAYS[name])
        dashboards = next(d for d in docs if d["metadata"]["name"] == "slofleet-dashboards")
        assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert len(dashboards["data"]) == len(DASH.DASHBOARDS)
        operator = next(d for d in docs if d["kind"] == "Deployment")
        ports = {
            p["name"]: p["containerPort"]
            for p in operator["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["metrics"] == 8081
        assert "--metrics-port=8081" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (renders kustomize)")
def test_monitors_select_what_the_operator_renders() -> None:
    """The PodMonitors select the labels and port names operator/render.py gives its pods."""
    from slofleet.operator import render

    docs = {d["metadata"]["name"]: d for d in kustomize(OVERLAYS["monitoring"]) if d["kind"] == "PodMonitor"}
    sidecars, gateways = docs["slofleet-sidecars"]["spec"], docs["slofleet-gateways"]["spec"]
    assert sidecars["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == render.MANAGED_BY
    assert gateways["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == render.MANAGED_BY
    assert render.SERVICE_LABEL == "slofleet.io/service"
    source = Path(render.__file__).read_text()
    assert '{"name": "metrics", "containerPort": SIDECAR_METRICS_PORT' in source
    assert '"ports": [{"name": "http", "containerPort": GATEWAY_HTTP_PORT' in source
    assert sidecars["podMetricsEndpoints"][0]["port"] == "metrics"
    assert gateways["podMetricsEndpoints"][0]["port"] == "http"


def checkov_binary() -> str | None:
    for candidate in (
        os.environ.get("SLOFLEET_CHECKOV"),
        shutil.which("checkov"),
        str(Path.home() / ".cache" / "slofleet" / "checkov-venv" / "bin" / "checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (renders kustomize)")
def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    """checkov's free tier reports no severities, so every failed check counts: each must be fixed or
    skipped in the manifest with a reason (checkov.io/skipN annotations)."""
    checkov = checkov_binary()
    if checkov is None:
        pytest.skip("checkov missing: install it in its own venv (see docs/monitoring.md)")
    for name, path in OVERLAYS.items():
        (tmp_path / f"{name}.yaml").write_text(
            subprocess.run(
                [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, check=True
            ).stdout
        )
    result = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{f['check_id']} {f['resource']} ({f['file_path']}): {f['check_name']}"
        for r in reports
        for f in r["results"]["failed_checks"]
    ]
    assert failed == []
    summary = reports[0]["summary"]
    assert summary["resource_count"] > 30 and summary["passed"] > 100
    # every skip carries a reason
    for r in reports:
        for s in r["results"].get("skipped_checks", []):
            assert len(s.get("suppress_comment") or "") > 20, s["check_id"]


def test_gitops_snippets_parse_and_ignore_what_the_scale_subresource_writes() -> None:
    text = (ROOT / "docs" / "gitops.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    assert len(blocks) >= 3
    app = next(d for d in docs if d.get("kind") == "Application")
    pointers = [p for rule in app["spec"]["ignoreDifferences"] for p in rule.get("jsonPointers", [])]
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    crd = yaml.safe_load(next((ROOT / "crds").glob("*.yaml")).read_text())
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert "/" + scale["specReplicasPath"].lstrip(".").replace(".", "/") in pointers
    assert all(
        d["kind"] == "Kustomization" for d in docs if d.get("apiVersion", "").startswith("kustomize.toolkit")
    )
