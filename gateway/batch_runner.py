"""Releases durable batch items into spare capacity, earliest deadline first.

It wakes when the scheduler reports a free slot with no interactive request waiting (and once a
second regardless, for metrics and for instances that came back), takes queued rows in deadline
order, and sends each through the same relay as interactive traffic, so batch streams also survive
an instance. Results go back to their row; transient failures put the row back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from slofleet.gateway.batch import BatchStore
from slofleet.gateway.errors import ApiError
from slofleet.gateway.instances import InstancePool
from slofleet.gateway.metrics import GatewayMetrics
from slofleet.gateway.relay import Accumulator, Relay, RequestState
from slofleet.gateway.requests import new_state
from slofleet.gateway.scheduler import Scheduler
from slofleet.gateway.validate import ROUTES, parse_request
from slofleet.instance import RequestClass

log = logging.getLogger("slofleet.gateway.batch_runner")


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        scheduler: Scheduler,
        relay: Relay,
        pool: InstancePool,
        metrics: GatewayMetrics,
        chars_per_block: int,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.relay = relay
        self.pool = pool
        self.metrics = metrics
        self.chars_per_block = chars_per_block
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats: dict[str, Any] = {"pending": 0, "queued": 0, "earliest_deadline": None, "batches": []}
        scheduler.on_capacity(self._wake.set)

    def wake(self) -> None:
        self._wake.set()

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats

    async def run(self) -> None:
        recovered = await self.store.call(self.store.recover)
        if recovered:
            log.info("event=recovered items_requeued=%d", recovered)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                await self._release()
                self._stats = await self.store.call(self.store.queue_stats)
            except Exception:
                log.exception("event=batch_release_failed")
                continue
            self.metrics.queue_depth.labels("batch").set(self._stats["queued"])
            first = self._stats["earliest_deadline"]
            self.metrics.batch_slack.set(first - time.time() if first is not None else 0.0)

    async def _release(self) -> None:
        while True:
            items = await self.store.call(self.store.next_items, 32)
            if not items:
                return
            for it in items:
                try:
                    parsed = parse_request(ROUTES[it["url"]], json.loads(it["body"]), self.pool.models())
                except ApiError as exc:
                    if exc.code == "model_not_found" and not self.pool.models():
                        return  # no instance known yet: wait rather than fail the line
                    if await self.store.call(self.store.mark_running, it["batch_id"], it["line"]):
                        await self.store.call(
                            self.store.record_result, it["batch_id"], it["line"], exc.status, exc.body()
                        )
                    continue
                priority = parsed.body.get("priority")
                state = new_state(
                    f"{it['batch_id']}-{it['line']}",
                    parsed,
                    RequestClass.BATCH,
                    int(priority) if isinstance(priority, int) else it["priority"],
                    self.pool.models()[parsed.model],
                    self.chars_per_block,
                )
                eid = self.relay.engine_id(state)
                inst = self.scheduler.try_acquire(state.placement, eid)
                if inst is None:
                    return
                if not await self.store.call(self.store.mark_running, it["batch_id"], it["line"]):
                    self.scheduler.release(inst, eid, 0)
                    continue
                task = asyncio.create_task(self._run_item(it["batch_id"], it["line"], state, inst))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_item(self, bid: str, line: int, state: RequestState, inst: Any) -> None:
        acc = Accumulator(state)
        self.metrics.in_flight.labels("batch").inc()
        try:
            await self.relay.execute(state, acc, target=inst)
            code, body = 200, acc.response()
            self.metrics.requests.labels("batch", "success").inc()
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                self.metrics.requests.labels("batch", "failed").inc()
                log.warning("batch_id=%s line=%d event=requeue reason=%s", bid, line, exc.message)
                await self.store.call(self.store.requeue, bid, line)
                return
            code, body = exc.status, exc.body()
            self.metrics.requests.labels("batch", "client_error").inc()
        except Exception:
            log.exception("batch_id=%s line=%d event=requeue", bid, line)
            await self.store.call(self.store.requeue, bid, line)
            return
        finally:
            self.metrics.in_flight.labels("batch").dec()
        await self.store.call(self.store.record_result, bid, line, code, body)
        self.wake()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
