"""Admission in the gateway's scheduler, without engines: the queue and the resume fallback."""

from __future__ import annotations

import asyncio

import pytest

from slofleet.gateway.errors import ApiError
from slofleet.gateway.instances import Instance, InstancePool
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.gateway.scheduler import Placement, Scheduler
from slofleet.instance import RequestClass
from slofleet.policies.dispatch import DispatchParams


def _pool(*ids: str, limit: int = 4) -> InstancePool:
    pool = InstancePool()
    for i in ids:
        pool.instances[i] = Instance(
            instance_id=i, url=f"http://{i}", model="m", max_model_len=2048, kv_total_blocks=1000,
            concurrency_limit=limit, healthy=True,
        )  # fmt: skip
    return pool


def _scheduler(pool: InstancePool, queue_timeout_s: float = 5.0, burst_factor: float = 1.0) -> Scheduler:
    return Scheduler(pool, DispatchParams(burst_factor=burst_factor), GatewayMetrics(), max_queued=8,
                     queue_timeout_s=queue_timeout_s, retry_after_s=1)  # fmt: skip


def _placement(rid: str) -> Placement:
    return Placement(rid, "m", RequestClass.INTERACTIVE, 0, prompt_tokens=16, max_tokens=16)


async def test_resume_on_a_one_instance_fleet_waits_for_the_instance_to_recover() -> None:
    """A resume excluded from the only instance must wait for it, not fail an accepted request."""
    pool = _pool("a")
    sched = _scheduler(pool)
    pool.mark_failed(pool.instances["a"], "stream broke")
    waiter = asyncio.create_task(sched.acquire(_placement("r"), "r-r1", exclude=frozenset({"a"}), new=False))
    await asyncio.sleep(0.05)
    assert not waiter.done() and sched.waiting == 1
    pool.instances["a"].healthy = True
    pool.changed()
    inst = await asyncio.wait_for(waiter, 1)
    assert inst.instance_id == "a"
    assert "r-r1" in inst.tracked


async def test_resume_prefers_another_instance_when_one_exists() -> None:
    pool = _pool("a", "b")
    sched = _scheduler(pool)
    inst = await sched.acquire(_placement("r"), "r-r1", exclude=frozenset({"a"}), new=False)
    assert inst.instance_id == "b"


async def test_full_instances_queue_in_priority_order_then_429() -> None:
    pool = _pool("a", limit=1)
    sched = _scheduler(pool, queue_timeout_s=0.2)
    first = await sched.acquire(_placement("r0"), "r0")
    low = asyncio.create_task(sched.acquire(Placement("r1", "m", RequestClass.INTERACTIVE, 5, 16, 16), "r1"))
    high = asyncio.create_task(sched.acquire(Placement("r2", "m", RequestClass.INTERACTIVE, 0, 16, 16), "r2"))
    await asyncio.sleep(0.05)
    sched.release(first, "r0", 16)
    assert (await asyncio.wait_for(high, 1)).instance_id == "a"
    with pytest.raises(ApiError) as err:
        await low
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"


async def test_interactive_burst_overflows_the_limits_before_it_queues() -> None:
    """With every instance at its limit, interactive requests go over it (least loaded first) up
    to limit x burst_factor, and only then wait; a finished one frees a slot for the waiter."""
    pool = _pool("a", "b", limit=2)
    sched = _scheduler(pool, burst_factor=1.5)
    got = [await sched.acquire(_placement(f"r{i}"), f"r{i}") for i in range(6)]
    assert sorted(i.instance_id for i in got) == ["a", "a", "a", "b", "b", "b"]
    assert sched.waiting == 0
    waiter = asyncio.create_task(sched.acquire(_placement("r6"), "r6"))
    await asyncio.sleep(0.05)
    assert not waiter.done() and sched.waiting == 1
    sched.release(got[0], "r0", 16)
    assert (await asyncio.wait_for(waiter, 1)).instance_id == got[0].instance_id
