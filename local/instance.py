"""One local engine instance: a vLLM server process and its sidecar process."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from slofleet.fleet import InstanceRef, Phase
from slofleet.instance import Pool
from slofleet.local.processes import ManagedProcess, free_port
from slofleet.operator.render import kv_transfer_config_args


@dataclass(frozen=True, slots=True)
class EngineLaunch:
    """What every local engine of one service is started with."""

    model: str
    served_model_name: str
    engine_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    sidecar_token: str = ""
    sidecar_args: Sequence[str] = ()
    # Live migration: each engine loads the KV connector on its own control socket, which its
    # sidecar serves the Migration service on.
    migration: bool = True


class LocalInstance:
    def __init__(
        self,
        instance_id: str,
        pool: Pool,
        launch: EngineLaunch,
        log_dir: Path,
        placement_env: Mapping[str, str] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.pool = pool
        self.launch = launch
        self.engine_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.phase = Phase.STARTING
        self.draining = False
        # Engines of one machine share /dev/shm: each instance's control socket has its own folder.
        self.kv_socket_dir = Path("/dev/shm") / f"slofleet-{instance_id}-{self.engine_port}"
        kv_socket = str(self.kv_socket_dir / "kv.sock") if launch.migration else ""
        self.standby_since_s: float | None = None
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **(placement_env or {}),
            **launch.env,
        }
        self.engine = ManagedProcess(
            f"{instance_id}/engine",
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                launch.model,
                "--served-model-name",
                launch.served_model_name,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.engine_port),
                *(kv_transfer_config_args(kv_socket) if kv_socket else []),
                *launch.engine_args,
            ],
            log_dir / f"{instance_id}-engine.log",
            env,
        )
        sidecar_env = {**os.environ, "SLOFLEET_SIDECAR_TOKEN": launch.sidecar_token}
        self.sidecar = ManagedProcess(
            f"{instance_id}/sidecar",
            [
                sys.executable,
                "-m",
                "slofleet.cli",
                "sidecar",
                "--engine-url",
                self.engine_url,
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
                "--instance-id",
                instance_id,
                "--pool",
                pool.value,
                "--kv-control-socket",
                kv_socket,
                *launch.sidecar_args,
            ],
            log_dir / f"{instance_id}-sidecar.log",
            sidecar_env,
        )

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    def ref(self) -> InstanceRef:
        return InstanceRef(
            instance_id=self.instance_id,
            pool=self.pool,
            phase=self.phase,
            engine_url=self.engine_url,
            sidecar_address=f"127.0.0.1:{self.grpc_port}",
            metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics",
            standby_since_s=self.standby_since_s,
        )

    def start(self) -> None:
        self.engine.start()
        self.sidecar.start()

    def processes_alive(self) -> bool:
        return self.engine.alive() and self.sidecar.alive()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_seconds: float = 600.0) -> None:
        """Wait for the engine's /health; fail fast (with its log) if a process dies."""
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        while asyncio.get_running_loop().time() < deadline:
            if not self.processes_alive():
                self.phase = Phase.FAILED
                raise RuntimeError(
                    f"instance {self.instance_id} exited during start-up; last engine log lines:\n"
                    f"{self.engine.tail()}\nsidecar:\n{self.sidecar.tail()}"
                )
            try:
                async with session.get(f"{self.engine_url}/health", timeout=aiohttp.ClientTimeout(2)) as r:
                    if r.status == 200:
                        self.phase = Phase.READY
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
        self.phase = Phase.FAILED
        raise TimeoutError(f"instance {self.instance_id} not healthy after {timeout_seconds:.0f} s")

    async def stop(self) -> None:
        self.phase = Phase.STOPPING
        await asyncio.gather(self.sidecar.stop(), self.engine.stop())
        shutil.rmtree(self.kv_socket_dir, ignore_errors=True)
