"""Real processes for the gateway tests: vLLM CPU servers and `slofleet gateway` subprocesses.

Every process starts in its own process group and is killed as a group (vLLM forks an EngineCore
and a Worker), so a failing test leaves no orphan behind. The tests kill engines on purpose
(stream resume) and the gateway (durable batch queue), hence the explicit kill/restart methods.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll `url` until 200; fail fast (with the log tail) if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")


def kill_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class VllmServer:
    """One vLLM OpenAI server on the CPU build with priority scheduling (what the gateway expects)."""

    model: Path
    log_dir: Path
    name: str
    max_num_seqs: int = 64
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"vllm-{self.name}.log"

    def start(self, timeout_s: float = 240.0) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_SERVER_DEV_MODE": "1",
        }
        cmd = [
            str(VENV_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--served-model-name", "tiny",
            "--port", str(self.port), "--max-model-len", "1024",
            "--scheduling-policy", "priority", "--max-num-seqs", str(self.max_num_seqs),
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_http_ok(f"{self.url}/health", timeout_s, self.proc, self.log)

    def kill(self) -> None:
        kill_group(self.proc)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class GatewayProcess:
    """`slofleet gateway` as a real subprocess (the CLI is what a deployment runs)."""

    args: list[str]
    log_dir: Path
    name: str = "gateway"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, timeout_s: float = 60.0) -> None:
        cmd = [
            str(VENV_BIN / "slofleet"),
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http_ok(f"{self.url}/health", timeout_s, self.proc, self.log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_group(self.proc, sig)
        self.proc = None
