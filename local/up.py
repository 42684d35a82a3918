"""`slofleet up`: the whole control plane on this machine over real vLLM processes.

Runs the same pieces a cluster runs: N engine instances (vLLM + sidecar processes, pools as the
spec says), the gateway (its own process: a crash of the control plane never takes accepted
requests with it; its batch queue is a SQLite file in the state folder), and the operator's
control loop with a process backend instead of Deployments. It writes `state.json` into the
state folder so that `slofleet status` and `slofleet replay` find the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from slofleet.fleet import InstanceRef, Phase
from slofleet.local.fleet import LocalFleet
from slofleet.local.instance import EngineLaunch
from slofleet.local.processes import ManagedProcess, free_port
from slofleet.operator.control_loop import (
    ControlLoop,
    LoopEvent,
    SidecarClient,
    autoscaler_from_spec,
    initial_replicas,
)
from slofleet.operator.render import ENGINE_EXTENSION_ARGS, local_autoscaler_args, vllm_args
from slofleet.operator.rescheduler import rescheduler_for
from slofleet.operator.standby import standby_config
from slofleet.spec import LLMService, LLMServiceSpec
from slofleet.tinymodel import SIZES, ensure_tiny_model

log = logging.getLogger("slofleet.local.up")

GENERATED_PREFIX = "generated:"


def resolve_model(model: str) -> str:
    """`generated:<size>[:seed]` is made locally (no download); anything else is passed to vLLM."""
    if not model.startswith(GENERATED_PREFIX):
        return model
    size, _, seed = model[len(GENERATED_PREFIX) :].partition(":")
    if size not in SIZES:
        raise ValueError(f"spec.model: unknown generated size {size!r}; use one of {sorted(SIZES)}")
    return str(ensure_tiny_model(size, int(seed or 0)))


def local_engine_args(spec: LLMServiceSpec) -> list[str]:
    """The operator's vLLM arguments (the project's engine extension included) minus what the
    local fleet sets per process: model, host and port."""
    args = vllm_args(spec, extra=ENGINE_EXTENSION_ARGS)
    out: list[str] = []
    skip = {"--model", "--host", "--port"}
    i = 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


@dataclass
class UpState:
    """What `slofleet status`/`replay` read from state.json."""

    service: str
    model: str
    model_path: str
    max_model_len: int
    gateway_url: str
    slo: dict[str, float]
    pid: int
    started_at: float
    instances: list[dict[str, object]] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    # Every process group this run started (each child leads its own), kept after it ends, so
    # that tests and users can check that none outlived `slofleet up`.
    process_groups: list[int] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: {"scale_events": 0, "replacements": 0})


class LocalUp:
    def __init__(self, service: LLMService, state_dir: Path, gateway_port: int | None) -> None:
        self.service = service
        self.spec = service.spec
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.gateway_port = gateway_port or free_port()
        self.token = secrets.token_urlsafe(24)
        self.token_file = state_dir / "sidecar-token"
        self.instances_file = state_dir / "instances.json"
        self.state = UpState(
            service=service.name,
            model=self.spec.model,
            model_path="",
            max_model_len=self.spec.engine.max_model_len or 0,
            gateway_url=f"http://127.0.0.1:{self.gateway_port}",
            slo={
                "ttft_seconds": self.spec.slo.interactive.ttft_seconds,
                "itl_seconds": self.spec.slo.interactive.itl_milliseconds / 1000.0,
                "batch_deadline_seconds": self.spec.slo.batch.deadline_minutes * 60.0,
            },
            pid=os.getpid(),
            started_at=time.time(),
        )
        self.gateway: ManagedProcess | None = None
        self.fleet: LocalFleet | None = None
        self.stop_event = asyncio.Event()

    # state file -------------------------------------------------------------------------------
    def _write_json(self, path: Path, payload: object) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(path)  # atomic: readers never see half a file

    def _save_state(self) -> None:
        self._write_json(self.state_dir / "state.json", self.state.__dict__)

    async def _on_fleet_change(self, refs: list[InstanceRef]) -> None:
        ready = [r for r in refs if r.phase == Phase.READY]
        self._write_json(
            self.instances_file,
            [
                {
                    "instance_id": r.instance_id,
                    "sidecar_address": r.sidecar_address,
                    "engine_url": r.engine_url,
                    "pool": r.pool.value,
                }
                for r in ready
            ],
        )
        self.state.instances = [self._instance_row(r) for r in refs]
        known = set(self.state.process_groups)
        pids = (self.fleet.process_ids() if self.fleet else []) + ([self.gateway.pid] if self.gateway else [])
        self.state.process_groups += [p for p in pids if p is not None and p not in known]
        self._save_state()

    def _instance_row(self, ref: InstanceRef) -> dict[str, object]:
        inst = self.fleet.get(ref.instance_id) if self.fleet else None
        return {
            "instance_id": ref.instance_id,
            "pool": ref.pool.value,
            "phase": ref.phase.value,
            "engine_url": ref.engine_url,
            "sidecar": ref.sidecar_address,
            "metrics": ref.metrics_url,
            "engine_pid": inst.engine.pid if inst else None,
            "sidecar_pid": inst.sidecar.pid if inst else None,
        }

    async def _on_event(self, event: LoopEvent) -> None:
        log.info(
            "service=%s event=%s reason=%s %s", self.service.name, event.kind, event.reason, event.message
        )
        if event.kind == "scale":
            self.state.counters["scale_events"] += 1
        elif event.kind == "replace":
            self.state.counters["replacements"] += 1
        elif event.kind == "migrate" and event.reason == "Migrated":
            self.state.counters["migrations"] = self.state.counters.get("migrations", 0) + 1
        self.state.events.append(
            {"time": time.time(), "kind": event.kind, "reason": event.reason, "message": event.message}
        )
        self.state.events = self.state.events[-200:]
        self._save_state()

    # lifecycle --------------------------------------------------------------------------------
    def _start_gateway(self) -> ManagedProcess:
        batch_deadline = self.spec.slo.batch.deadline_minutes * 60
        proc = ManagedProcess(
            "gateway",
            [
                sys.executable, "-m", "slofleet.cli", "gateway",
                "--host", "127.0.0.1",
                "--port", str(self.gateway_port),
                "--instances-file", str(self.instances_file),
                "--sidecar-token-file", str(self.token_file),
                "--db", str(self.state_dir / "gateway.sqlite3"),
                "--batch-deadline-seconds", str(batch_deadline),
            ],
            self.log_dir / "gateway.log",
        )  # fmt: skip
        proc.start()
        return proc

    async def _wait_gateway(
        self, session: aiohttp.ClientSession, serving: bool = False, timeout_seconds: float = 120.0
    ) -> None:
        """Wait until the gateway answers (or, with `serving`, has a ready instance behind it)."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.gateway is not None and not self.gateway.alive():
                raise RuntimeError(f"gateway exited during start-up:\n{self.gateway.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                # /health says 503 until the gateway follows a ready instance.
                async with session.get(f"{self.state.gateway_url}/health") as r:
                    if r.status == 200 or not serving:
                        return
            await asyncio.sleep(0.3)
        raise TimeoutError(f"gateway not {'serving' if serving else 'answering'} in {timeout_seconds:.0f} s")

    async def run(self, ready_callback: asyncio.Event | None = None) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self._write_json(self.instances_file, [])
        model_path = resolve_model(self.spec.model)
        self.state.model_path = model_path
        launch = EngineLaunch(
            model=model_path,
            served_model_name=self.service.name,
            engine_args=local_engine_args(self.spec),
            sidecar_token=self.token,
            sidecar_args=local_autoscaler_args(self.spec),
            migration=self.spec.migration.enabled,
        )
        autoscaler = autoscaler_from_spec(self.spec)
        sidecars = SidecarClient(self.token)
        async with LocalFleet(
            self.service.name, launch, self.log_dir, self._on_fleet_change, cpu_slots=self.spec.replicas.max
        ) as fleet:
            self.fleet = fleet
            self.gateway = self._start_gateway()
            try:
                for pool, n in initial_replicas(self.spec, autoscaler).items():
                    await fleet.set_replicas(pool, n)
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                    await self._wait_gateway(session)
                    await fleet.wait_ready()
                    await self._wait_gateway(session, serving=True)
                self._save_state()
                started = time.time() - self.state.started_at
                print(
                    f"slofleet up: service {self.service.name!r} ready in {started:.1f} s; "
                    f"OpenAI endpoint {self.state.gateway_url}/v1 (model {self.service.name!r}); "
                    f"logs in {self.log_dir}; Ctrl-C stops everything",
                    flush=True,
                )
                if ready_callback is not None:
                    ready_callback.set()
                loop = ControlLoop(
                    self.service.name, fleet, autoscaler, sidecars, self.state.gateway_url, self._on_event,
                    max_total_replicas=self.spec.replicas.max,
                    rescheduler=rescheduler_for(self.service.name, self.spec, self.token, self._on_event),
                    standby=standby_config(self.spec),
                )  # fmt: skip
                try:
                    await loop.run(float(self.spec.autoscaling.interval_seconds), self.stop_event)
                finally:
                    await loop.close()
            finally:
                await sidecars.close()
                if self.gateway is not None:
                    await self.gateway.stop()
        print("slofleet up: stopped; no process left running", flush=True)
        return 0


def run_up(service: LLMService, state_dir: Path, gateway_port: int | None) -> int:
    up = LocalUp(service, state_dir, gateway_port)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, up.stop_event.set)
        return await up.run()

    return asyncio.run(main())
