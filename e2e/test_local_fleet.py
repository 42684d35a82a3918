"""Whole flows of `slofleet up` on this machine: real vLLM processes, sidecars, gateway, control loop.

One fleet (two instances of the generated tiny model) serves the module; the last test shuts it
down and proves no process outlived it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SPEC = """\
apiVersion: slofleet.io/v1alpha1
kind: LLMService
metadata: {name: e2e}
spec:
  model: generated:tiny
  engine: {resources: {gpu: 0, cpu: "1", memory: 4Gi}, maxModelLen: 2048}
  replicas: {min: 2, max: 2, initial: 2}
  slo:
    interactive: {ttftSeconds: 5.0, itlMilliseconds: 500}
    batch: {deadlineMinutes: 30}
  autoscaling: {policy: static, intervalSeconds: 1}
"""
REPLAY = ["--trace", "azure-conv", "--start", "600", "--duration", "30", "--load", "0.5"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slofleet.cli", *args]


class Fleet:
    def __init__(self, state_dir: Path, proc: subprocess.Popen[str]) -> None:
        self.state_dir = state_dir
        self.proc = proc
        self.output: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "ready in" in line:
                self.ready.set()

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("up")
    spec = root / "e2e.yaml"
    spec.write_text(SPEC)
    proc = subprocess.Popen(
        _cli("up", "-f", str(spec), "--state-dir", str(root / "state")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    f = Fleet(root / "state", proc)
    try:
        if not f.ready.wait(600):
            pytest.fail("slofleet up not ready in 600 s:\n" + "".join(f.output[-40:]))
        yield f
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _replay(fleet: Fleet, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cli("replay", "--state-dir", str(fleet.state_dir), "--out", str(out), *REPLAY),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _expected_count(fleet: Fleet) -> int:
    from slofleet.local.replay_cli import arrivals_from_trace

    arrivals, _ = arrivals_from_trace("azure-conv", 600, 30, 1.0, 0.5, 0.0, 2048, None, 0)
    return len(arrivals)


def _report_row(report: str, cls: str) -> list[str]:
    line = next(x for x in report.splitlines() if x.startswith(cls))
    return line.split()


def test_replay_completes_every_request_of_the_slice(fleet: Fleet, tmp_path: Path) -> None:
    result = _replay(fleet, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "report.txt").read_text()
    row = _report_row(report, "interactive")
    sent, done, failed = int(row[1]), int(row[2]), int(row[3])
    assert sent == _expected_count(fleet) > 20
    assert done == sent and failed == 0, report
    assert (tmp_path / "replay.png").stat().st_size > 10_000


def test_status_shows_instances_with_load_and_limits(fleet: Fleet) -> None:
    out = subprocess.run(_cli("status", "--state-dir", str(fleet.state_dir)), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("e2e-")]
    assert len(rows) == 2 and all(" ready " in r for r in rows), out.stdout


def test_killed_engine_loses_no_request_and_fleet_recovers(fleet: Fleet, tmp_path: Path) -> None:
    before = fleet.state()
    victim = before["instances"][0]
    replay = subprocess.Popen(
        _cli("replay", "--state-dir", str(fleet.state_dir), "--out", str(tmp_path), *REPLAY),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(8)
    os.killpg(int(victim["engine_pid"]), signal.SIGKILL)
    stdout, stderr = replay.communicate(timeout=900)
    assert replay.returncode == 0, stdout + stderr
    row = _report_row((tmp_path / "report.txt").read_text(), "interactive")
    assert int(row[2]) == int(row[1]) == _expected_count(fleet) and int(row[3]) == 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = fleet.state()
        ready = [i for i in state["instances"] if i["phase"] == "ready"]
        if len(ready) == 2 and victim["instance_id"] not in {i["instance_id"] for i in ready}:
            break
        time.sleep(2)
    else:
        pytest.fail(f"fleet did not return to 2 ready instances: {fleet.state()['instances']}")
    assert fleet.state()["counters"]["replacements"] >= 1


def _alive_in_sessions(session_ids: set[int]) -> list[str]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, sid = fields[0], int(fields[3])
        if sid in session_ids and state != "Z":
            alive.append(stat.parent.name)
    return alive


def test_shutdown_leaves_no_process(fleet: Fleet) -> None:
    sessions = set(fleet.state()["process_groups"])
    assert len(sessions) >= 5  # 2 engines + 2 sidecars + gateway (+ the replacement)
    fleet.proc.send_signal(signal.SIGINT)
    assert fleet.proc.wait(120) == 0
    assert any("stopped" in line for line in fleet.output)
    assert _alive_in_sessions(sessions) == []


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("spec: [unclosed", ":1:"),
        ("apiVersion: slofleet.io/v1alpha1\nkind: LLMService\nmetadata: {name: x}\n"
         "spec: {model: generated:tiny, replicas: {min: 3, max: 1}}\n", "spec.replicas"),
        ("apiVersion: slofleet.io/v1alpha1\nkind: LLMService\nmetadata: {name: x}\n"
         "spec: {model: generated:tiny, autoscaling: {policy: magic}}\n", "spec.autoscaling.policy"),
    ],
)  # fmt: skip
def test_bad_spec_file_exits_2_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run(_cli("up", "-f", str(path), "--state-dir", str(tmp_path / "s")),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert re.search(re.escape(field), out.stdout + out.stderr), out.stdout + out.stderr
