"""Start and stop real vLLM CPU servers for tests and benchmarks (shared by every helper).

A vLLM server is three processes (API server, engine core, worker) and ~3.4 GB; leaking one on a
2-core machine starves everything after it. So each server runs in its own process group (one
`killpg` takes all three), logs to a file that failures quote, and is stopped by `stop()`,
`with`, at interpreter exit, or when this process is sent SIGTERM/SIGHUP (as `timeout` or a CI
runner does; Python's exit hooks do not run then, and engines in their own sessions would live on
and busy-spin beside whatever runs next).

    from tests.enginectl import start_vllm, PROJECT_ENGINE_ARGS
    with start_vllm(model_path, extra_args=PROJECT_ENGINE_ARGS) as server:
        requests.get(server.url + "/health")
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

# What every slofleet engine runs with: the worker extension the sidecar calls via /collective_rpc.
# (The `vllm.general_plugins` entry point loads by itself from the installed package.)
PROJECT_ENGINE_ARGS: tuple[str, ...] = (
    "--worker-extension-cls",
    "slofleet.sidecar.vllm_ext.worker.SlofleetWorkerExtension",
)

# vllm-facts: offline, 1 GiB KV cache, dev-mode routes (/collective_rpc, /pause, /abort_requests).
BASE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_SERVER_DEV_MODE": "1",
}

STARTUP_TIMEOUT_SECONDS = float(os.environ.get("SLOFLEET_VLLM_STARTUP_TIMEOUT", "240"))

_live: set[VllmServer] = set()


def free_port() -> int:
    """A TCP port that is free now (the OS picks it; a race with another process is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServer:
    """One running vLLM OpenAI server. `url` has no trailing slash."""

    def __init__(
        self, model: str | Path, port: int, process: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        self.model = str(model)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log_path = log_path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM on port {self.port} exited with {self.process.returncode} before /health "
                    f"answered; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"vLLM on port {self.port} not healthy after {timeout:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `timeout`. Idempotent."""
        _live.discard(self)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The engine core and worker may outlive the API server: always sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vllm(
    model: str | Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    wait: bool = True,
    max_model_len: int = 1024,
) -> VllmServer:
    """Start `python -m vllm.entrypoints.openai.api_server` and (by default) wait for /health.

    `port` None picks a free one. `env` is added on top of os.environ and BASE_ENV. The log goes to
    a temp file (`server.log_path`). On any startup failure the process group is killed before
    the error propagates.
    """
    port = port or free_port()
    log_fd, log_name = tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), *extra_args,
    ]  # fmt: skip
    full_env = {**os.environ, **BASE_ENV, **(env or {})}
    with os.fdopen(log_fd, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = VllmServer(model, port, process, Path(log_name))
    _live.add(server)
    if wait:
        try:
            server.wait_healthy()
        except BaseException:
            server.stop()
            raise
    return server


class StreamLoad:
    """`count` concurrent streaming completions run by a separate process (`start_streams`).

    A separate process, because parsing thousands of SSE chunks per second starves any event loop
    it shares: an in-process sidecar under test would stop polling while the client reads.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        _live_loads.add(self)

    def wait(self, timeout: float = 300) -> list[int]:
        """Completion tokens of each stream, as the engine's final usage chunk reports them."""
        out, err = self.process.communicate(timeout=timeout)
        _live_loads.discard(self)
        if self.process.returncode != 0:
            raise RuntimeError(f"stream load failed ({self.process.returncode}): {err.decode()[-2000:]}")
        return list(json.loads(out))

    def stop(self) -> None:
        _live_loads.discard(self)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


_live_loads: set[StreamLoad] = set()


def start_streams(
    url: str, model: str, count: int, max_tokens: int, prompt: str = "the cluster answers the request"
) -> StreamLoad:
    """Start `count` concurrent greedy streaming completions (ignore_eos) against `url`."""
    cmd = [sys.executable, __file__, "streams", url, model, str(count), str(max_tokens), prompt]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return StreamLoad(process)


async def _run_streams(url: str, model: str, count: int, max_tokens: int, prompt: str) -> list[int]:
    import aiohttp

    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip

    async def one(session: aiohttp.ClientSession) -> int:
        tokens = 0
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"POST /v1/completions: HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = int(usage["completion_tokens"])
        return tokens

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(count))))


@atexit.register
def _stop_all() -> None:
    for load in list(_live_loads):
        load.stop()
    for server in list(_live):
        server.stop()


def _kill_live_and_die(signum: int, _frame: object) -> None:
    for server in list(_live):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
    for load in list(_live_loads):
        load.stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


for _signum in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_signum) == signal.SIG_DFL:
        signal.signal(_signum, _kill_live_and_die)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="run concurrent streaming completions (see start_streams)")
    parser.add_argument("mode", choices=["streams"])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("count", type=int)
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("prompt")
    a = parser.parse_args()
    print(json.dumps(asyncio.run(_run_streams(a.url, a.model, a.count, a.max_tokens, a.prompt))))
