"""Admission: a slot on an instance now, or a place in a bounded priority queue.

Interactive requests are placed at once when any instance is below its local limit; otherwise
they wait, lowest priority value first (vLLM's convention), then by arrival. A full queue answers
429 with Retry-After, so overload is pushed back to clients instead of piling up in memory.
Batch work never waits here: the batch runner asks `try_acquire` and leaves the item queued in
SQLite when there is no spare slot (it also yields while interactive requests wait).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from slofleet.gateway.errors import ApiError
from slofleet.gateway.instances import Instance, InstancePool
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.instance import RequestClass, RequestInfo
from slofleet.policies.dispatch import DispatchParams, DispatchPolicy, DispatchRequest, choose
from slofleet.prefix_index import PrefixIndex

log = logging.getLogger("slofleet.gateway.scheduler")


@dataclass(slots=True)
class Placement:
    """What the scheduler needs from a request (the relay's state provides it)."""

    request_id: str
    model: str
    request_class: RequestClass
    priority: int
    prompt_tokens: int
    max_tokens: int
    generated_tokens: int = 0
    prefix_hashes: list[bytes] = field(default_factory=list)

    def info(self, engine_request_id: str) -> RequestInfo:
        return RequestInfo(
            request_id=engine_request_id,
            request_class=self.request_class,
            priority=self.priority,
            prompt_tokens=self.prompt_tokens + self.generated_tokens,
            max_tokens=max(self.max_tokens - self.generated_tokens, 0),
        )


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    placement: Placement = field(compare=False)
    exclude: frozenset[str] = field(compare=False)
    engine_request_id: str = field(compare=False)
    future: asyncio.Future[Instance] = field(compare=False)


class Scheduler:
    def __init__(
        self,
        pool: InstancePool,
        params: DispatchParams,
        metrics: GatewayMetrics,
        max_queued: int,
        queue_timeout_s: float,
        retry_after_s: int,
    ) -> None:
        self.pool = pool
        self.params = params
        self.metrics = metrics
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.prefix = PrefixIndex()
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._rr = 0
        self._capacity_listeners: list[Callable[[], None]] = []
        pool.on_change(self.pump)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    def on_capacity(self, callback: Callable[[], None]) -> None:
        """Called when a slot may be free and no interactive request waits (the batch runner)."""
        self._capacity_listeners.append(callback)

    def _place(self, p: Placement, exclude: frozenset[str], engine_request_id: str) -> Instance | None:
        loads = self.pool.loads(p.model, exclude)
        hits = self.prefix.hits(p.prefix_hashes) if p.prefix_hashes and self.params.locality_weight else {}
        request = DispatchRequest(
            prompt_tokens=p.prompt_tokens + p.generated_tokens,
            max_tokens=max(p.max_tokens - p.generated_tokens, 0),
            priority=p.priority,
            request_class=p.request_class,
            prefix_hit_blocks=hits,
        )
        decision = choose(loads, request, self.params, self._rr)
        self.metrics.dispatch.labels(self.params.policy.value, decision.reason).inc()
        if decision.instance_id is None:
            return None
        if self.params.policy is DispatchPolicy.ROUND_ROBIN:
            self._rr += 1
        inst = self.pool.instances[decision.instance_id]
        self.pool.admit(inst, p.info(engine_request_id))
        if p.prefix_hashes:
            self.prefix.record(inst.instance_id, p.prefix_hashes)
        return inst

    def try_acquire(self, p: Placement, engine_request_id: str) -> Instance | None:
        """A slot now or None; never queues (batch work)."""
        if self.waiting:
            return None
        return self._place(p, frozenset(), engine_request_id)

    def place_on(self, inst: Instance, p: Placement, engine_request_id: str) -> None:
        """Admit on a chosen instance regardless of limits (a move decided by the operator)."""
        self.pool.admit(inst, p.info(engine_request_id))

    async def acquire(
        self, p: Placement, engine_request_id: str, exclude: frozenset[str] = frozenset(), new: bool = True
    ) -> Instance:
        """A slot for `p`, waiting in the priority queue if needed; 429 when the queue is full.

        `new=False` (a request being resumed) bypasses the bound: it was accepted already.
        `exclude` is a preference: when it would leave no instance of the model (a one-instance
        fleet whose engine stumbled), the request waits for the excluded ones to be healthy again
        rather than failing an accepted request with 503.
        """
        if exclude and not self.pool.loads(p.model, exclude):
            exclude = frozenset()
        if not self._waiters:
            inst = self._place(p, exclude, engine_request_id)
            if inst is not None:
                return inst
        if not self.pool.loads(p.model, exclude):
            raise ApiError(503, f"model: no instance of '{p.model}' is available", param="model")
        if new and self.waiting >= self.max_queued:
            self.metrics.rejected.labels(p.request_class.value).inc()
            raise ApiError(
                429,
                f"every instance is at its limit and {self.max_queued} requests already wait; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        fut: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._waiters, _Waiter(p.priority, next(self._seq), p, exclude, engine_request_id, fut)
        )
        self._update_depth()
        self.pump()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return fut.result()
            fut.cancel()
            raise ApiError(
                429,
                f"no instance had room within {self.queue_timeout_s:.0f} s; retry later",
                code="queue_timeout",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                inst = fut.result()
                self.release(inst, engine_request_id, 0)
            fut.cancel()
            raise
        finally:
            self._update_depth()

    def release(self, inst: Instance, engine_request_id: str, generated_tokens: int) -> None:
        self.pool.finish(inst, engine_request_id, generated_tokens)

    def pump(self) -> None:
        """Hand free slots to waiters in priority order; then tell the batch runner."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                heapq.heappop(self._waiters)
                continue
            inst = self._place(head.placement, head.exclude, head.engine_request_id)
            if inst is None:
                break
            heapq.heappop(self._waiters)
            head.future.set_result(inst)
        self._update_depth()
        if not self._waiters:
            for cb in self._capacity_listeners:
                cb()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("interactive").set(self.waiting)
