"""Which sequences step next (nano-vllm's Scheduler: a waiting queue and a running set).

Each step is either a prefill step (new sequences, or running ones whose caches must be rebuilt) or a decode
step (every running sequence, one token each). Prefills go first so that new requests join the running batch
at the next step boundary: continuous batching.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status
from .slots import SlotAllocator


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int) -> None:
        self.slots = SlotAllocator(num_slots)
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The next step's batch; empty when there is nothing to do."""
        batch = [s for s in self.running if len(s.pending()) > 1]  # caches to rebuild
        budget = self.max_prefill_tokens - sum(len(s.pending()) for s in batch)
        while self.waiting and self.slots.num_free:
            seq = self.waiting[0]
            if batch and len(seq.pending()) > budget:
                break  # over this step's prefill budget; a step of its own comes next
            self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(seq)
            budget -= len(seq.pending())
        return batch or list(self.running)

    def finish(self, seq: Sequence) -> int | None:
        """Take a sequence out of scheduling; returns the cache slot the slices must release, if any."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self.slots.free(slot)
        return slot
