"""A real Prometheus server scrapes a real `slofleet sidecar` process (beside the shared vLLM):
PromQL finds the `slofleet_instance_*` series, and `promtool check metrics` accepts the page."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginectl import VllmServer, free_port

pytestmark = [
    pytest.mark.engine,
    pytest.mark.prometheus,
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("promtool")),
        reason="prometheus/promtool not installed (scripts/install-test-tools.sh installs them)",
    ),
]


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def _wait(url: str, ok, seconds: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            body = _get(url)
            if ok(body):
                return body
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def sidecar_metrics_url(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`slofleet sidecar` as its own process, token from a file like a mounted Secret."""
    tmp = tmp_path_factory.mktemp("sidecar")
    token_file = tmp / "token"
    token_file.write_text("prom-test-token\n")
    metrics_port = free_port()
    cmd = [
        sys.executable, "-m", "slofleet.cli", "sidecar", "--engine-url", vllm_server.url,
        "--instance-id", "prom-test", "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--token-file", str(token_file),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SLOFLEET_SIDECAR_TOKEN"}
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    log = tmp / "sidecar.log"
    with process(cmd, log, env) as proc:
        _wait(url, lambda body: "slofleet_instance_engine_info{" in body, 60, "sidecar metrics", proc, log)
        yield url


def test_promtool_accepts_the_sidecar_exposition(sidecar_metrics_url):
    page = _get(sidecar_metrics_url)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=page.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


SERIES = [
    'slofleet_instance_info{instance_id="prom-test",pool="mixed"}',
    "slofleet_instance_healthy",
    "slofleet_instance_running_requests",
    "slofleet_instance_waiting_requests",
    "slofleet_instance_kv_usage_ratio",
    "slofleet_instance_kv_blocks",
    "slofleet_instance_kv_free_blocks",
    "slofleet_instance_concurrency_limit",
    "slofleet_instance_freeness_blocks",
    "slofleet_instance_preemptions_total",
    "slofleet_instance_ttft_p99_seconds",
    "slofleet_instance_generation_tokens_per_second",
    "slofleet_instance_grpc_auth_failures_total",
    "slofleet_instance_engine_info",
]


def test_prometheus_scrapes_the_sidecar(sidecar_metrics_url, vllm_server, tmp_path):
    port = free_port()
    target = urllib.parse.urlparse(sidecar_metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: slofleet-sidecar\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    cmd = [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with process(cmd, log) as proc:
        _wait(base + "/-/ready", lambda _: True, 60, "prometheus ready", proc, log)

        def query(promql: str) -> list[dict]:
            body = json.loads(_get(base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
            assert body["status"] == "success", body
            return body["data"]["result"]

        deadline = time.monotonic() + 30
        while not query("slofleet_instance_healthy == 1") and time.monotonic() < deadline:
            time.sleep(0.5)
        for name in SERIES:
            assert query(name), f"PromQL {name} returned no data"
        (blocks,) = query("slofleet_instance_kv_blocks")
        engine_blocks = next(
            line
            for line in _get(vllm_server.url + "/metrics").splitlines()
            if line.startswith("vllm:cache_config_info")
        )
        assert f'num_gpu_blocks="{int(float(blocks["value"][1]))}"' in engine_blocks
        (info,) = query("slofleet_instance_engine_info")
        assert info["metric"]["engine_version"] and info["metric"]["kv_layout"]
        assert query("slofleet_instance_kv_free_blocks <= slofleet_instance_kv_blocks")
        targets = json.loads(_get(base + "/api/v1/targets"))["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
