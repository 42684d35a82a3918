"""The instances behind the gateway and the load the gateway sees on each.

Two sources of load: in sidecar mode each instance's sidecar streams `InstanceLoad` snapshots
(engine truth, slightly late); in static mode (`--engine URL`, tests and benchmarks) there is no
sidecar and the gateway's own bookkeeping is the load. In both, requests the gateway dispatched
count at once, so a burst cannot overshoot an instance's limit while the next snapshot is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp

from slofleet.instance import InstanceLoad, Pool, RequestInfo

log = logging.getLogger("slofleet.gateway.instances")

_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class MigrationResolution:
    """Where a request the engine stopped continues, as the source's sidecar decided (Llumnix cut-over).

    `how` is "kv" (resume on `target` with `kv_transfer_params`: the copied prefix is loaded, not
    recomputed), "recompute" (resume anywhere by re-prefill) or "none" (no migration stopped it: the
    stop was a real abort and the client gets it).
    """

    how: str
    target: str = ""
    kv_transfer_params: dict[str, object] | None = None


@dataclass
class Instance:
    instance_id: str
    url: str
    model: str = ""
    max_model_len: int = 0
    block_size: int = 128
    kv_total_blocks: int = 0
    concurrency_limit: int = 64
    healthy: bool = False
    failed_checks: int = 0
    draining: bool = False
    pool: Pool = Pool.MIXED
    # Latest sidecar snapshot (sidecar mode only).
    snapshot: InstanceLoad | None = None
    # Requests this gateway has on the instance now.
    tracked: dict[str, RequestInfo] = field(default_factory=dict)
    # Called with ("admitted"|"finished", RequestInfo): the sidecar reporter in sidecar mode.
    report: Callable[[str, RequestInfo], None] | None = None
    # Asks the sidecar where a request it stopped for migration went, by engine request id
    # (sidecar mode only; None in static mode, where an engine's abort reaches the client as is).
    resolve_migration: Callable[[str], Awaitable[MigrationResolution]] | None = None

    @property
    def ready(self) -> bool:
        return self.healthy and bool(self.model)

    def load(self) -> InstanceLoad:
        """The load dispatch sees: the sidecar snapshot merged with what this gateway just sent."""
        own = tuple(self.tracked.values())
        snap = self.snapshot
        if snap is None:
            used = sum(-(-(r.prompt_tokens + r.generated_tokens) // self.block_size) for r in own)
            return InstanceLoad(
                instance_id=self.instance_id,
                running_requests=len(own),
                waiting_requests=0,
                kv_usage_fraction=used / self.kv_total_blocks if self.kv_total_blocks else 0.0,
                kv_total_blocks=self.kv_total_blocks,
                kv_free_blocks=max(self.kv_total_blocks - used, 0),
                block_size_tokens=self.block_size,
                concurrency_limit=self.concurrency_limit,
                draining=self.draining,
                healthy=self.ready,
                pool=self.pool,
                requests=own,
            )
        known = {r.request_id for r in snap.requests}
        extra = tuple(r for r in own if r.request_id not in known)
        return replace(
            snap,
            waiting_requests=snap.waiting_requests + max(len(own) - snap.in_flight, 0),
            healthy=snap.healthy and self.ready,
            requests=snap.requests + extra,
        )


class InstancePool:
    """All instances, keyed by id, plus who to tell when capacity may have changed."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def changed(self) -> None:
        for cb in self._listeners:
            cb()

    def models(self) -> dict[str, int]:
        """Served model name -> context length (the smallest over instances that serve it)."""
        out: dict[str, int] = {}
        for inst in self.instances.values():
            if inst.model:
                out[inst.model] = min(out.get(inst.model, inst.max_model_len), inst.max_model_len)
        return out

    def loads(self, model: str, exclude: frozenset[str] = frozenset()) -> list[InstanceLoad]:
        return [
            inst.load()
            for inst in self.instances.values()
            if inst.model == model and inst.instance_id not in exclude
        ]

    def admit(self, inst: Instance, info: RequestInfo) -> None:
        inst.tracked[info.request_id] = info
        if inst.report:
            inst.report("admitted", info)

    def finish(self, inst: Instance, request_id: str, generated_tokens: int) -> None:
        info = inst.tracked.pop(request_id, None)
        if info is not None and inst.report:
            inst.report("finished", replace(info, generated_tokens=generated_tokens))
        self.changed()

    def mark_failed(self, inst: Instance, reason: str) -> None:
        if inst.healthy:
            log.warning("instance=%s event=unhealthy reason=%s", inst.instance_id, reason)
        inst.healthy = False
        self.changed()


async def discover_engine(session: aiohttp.ClientSession, inst: Instance) -> None:
    """Fill model, context length and KV geometry of a static engine from its own endpoints."""
    async with session.get(f"{inst.url}/v1/models") as resp:
        resp.raise_for_status()
        models = (await resp.json())["data"]
    inst.model = models[0]["id"]
    inst.max_model_len = int(models[0].get("max_model_len") or 2048)
    async with session.get(f"{inst.url}/metrics") as resp:
        text = await resp.text()
    m = _CACHE_INFO.search(text)
    if m:
        labels = dict(_LABEL.findall(m.group("labels")))
        inst.block_size = int(labels.get("block_size", inst.block_size))
        with contextlib.suppress(ValueError):
            inst.kv_total_blocks = int(labels.get("num_gpu_blocks", "0"))


def static_instance(url: str, concurrency_limit: int) -> Instance:
    parts = urlsplit(url)
    return Instance(instance_id=parts.netloc or url, url=url.rstrip("/"), concurrency_limit=concurrency_limit)


# A busy engine answers /health late: only this many slow checks in a row take it out. A refused
# connection (the process is gone) takes it out at once.
SLOW_CHECKS_TOLERATED = 3


async def _check(
    session: aiohttp.ClientSession, pool: InstancePool, inst: Instance, on_restart: Callable[[str], None]
) -> None:
    try:
        async with session.get(f"{inst.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
            ok = r.status == 200
        if ok and (not inst.healthy or not inst.model):
            await discover_engine(session, inst)
            on_restart(inst.instance_id)
            log.info("instance=%s event=healthy model=%s", inst.instance_id, inst.model)
        inst.failed_checks = 0 if ok else SLOW_CHECKS_TOLERATED
    except aiohttp.ClientConnectorError as exc:
        inst.failed_checks = SLOW_CHECKS_TOLERATED
        log.debug("instance=%s health check refused: %s", inst.instance_id, exc)
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        inst.failed_checks += 1
        log.debug("instance=%s health check failed: %s", inst.instance_id, exc)
    ok = inst.failed_checks < SLOW_CHECKS_TOLERATED and bool(inst.model)
    if ok != inst.healthy:
        inst.healthy = ok
        if not ok:
            log.warning("instance=%s event=unhealthy reason=health-check", inst.instance_id)
        pool.changed()


async def watch_static_health(
    session: aiohttp.ClientSession, pool: InstancePool, interval_s: float, on_restart: Callable[[str], None]
) -> None:
    """Poll every static engine's /health concurrently; (re)discover one when it comes back."""
    while True:
        await asyncio.gather(
            *(_check(session, pool, inst, on_restart) for inst in list(pool.instances.values()))
        )
        await asyncio.sleep(interval_s)
