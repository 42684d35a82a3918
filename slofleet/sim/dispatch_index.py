"""An incremental index that answers the gateway's freeness dispatch in far less than O(fleet).

`slofleet.policies.dispatch.choose` (freeness policy) scores every eligible instance with

    score = (total_blocks - used_blocks - demand_blocks) / (in_flight + 1)

when the instance reports no per-request list (the simulator's `Inst.load()`), and picks the
highest score, ties to the smallest instance id. The ranking depends on the request's demand
(instances with different `in_flight` swap order as the demand changes), so no single sort key
works. But among instances with the *same* `in_flight + 1 = m` the order is by free blocks alone,
whatever the demand. So the index keeps one max-heap of (free blocks, id) per m; a query looks at
the top of every heap and picks the best score, ties by id: the same answer as `choose`, exactly
(same integer numerator, same division), at a cost of O(distinct in-flight counts) rather than
O(fleet). Updates are O(log n): a changed instance pushes a new entry and the old one becomes stale
(a version number per instance); stale tops are dropped at query time, and the heaps are rebuilt
when stale entries outnumber live ones, so memory stays bounded.
"""

from __future__ import annotations

import heapq


class FreenessIndex:
    def __init__(self) -> None:
        # m = in_flight + 1 -> heap of (-free_blocks, instance_id, slot, version)
        self._buckets: dict[int, list[tuple[int, str, int, int]]] = {}
        self._version: dict[int, int] = {}
        # slot -> (free blocks, instance id, in flight) of every eligible instance; read-only outside
        # (the simulator compares with it to skip updates that change nothing)
        self.live: dict[int, tuple[int, str, int]] = {}
        self._entries = 0

    def __len__(self) -> int:
        return len(self.live)

    def update(self, slot: int, instance_id: str, free_blocks: int, in_flight: int, eligible: bool) -> None:
        """Record the instance's current state (`eligible`: it may take this class of request now)."""
        live = self.live.get(slot)
        if (live == (free_blocks, instance_id, in_flight)) if eligible else live is None:
            return  # the entry in the heaps (or the absence of one) is still right
        v = self._version.get(slot, 0) + 1
        self._version[slot] = v
        if not eligible:
            self.live.pop(slot, None)
            return
        self.live[slot] = (free_blocks, instance_id, in_flight)
        heapq.heappush(self._buckets.setdefault(in_flight + 1, []), (-free_blocks, instance_id, slot, v))
        self._entries += 1
        if self._entries > 4 * len(self.live) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        buckets: dict[int, list[tuple[int, str, int, int]]] = {}
        for slot, (free, iid, in_flight) in self.live.items():
            buckets.setdefault(in_flight + 1, []).append((-free, iid, slot, self._version[slot]))
        for heap in buckets.values():
            heapq.heapify(heap)
        self._buckets = buckets
        self._entries = len(self.live)

    def best(self, demand_blocks: int) -> int | None:
        """Slot of the instance `dispatch.choose` would pick for a request of this demand."""
        version = self._version
        best_score = 0.0
        best_id = ""
        best_slot: int | None = None
        empty = []
        for m, heap in self._buckets.items():
            while heap and version[heap[0][2]] != heap[0][3]:
                heapq.heappop(heap)
                self._entries -= 1
            if not heap:
                empty.append(m)
                continue
            neg_free, iid, slot, _ = heap[0]
            s = (-neg_free - demand_blocks) / m
            if best_slot is None or s > best_score or (s == best_score and iid < best_id):
                best_score, best_id, best_slot = s, iid, slot
        for m in empty:
            del self._buckets[m]
        return best_slot
