"""LocalFleet: the FleetBackend of `slofleet up`, instances as processes on this machine.

It mirrors what a Deployment controller does for the operator: `set_replicas` converges the live
instance count of a pool to the target, replacing failed instances, so the same control loop
restores the fleet after a crash here and in a cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp

from slofleet.fleet import InstanceRef, Phase
from slofleet.instance import Pool
from slofleet.local.cpus import BIND_ENV, CpuPlacer
from slofleet.local.instance import EngineLaunch, LocalInstance

log = logging.getLogger(__name__)

ChangeHook = Callable[[Sequence[InstanceRef]], Awaitable[None]]


class LocalFleet:
    def __init__(
        self,
        service: str,
        launch: EngineLaunch,
        log_dir: Path,
        on_change: ChangeHook | None = None,
        start_timeout_seconds: float = 600.0,
        cpu_slots: int = 0,
    ) -> None:
        """`cpu_slots`: the most instances that may run at once; each engine gets its own share of
        this machine's cores for that many (`slofleet.local.cpus`). 0, or a binding already set in
        the environment or the launch, leaves vLLM's own binding."""
        self.service = service
        self.launch = launch
        self.log_dir = log_dir
        self.on_change = on_change
        self.start_timeout_seconds = start_timeout_seconds
        self._instances: dict[str, LocalInstance] = {}
        self._desired: dict[Pool, int] = {}
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._starting: set[asyncio.Task[None]] = set()
        user_bound = BIND_ENV in os.environ or BIND_ENV in launch.env
        self._cpus = None if cpu_slots <= 0 or user_bound else CpuPlacer(os.sched_getaffinity(0), cpu_slots)

    async def __aenter__(self) -> LocalFleet:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # FleetBackend -----------------------------------------------------------------------------
    async def instances(self) -> Sequence[InstanceRef]:
        self._mark_dead()
        return [inst.ref() for inst in self._instances.values()]

    async def desired_replicas(self) -> dict[Pool, int]:
        return dict(self._desired)

    async def set_replicas(self, pool: Pool, replicas: int, remove_first: Sequence[str] = ()) -> None:
        if replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {replicas}")
        async with self._lock:
            self._desired[pool] = replicas
            # Only what `instances()` already reported as failed is reaped here: an instance that
            # died since then is left for the next step to see, so that its replacement is counted
            # and evented (the control loop reports the failed refs it was given).
            changed = await self._reap_failed(pool)
            members = [i for i in self._instances.values() if i.pool == pool]
            if len(members) > replicas:
                # Unnamed removals take what serves least first: starting or failed, then parked.
                rank = {Phase.READY: 2, Phase.STANDBY: 1}
                order = sorted(
                    members,
                    key=lambda i: (i.instance_id not in remove_first, rank.get(i.phase, 0), i.instance_id),
                )
                victims = order[: len(members) - replicas]
                for victim in victims:
                    self._forget(victim.instance_id)
                await asyncio.gather(*(v.stop() for v in victims))
                changed = True
            for _ in range(replicas - len(members)):
                self._launch(pool)
                changed = True
        if changed:
            await self._notify()

    async def set_standby(self, instance_id: str, since_s: float | None) -> None:
        """Parked instances leave the gateway's instance list (it lists READY ones only) and come
        back when woken; the process pair keeps running either way."""
        inst = self._instances.get(instance_id)
        if inst is None or inst.phase not in (Phase.READY, Phase.STANDBY):
            return
        inst.phase = Phase.READY if since_s is None else Phase.STANDBY
        inst.standby_since_s = since_s
        await self._notify()

    # internals --------------------------------------------------------------------------------
    def _mark_dead(self) -> None:
        for inst in self._instances.values():
            alive_phases = (Phase.READY, Phase.STARTING, Phase.DRAINING, Phase.STANDBY)
            if inst.phase in alive_phases and not inst.processes_alive():
                log.warning(
                    "instance died",
                    extra={
                        "service": self.service,
                        "instance": inst.instance_id,
                        "engine_rc": inst.engine.returncode(),
                        "sidecar_rc": inst.sidecar.returncode(),
                    },
                )
                inst.phase = Phase.FAILED

    async def _reap_failed(self, pool: Pool) -> bool:
        failed = [i for i in self._instances.values() if i.pool == pool and i.phase == Phase.FAILED]
        for inst in failed:
            self._forget(inst.instance_id)
        await asyncio.gather(*(i.stop() for i in failed))
        return bool(failed)

    def _forget(self, instance_id: str) -> None:
        self._instances.pop(instance_id)
        if self._cpus is not None:
            self._cpus.release(instance_id)

    def _launch(self, pool: Pool) -> None:
        instance_id = f"{self.service}-{pool.value}-{next(self._ids)}"
        placement = {BIND_ENV: self._cpus.assign(instance_id)} if self._cpus is not None else None
        inst = LocalInstance(instance_id, pool, self.launch, self.log_dir, placement)
        self._instances[instance_id] = inst
        inst.start()
        task = asyncio.create_task(self._await_ready(inst), name=f"ready-{instance_id}")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _await_ready(self, inst: LocalInstance) -> None:
        assert self._session is not None, "use LocalFleet as an async context manager"
        try:
            await inst.wait_ready(self._session, self.start_timeout_seconds)
            log.info("instance ready", extra={"service": self.service, "instance": inst.instance_id})
        except (RuntimeError, TimeoutError) as exc:
            log.error("instance failed to start: %s", exc, extra={"instance": inst.instance_id})
        await self._notify()

    async def wait_ready(self, timeout_seconds: float | None = None) -> None:
        """Wait until every pool has its desired count of READY instances."""
        deadline = asyncio.get_running_loop().time() + (timeout_seconds or self.start_timeout_seconds)
        while True:
            self._mark_dead()
            ready = sum(1 for i in self._instances.values() if i.phase == Phase.READY)
            if ready >= sum(self._desired.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{ready}/{sum(self._desired.values())} instances ready")
            await asyncio.sleep(0.5)

    async def _notify(self) -> None:
        if self.on_change is not None:
            await self.on_change([i.ref() for i in self._instances.values()])

    def process_ids(self) -> list[int]:
        """Leaders of every live process group (engines and sidecars), for orphan checks."""
        pids = []
        for inst in self._instances.values():
            pids += [p for p in (inst.engine.pid, inst.sidecar.pid) if p is not None]
        return pids

    def get(self, instance_id: str) -> LocalInstance | None:
        return self._instances.get(instance_id)

    async def shutdown(self) -> None:
        for task in list(self._starting):
            task.cancel()
        insts = list(self._instances.values())
        self._instances.clear()
        await asyncio.gather(*(i.stop() for i in insts), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
