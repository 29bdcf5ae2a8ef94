"""Which sequences step next (nano-vllm's Scheduler: a waiting queue and a running set).

Each step is either a prefill step (new sequences, or running ones whose caches must be rebuilt) or a decode
step (running sequences, one token each). Prefills go first so that new requests join the running set at the
next step boundary: continuous batching.

Several steps can be in flight at once, one per slice (docs/design.md, "Several batches in flight"). A
sequence's next token needs its last, so a sequence is in at most one in-flight step: `schedule` picks only
sequences that are not in flight, and a decode step takes at most its share (running / depth) of the running
set, so the running set splits across the in-flight steps instead of the first step taking everyone.
"""

from __future__ import annotations

import math
from collections import deque

from .sequence import Sequence
from .slots import SlotAllocator


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int, depth: int = 1) -> None:
        self.slots = SlotAllocator(num_slots)
        self.max_prefill_tokens = max_prefill_tokens
        self.depth = depth  # steps the engine keeps in flight at most
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The next step's batch, from sequences not in flight; empty when there is nothing to do."""
        idle = [s for s in self.running if not s.in_flight]
        batch = [s for s in idle if len(s.pending()) > 1]  # caches to rebuild
        budget = self.max_prefill_tokens - sum(len(s.pending()) for s in batch)
        while self.waiting and self.slots.num_free:
            seq = self.waiting[0]
            if batch and len(seq.pending()) > budget:
                break  # over this step's prefill budget; a step of its own comes next
            self.waiting.popleft()
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            batch.append(seq)
            budget -= len(seq.pending())
        if batch:
            return batch
        return idle[: math.ceil(len(self.running) / self.depth)]

    def finish(self, seq: Sequence) -> int | None:
        """Take a sequence out of scheduling; returns the cache slot the slices must release, if any."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self.slots.free(slot)
        return slot
