"""Run the dashboards against a live local fleet and plot what they show (docs/dashboard-*.png).

    python deploy/grafana/snapshot.py [--out docs] [--duration 30]

Starts `slofleet up` (two vLLM CPU instances of the generated tiny model, their sidecars, the
gateway and the control loop, with the operator's metrics served), a Prometheus (Debian package,
own temporary config, never the system service) that scrapes every sidecar, the gateway and the
operator metrics every second with the dashboards' rules loaded, replays a slice of the Azure
conversation trace through the gateway, then queries every panel of every dashboard over the
replay and plots each dashboard as one PNG. tests/test_ops_prometheus.py uses the same harness
(`live_fleet`) to prove that every query runs and returns data.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RULES = ROOT / "deploy" / "prometheus" / "slofleet.rules.yaml"
NAMESPACE = "local"

# Two instances pinned (min = max): two vLLM processes are what a 2-core CI machine holds, so the
# autoscaler is the static one here and scale panels stay empty (see generate.py: may_be_empty).
SPEC = """\
apiVersion: slofleet.io/v1alpha1
kind: LLMService
metadata: {name: ops}
spec:
  model: generated:tiny
  engine: {resources: {gpu: 0, cpu: "1", memory: 4Gi}, maxModelLen: 2048}
  replicas: {min: 2, max: 2, initial: 2}
  slo:
    interactive: {ttftSeconds: 1.0, itlMilliseconds: 100}
    batch: {deadlineMinutes: 30}
  autoscaling: {policy: static, intervalSeconds: 1}
"""
SERVICE = "ops"
REPLAY = ["--trace", "azure-conv", "--start", "600", "--load", "0.5", "--batch-fraction", "0.2"]
# `slofleet up` runs the operator's control loop in its own process; this serves that process's
# operator registry as `slofleet operator --metrics-port` does in a cluster.
LAUNCHER = (
    "import sys; from slofleet.operator.metrics import serve; serve(int(sys.argv[1]), '127.0.0.1'); "
    "from slofleet.cli import main; sys.exit(main(sys.argv[2:]))"
)
RATE_INTERVAL = "10s"


def dashboards() -> ModuleType:
    name = "slofleet_ops_grafana_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "generate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


class Fleet:
    """`slofleet up` as a subprocess in its own session; stop() sends SIGINT like Ctrl-C."""

    def __init__(self, workdir: Path) -> None:
        self.state_dir = workdir / "state"
        self.spec = workdir / "ops.yaml"
        self.spec.write_text(SPEC)
        self.operator_port = free_port()
        self.output: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self.operator_port),
             "up", "-f", str(self.spec), "--state-dir", str(self.state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "ready in" in line:
                self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("slofleet up did not become ready:\n" + "".join(self.output[-40:]))

    def state(self) -> dict[str, object]:
        return json.loads((self.state_dir / "state.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@dataclass
class Target:
    job: str
    url: str  # http://host:port/path
    labels: dict[str, str]
    honor_labels: bool = False


class Prometheus:
    """A Prometheus server of our own: temporary config and storage, a free port, 1 s scrapes."""

    def __init__(self, workdir: Path, targets: list[Target], rule_files: list[Path]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError(
                "prometheus (Debian package) is not installed: scripts/install-test-tools.sh"
            )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps(self._config(targets, rule_files), indent=1))  # JSON is YAML
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @staticmethod
    def _config(targets: list[Target], rule_files: list[Path]) -> dict[str, object]:
        jobs: dict[str, dict[str, object]] = {}
        for t in targets:
            u = urllib.parse.urlsplit(t.url)
            job = jobs.setdefault(
                t.job,
                {
                    "job_name": t.job,
                    "metrics_path": u.path,
                    "honor_labels": t.honor_labels,
                    "static_configs": [],
                },
            )
            job["static_configs"].append({"targets": [u.netloc], "labels": t.labels})  # type: ignore[union-attr]
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "2s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": list(jobs.values()),
        }

    def wait_targets_up(self, expected: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                data = json.loads(http_get(f"{self.url}/api/v1/targets"))["data"]["activeTargets"]
                last = json.dumps([(t["scrapeUrl"], t["health"], t["lastError"]) for t in data])
                if len(data) == expected and all(t["health"] == "up" for t in data):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"Prometheus targets not all up: {last}")

    def api(self, path: str, **params: str) -> dict[str, object]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = http_get(url, timeout=30)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            body = exc.read().decode()
        return json.loads(body)

    def query(self, expr: str, at: float) -> dict[str, object]:
        return self.api("query", query=expr, time=f"{at:.3f}")

    def query_range(self, expr: str, start: float, end: float, step: float = 2.0) -> dict[str, object]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@dataclass
class Live:
    """A replay that happened: where to query it and what each component exposed."""

    prometheus: Prometheus
    fleet: Fleet
    start: float
    end: float
    replay_output: str
    expositions: dict[str, str] = field(default_factory=dict)  # target url -> /metrics text

    def concrete(self, expr: str) -> str:
        """A dashboard expression as Grafana would send it for this fleet."""
        return (
            expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$namespace", NAMESPACE)
            .replace("$llmservice", SERVICE)
        )


def targets_of(fleet: Fleet) -> list[Target]:
    state = fleet.state()
    scope = {"namespace": NAMESPACE, "llmservice": SERVICE}
    out = [
        Target(
            "slofleet-sidecars",
            str(i["metrics"]),
            {**scope, "pod": str(i["instance_id"]), "pool": str(i["pool"])},
        )
        for i in state["instances"]  # type: ignore[union-attr]
        if i["phase"] == "ready"  # type: ignore[index]
    ]
    out.append(Target("slofleet-gateways", f"{state['gateway_url']}/metrics", {**scope, "pod": "gateway"}))
    # In a cluster the operator's series carry the LLMService's namespace and are scraped with
    # honorLabels; the local control loop has no namespace (its label is empty), so here the
    # target's labels must win: without honor_labels the empty label takes the target's value.
    out.append(Target("slofleet-operator", f"http://127.0.0.1:{fleet.operator_port}/metrics", scope))
    return out


@contextlib.contextmanager
def live_fleet(
    workdir: Path,
    duration: float = 30.0,
    ready_timeout: float = 600.0,
    kill_engine_after: float | None = 12.0,
) -> Iterator[Live]:
    """Fleet up, Prometheus scraping it, one replay of `duration` seconds done (with one engine
    killed `kill_engine_after` seconds in); everything stopped on exit (the fleet by SIGINT, as a
    user would)."""
    fleet = Fleet(workdir)
    prometheus: Prometheus | None = None
    try:
        fleet.wait_ready(ready_timeout)
        targets = targets_of(fleet)
        prometheus = Prometheus(workdir, targets, [RULES])
        prometheus.wait_targets_up(len(targets))
        time.sleep(3.0)  # a few idle scrapes before the load
        start = time.time()
        replay = subprocess.Popen(
            [sys.executable, "-m", "slofleet.cli", "replay", "--state-dir", str(fleet.state_dir),
             "--out", str(workdir / "replay"), "--duration", f"{duration:g}", *REPLAY],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if kill_engine_after is not None:
            # An instance failure is the one action a local fleet takes on its own: the gateway
            # resumes the victim's streams elsewhere and the control loop replaces it.
            time.sleep(kill_engine_after)
            victim = fleet.state()["instances"][0]  # type: ignore[index]
            os.killpg(int(victim["engine_pid"]), signal.SIGKILL)
        output, _ = replay.communicate(timeout=duration * 20 + 120)
        time.sleep(12.0)  # rate windows reach past the end, and the 30 s recording group runs
        end = time.time()
        expositions = {}
        for t in targets:
            with contextlib.suppress(OSError):  # the killed instance's sidecar is gone
                expositions[t.url] = http_get(t.url)
        yield Live(prometheus, fleet, start, end, output, expositions)
    finally:
        if prometheus is not None:
            prometheus.stop()
        fleet.stop()


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def plot(live: Live, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = dashboards()
    paths = []
    for d in gen.DASHBOARDS:
        cols = 2
        rows = math.ceil(len(d.panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(13, 3.1 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, d.panels, strict=False):
            series = []
            for query in panel.queries:
                result = live.prometheus.query_range(live.concrete(query.expr), live.start, live.end)
                for s in result.get("data", {}).get("result", []):  # type: ignore[union-attr]
                    xs = [float(t) - live.start for t, _ in s["values"]]
                    ys = [float(v) for _, v in s["values"]]
                    series.append((legend(query.legend, s["metric"]), xs, ys))
            if panel.kind == "heatmap" and series:
                width = max(len(xs) for _, xs, _ in series)
                grid = [ys + [math.nan] * (width - len(ys)) for _, _, ys in series]
                right = max(max(xs) for _, xs, _ in series)
                extent = (0.0, right, float(len(series)), 0.0)
                image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
                ax.set_yticks(
                    [i + 0.5 for i in range(len(series))], [name for name, _, _ in series], fontsize=7
                )
                fig.colorbar(image, ax=ax)
            else:
                for name, xs, ys in series:
                    ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], label=name, lw=1.2)
                for target in panel.targets:
                    ax.axhline(target, color="red", ls="--", lw=0.8)
                if series:
                    ax.legend(fontsize=7, loc="upper left")
            if not series:
                note = "no data in this replay\n(see may_be_empty in generate.py)"
                ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_title(f"{panel.title} [{panel.unit}]", fontsize=10)
            ax.set_xlabel("seconds since replay start", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(d.panels) :]:
            ax.axis("off")
        fig.suptitle(
            f"{d.title} — local fleet ({SERVICE}: 2 x vLLM CPU, generated:tiny), replay of azure-conv"
        )
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.97))
        path = out_dir / f"dashboard-{d.uid.removeprefix('slofleet-')}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, help="keep the fleet's logs and Prometheus data here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slofleet-snapshot-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        live = stack.enter_context(live_fleet(workdir, args.duration))
        print(live.replay_output)
        for path in plot(live, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
