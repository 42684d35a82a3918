"""Which sidecars the gateway follows, as instances come and go.

A fleet is not a fixed list: the autoscaler adds and removes instances. Two dynamic sources
keep one `watch_sidecar` task per live sidecar and drop instances whose sidecar disappeared:
- `dns`: a Kubernetes headless Service name resolves to one address per ready engine pod;
  re-resolved every few seconds (the operator renders this);
- `file`: a JSON list of {"sidecar_address": ...} objects that `slofleet up` rewrites atomically
  whenever its fleet changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from slofleet.gateway.instances import InstancePool
from slofleet.gateway.sidecar_client import watch_sidecar

log = logging.getLogger("slofleet.gateway.discovery")

Source = Callable[[], Awaitable[set[str] | None]]


def file_source(path: Path) -> Source:
    """Addresses listed in a JSON file; None (keep what we have) while it is missing or torn."""

    async def read() -> set[str] | None:
        try:
            rows = json.loads(await asyncio.to_thread(path.read_text))
            return {str(r["sidecar_address"]) for r in rows}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("event=instances_file_unreadable path=%s error=%s", path, exc)
            return None

    return read


def dns_source(name_and_port: str) -> Source:
    """Every A/AAAA record of a (headless Service) name, with the given port."""
    host, _, port = name_and_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--sidecar-dns: expected NAME:PORT, got {name_and_port!r}")

    async def resolve() -> set[str] | None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            # No ready pod yet gives NXDOMAIN on a headless Service: that is an empty fleet.
            log.info("event=dns_empty name=%s error=%s", host, exc)
            return set()
        return {f"[{i[4][0]}]:{port}" if ":" in i[4][0] else f"{i[4][0]}:{port}" for i in infos}

    return resolve


class SidecarDiscovery:
    def __init__(
        self,
        pool: InstancePool,
        session: aiohttp.ClientSession,
        token: str | None,
        forget: Callable[[str], None],
    ) -> None:
        self.pool = pool
        self.session = session
        self.token = token
        self.forget = forget
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._instance_of: dict[str, str] = {}

    def _connected(self, address: str, instance_id: str) -> None:
        self._instance_of[address] = instance_id
        self.forget(instance_id)

    def _follow(self, address: str) -> None:
        log.info("event=sidecar_discovered address=%s", address)
        self._tasks[address] = asyncio.create_task(
            watch_sidecar(
                address,
                self.token,
                self.pool,
                self.session,
                lambda iid, a=address: self._connected(a, iid),
            ),
            name=f"watch-{address}",
        )

    async def _unfollow(self, address: str) -> None:
        log.info("event=sidecar_gone address=%s", address)
        task = self._tasks.pop(address)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        instance_id = self._instance_of.pop(address, None)
        if instance_id is not None and instance_id not in self._instance_of.values():
            self.pool.instances.pop(instance_id, None)
            self.forget(instance_id)
            self.pool.changed()

    async def sync(self, addresses: set[str]) -> None:
        for address in sorted(addresses - self._tasks.keys()):
            self._follow(address)
        for address in sorted(self._tasks.keys() - addresses):
            await self._unfollow(address)

    async def run(self, source: Source, interval_seconds: float) -> None:
        try:
            while True:
                addresses = await source()
                if addresses is not None:
                    await self.sync(addresses)
                await asyncio.sleep(interval_seconds)
        finally:
            for address in list(self._tasks):
                self._tasks.pop(address).cancel()
