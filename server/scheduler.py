"""Which sequences step next (nano-vllm's Scheduler: a waiting queue and a running set).

Each step is either a prefill step (new sequences, or running ones whose caches must be rebuilt) or a decode
step (running sequences, one token each). Prefills go first so that new requests join the running set at the
next step boundary: continuous batching. Rebuilding lost caches obeys the same prefill token budget as new
prompts, so a replay step is never larger than a normal one.

Several steps can be in flight at once, one per slice (docs/design.md, "Several batches in flight"). A
sequence's next token needs its last, so a sequence is in at most one in-flight step: `schedule` picks only
sequences that are not in flight, and a decode step takes at most its share (running / depth) of the running
set, so the running set splits across the in-flight steps instead of the first step taking everyone. A burst
of prompts splits the same way (a share of the backlog per step), so slice 0 prefills the second half while
slice 1 runs the first.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice

from .sequence import Sequence
from .slots import SlotAllocator

# A sequence in this many lost steps is a suspect (its step may be what kills the slice, e.g. out of memory):
# it steps alone until one of its steps gets through, so its neighbours are not lost with it again.
ISOLATE_AFTER_LOST_STEPS = 2


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

    def schedule(self, room: int = 1) -> list[Sequence]:
        """The next step's batch, from sequences not in flight; empty when there is nothing to do. `room`: the
        steps the pipe can take now, this one included; prompts waiting are shared out among them."""
        idle = [s for s in self.running if not s.in_flight]
        suspect = next((s for s in self.running if s.lost_steps >= ISOLATE_AFTER_LOST_STEPS), None)
        if suspect is not None:
            # It steps alone, with nothing else in the pipe, until it gets through a step, so it cannot take
            # others down again.
            return [suspect] if len(idle) == len(self.running) else []
        batch, budget = [], self._prefill_budget(idle, room)
        for seq in (s for s in idle if len(s.pending()) > 1):  # caches to rebuild, within the budget
            if batch and len(seq.pending()) > budget:
                return batch  # more rebuilds next step; new sequences wait until every cache is back
            batch.append(seq)
            budget -= len(seq.pending())
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

    def _prefill_budget(self, idle: list[Sequence], room: int) -> int:
        """This step's prefill tokens: the budget, or with room for several steps in the pipe a share of the
        backlog (caches to rebuild and prompts that have a slot), so a burst of prompts is cut into steps that
        follow each other down the pipe instead of one step the other slices wait for."""
        backlog = sum(len(s.pending()) for s in idle if len(s.pending()) > 1)
        backlog += sum(len(s.pending()) for s in islice(self.waiting, self.slots.num_free))
        return min(self.max_prefill_tokens, math.ceil(backlog / max(room, 1)))

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
