"""Sidecar discovery: the gateway follows instances as the fleet adds and removes them."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from slofleet.gateway.discovery import SidecarDiscovery, dns_source, file_source
from slofleet.gateway.instances import Instance, InstancePool


async def test_file_source_reads_addresses_and_keeps_last_on_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    read = file_source(path)
    assert await read() is None  # missing: keep following what we follow
    path.write_text(json.dumps([{"sidecar_address": "127.0.0.1:1"}, {"sidecar_address": "127.0.0.1:2"}]))
    assert await read() == {"127.0.0.1:1", "127.0.0.1:2"}
    path.write_text('[{"sidecar_addr')
    assert await read() is None


async def test_dns_source_resolves_every_address() -> None:
    addresses = await dns_source("localhost:50051")()
    assert addresses and "127.0.0.1:50051" in addresses
    with pytest.raises(ValueError, match="--sidecar-dns"):
        dns_source("no-port")


async def test_sync_follows_new_and_drops_gone_sidecars() -> None:
    pool = InstancePool()
    forgotten: list[str] = []
    async with aiohttp.ClientSession() as session:
        d = SidecarDiscovery(pool, session, None, forgotten.append)
        await d.sync({"127.0.0.1:9", "127.0.0.1:10"})
        assert set(d._tasks) == {"127.0.0.1:9", "127.0.0.1:10"}
        # The watcher of :9 had connected to instance "a": when :9 goes, "a" leaves the pool.
        pool.instances["a"] = Instance(instance_id="a", url="http://127.0.0.1:8000")
        d._connected("127.0.0.1:9", "a")
        await d.sync({"127.0.0.1:10"})
        assert set(d._tasks) == {"127.0.0.1:10"}
        assert "a" not in pool.instances and "a" in forgotten
        await d.sync(set())
        assert d._tasks == {}


def test_engine_url_from_a_pod_sidecar_is_reached_at_the_pod_address() -> None:
    from slofleet.gateway.sidecar_client import reachable_engine_url

    assert reachable_engine_url("http://127.0.0.1:8000", "10.1.2.3:50051") == "http://10.1.2.3:8000"
    assert reachable_engine_url("http://127.0.0.1:8000/", "[fd00::1]:50051") == "http://[fd00::1]:8000"
    # Local fleets: sidecar and engine are both on loopback; nothing to rewrite.
    assert reachable_engine_url("http://127.0.0.1:41000", "127.0.0.1:50051") == "http://127.0.0.1:41000"
