"""Dashboards and rules against a real Prometheus scraping a local fleet under replayed load.

One module-scoped fleet (`slofleet up`: two vLLM CPU instances of the generated tiny model,
sidecars, gateway, control loop with the operator's metrics served) and one Prometheus of our own
(Debian package) scraping it every second with the rules loaded; a 30 s replay of the Azure
conversation trace runs before the tests (deploy/grafana/snapshot.py holds the harness, which
also draws docs/dashboard-*.png). Everything is stopped after the module (the fleet by SIGINT).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


SNAP = _load(ROOT / "deploy" / "grafana" / "snapshot.py", "slofleet_ops_grafana_snapshot")
DASH = SNAP.dashboards()
RULES = _load(ROOT / "deploy" / "prometheus" / "generate.py", "slofleet_ops_prometheus_generate")
NAME = re.compile(r"\bslofleet_[a-z0-9_]+\b")

if shutil.which("prometheus") is None or shutil.which("promtool") is None:
    pytest.skip("prometheus/promtool missing: scripts/install-test-tools.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with SNAP.live_fleet(tmp_path_factory.mktemp("ops")) as live:
        yield live


def _result(live: object, expr: str) -> list[dict[str, object]]:
    """Instant query at the end of the replay, over its whole span (so rate windows see it)."""
    response = live.prometheus.query_range(live.concrete(expr), live.start, live.end)  # type: ignore[attr-defined]
    assert response["status"] == "success", f"{expr}\n{response}"
    return response["data"]["result"]  # type: ignore[index,return-value]


def _has_values(result: list[dict[str, object]]) -> bool:
    return any(v != "NaN" for series in result for _, v in series["values"])  # type: ignore[attr-defined]


def test_replay_went_through_the_fleet(live: object) -> None:
    text = live.replay_output  # type: ignore[attr-defined]
    assert "replaying" in text, text
    assert re.search(r"interactive", text), text


@pytest.mark.parametrize("component", ["sidecar", "gateway", "operator"])
def test_promtool_checks_each_live_exposition(live: object, component: str) -> None:
    pages = {
        url: body
        for url, body in live.expositions.items()  # type: ignore[attr-defined]
        if {
            "sidecar": "slofleet_instance_",
            "gateway": "slofleet_gateway_",
            "operator": "slofleet_operator_",
        }[component]
        in body
    }
    assert pages, f"no {component} exposition scraped"
    for url, body in pages.items():
        result = subprocess.run(["promtool", "check", "metrics"], input=body.encode(), capture_output=True)
        assert result.returncode == 0, f"{url}: {(result.stdout + result.stderr).decode()}"


def _panels() -> list[tuple[str, object, object]]:
    return [(f"{d.uid}/{p.title}", d, p) for d in DASH.DASHBOARDS for p in d.panels]


@pytest.mark.parametrize("where,dashboard,panel", _panels(), ids=[w for w, _, _ in _panels()])
def test_every_panel_query_runs_and_returns_data(
    live: object, where: str, dashboard: object, panel: object
) -> None:
    results = [_result(live, q.expr) for q in panel.queries]  # type: ignore[attr-defined]
    if panel.may_be_empty:  # type: ignore[attr-defined]
        return  # the queries ran (status success above); why no data is allowed is in generate.py
    assert any(_has_values(r) for r in results), f"{where}: no data during the replay"


def test_template_variables_find_the_fleet(live: object) -> None:
    prom = live.prometheus  # type: ignore[attr-defined]
    namespaces = prom.api("label/namespace/values", **{"match[]": "slofleet_gateway_instances_ready"})
    assert SNAP.NAMESPACE in namespaces["data"]
    services = prom.api(
        "label/llmservice/values",
        **{"match[]": f'slofleet_gateway_instances_ready{{namespace="{SNAP.NAMESPACE}"}}'},
    )
    assert services["data"] == [SNAP.SERVICE]


def test_every_rule_expression_runs_and_prometheus_evaluates_the_rules(live: object) -> None:
    for group in RULES.groups():
        for rule in group["rules"]:
            _result(live, rule["expr"])
    loaded = live.prometheus.api("rules")["data"]["groups"]  # type: ignore[attr-defined]
    rules = [r for g in loaded for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in RULES.groups())
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    # the replay's interactive requests are enough for the SLI recording rules to have a value
    assert _has_values(_result(live, "slofleet:ttft_error_ratio:rate5m"))


def test_dashboards_name_only_metrics_the_fleet_exposes(live: object) -> None:
    """Names the live pages expose, plus the migration/memory families the code defines but this
    fleet's sidecars do not serve yet, cover every name the dashboards and rules use."""
    exposed = set()
    for body in live.expositions.values():  # type: ignore[attr-defined]
        exposed |= {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and line[0] != "#"}
        for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.M):
            name, kind = kind_line
            exposed |= {f"{name}_total"} if kind == "counter" and not name.endswith("_total") else set()
            if kind == "histogram":
                exposed |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    used = {
        n
        for d in DASH.DASHBOARDS
        for p in d.panels
        if not p.may_be_empty
        for q in p.queries
        for n in NAME.findall(q.expr)
    }
    assert used - exposed == set()
