"""Cache-slot accounting (nano-vllm's BlockManager, with one fixed-size slot per sequence).

Every slice preallocates the same number of slots; the gateway alone decides who holds which, so a slot is
never handed out twice and slices need no coordination. The lowest free slot is handed out first, which
keeps a batch's slots consecutive and lets the cache read them as a view instead of a gather.
"""

from __future__ import annotations

import heapq


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free cache slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in use")
        heapq.heappush(self._free, slot)
