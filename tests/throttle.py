"""Slow real engines down the way a busier or smaller accelerator would: duty-cycle their engine cores.

Tests that act on a request while it is in flight (migrate it, drain or freeze its instance, drop
layers under it, kill its engine) race the engine. On a quiet box the tiny model decodes a
2,000-token request in seconds, and the request can end before the action lands; on a loaded box the
same test passes. `EngineThrottle` removes the fast side of that race: a helper process stops every vLLM
engine-core and worker process below the given root (process titles `VLLM::EngineCore`,
`VLLM::Worker`) with SIGSTOP for `stop_s`, lets them run for `run_s`, and repeats, so an engine
decodes at most run/(run+stop) of its natural speed whatever the box. Stopping the worker too
matters: on two cores its OpenMP threads spin while they wait for the next step, and starve the API
server, whose stream then reaches the client in one late burst. API servers, sidecars and the
test's own loop keep running, so commands only wait up to `stop_s` longer. Engines started or
replaced while it runs are picked up at the next rescan; every engine it stopped gets SIGCONT when
it ends, also on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from tests.enginectl import VllmServer

ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")


def engine_processes(root_pid: int) -> list[psutil.Process]:
    """Engine-core and worker processes below `root_pid` (vLLM sets their titles)."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline()) or child.name()
            if title.startswith(ENGINE_TITLES):
                found.append(child)
    return found


class _Cycler:
    """The duty cycle itself; runs in its own process (`python tests/throttle.py ROOT RUN STOP`)."""

    def __init__(self, root_pid: int, run_s: float, stop_s: float, rescan_s: float = 0.5) -> None:
        self.root_pid, self.run_s, self.stop_s, self.rescan_s = root_pid, run_s, stop_s, rescan_s
        self.pids: set[int] = set()
        self.seen: set[int] = set()
        self.cycles = 0
        self.done = False

    def _signal(self, sig: signal.Signals) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.pids.discard(pid)

    def run(self) -> None:
        # Real-time priority where allowed: on two busy cores an ordinary process can wait seconds
        # for a core, and a throttler that waits lets the engines run free for that long.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        scanned = 0.0
        try:
            while not self.done:
                if time.monotonic() - scanned > self.rescan_s:
                    self.pids = {p.pid for p in engine_processes(self.root_pid)}
                    self.seen |= self.pids
                    scanned = time.monotonic()
                self._signal(signal.SIGSTOP)
                if self.cycles == 0:
                    print("throttling", flush=True)  # EngineThrottle.__enter__ waits for this line
                time.sleep(self.stop_s)
                self._signal(signal.SIGCONT)
                self.cycles += 1
                time.sleep(self.run_s)
        finally:
            self._signal(signal.SIGCONT)


def throttled(throttle: EngineThrottle, *servers: VllmServer) -> bool:
    """Whether the throttle stopped every engine-core and worker process of these vLLM servers."""
    pids = {p.pid for server in servers for p in engine_processes(server.process.pid)}
    return len(pids) == 2 * len(servers) and pids <= throttle.engines_seen


class EngineThrottle:
    """Context manager: a throttling process for the `with` body; `engines_seen` and `cycles` tell
    what it did (so a test can check that it throttled anything at all).

    A process and not a thread: the test's own event loop can hold the GIL for hundreds of
    milliseconds, and a thread's duty cycle would stretch with it.
    """

    def __init__(self, root_pid: int | None = None, run_s: float = 0.010, stop_s: float = 0.030) -> None:
        self.root_pid = root_pid or os.getpid()
        self.run_s, self.stop_s = run_s, stop_s
        self.engines_seen: set[int] = set()
        self.cycles = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EngineThrottle:
        cmd = [sys.executable, __file__, str(self.root_pid), str(self.run_s), str(self.stop_s)]
        self._process = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        # The body starts only once the engines are stopped for the first time: on a busy box the
        # helper itself can take seconds to start, and an engine decodes a whole request meanwhile.
        assert self._process.stdout is not None
        if self._process.stdout.readline() != b"throttling\n":
            raise RuntimeError("engine throttle failed to start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        try:
            out, _ = self._process.communicate(timeout=10)
            report = json.loads(out or b"{}")
            self.engines_seen = set(report.get("seen", []))
            self.cycles = int(report.get("cycles", 0))
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        # Whatever happened to the throttler, no engine stays stopped.
        for proc in engine_processes(self.root_pid):
            with contextlib.suppress(psutil.Error):
                proc.resume()


def _main(argv: list[str]) -> None:
    cycler = _Cycler(int(argv[0]), float(argv[1]), float(argv[2]))

    def finish(*_: object) -> None:
        cycler.done = True

    signal.signal(signal.SIGTERM, finish)
    cycler.run()
    print(json.dumps({"seen": sorted(cycler.seen), "cycles": cycler.cycles}))


if __name__ == "__main__":
    _main(sys.argv[1:])
