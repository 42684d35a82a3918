"""Child processes that never outlive `slofleet up`.

Every engine and sidecar runs in its own process group (so a stop reaches vLLM's EngineCore and
Worker grandchildren too) and asks the kernel to kill it if its parent dies (PR_SET_PDEATHSIG), so
neither Ctrl-C nor a SIGKILL of the parent leaves orphans holding 3 GB each.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the process group still lets stop() reach everything
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; callers bind it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """One child process with its own process group and a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        log.info("started %s pid=%d log=%s", self.name, self._proc.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (vLLM's EngineCore and Workers are in it)."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    async def stop(self, grace_seconds: float = 10.0) -> None:
        if self._proc is None:
            return
        self.kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._proc.wait), timeout=grace_seconds)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing its group", self.name, grace_seconds)
        # Grandchildren may linger after the leader exits: always sweep the group.
        self.kill_group(signal.SIGKILL)
        if self._proc.poll() is None:
            await asyncio.to_thread(self._proc.wait)
        log.info("stopped %s rc=%s", self.name, self._proc.returncode)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
