"""Which sequences step next, and how many of their tokens (nano-vllm's Scheduler, vLLM v1's token budget).

A step has a token budget (`max_step_tokens`), not a phase: running sequences that decode (one token each) go
first, then chunks of prompts until the budget is spent. A long prompt is cut over several steps and mixed
with the running decodes, so running streams keep producing while it arrives: continuous batching with
chunked prefill. A row that brings only part of a prompt produces no token; the engine ignores what the last
slice sampled for it. Rebuilding lost caches (a replay) is a prompt like any other.

Sequences are admitted by the KV blocks they need now (server/block_manager.py), not by a slot of the longest
context: a new sequence first takes the longest cached prefix of its tokens, then blocks for its first chunk.
When a running sequence needs a block and none is free, the newest running sequence that is not in a step in
flight is preempted: its blocks go back, it returns to the head of the queue with its tokens, and it is
prefilled again later (through the prefix cache, if its blocks are still there), so it produces the same
tokens. Nothing fails or hangs for want of blocks: the pool holds at least one longest sequence.

Several steps can be in flight at once, one per slice (docs/design.md, "Several batches in flight"). A
sequence's next token needs its last, so a sequence is in at most one in-flight step: `schedule` picks only
sequences that are not in flight, and the decodes of a step are at most its share (running / depth) of the
running set, so the running set splits across the in-flight steps instead of the first step taking everyone.
A burst of prompts splits the same way (a share of the backlog per step), so slice 0 prefills the second half
while slice 1 runs the first; a lone prompt goes whole, as its halves could only follow each other.

The replay policy lives here too: a sequence in `ISOLATE_AFTER_LOST_STEPS` lost steps steps alone (its step
may be what kills the slice, e.g. out of memory), until one of its steps gets through; one in
`max_lost_steps` lost steps is out of strikes and fails.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence
from .slots import SlotAllocator

ISOLATE_AFTER_LOST_STEPS = 2


@dataclass(frozen=True)
class Row:
    """One sequence's part of a step: its next `count` uncached tokens."""

    seq: Sequence
    count: int

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens[self.seq.num_cached:self.seq.num_cached + self.count]

    @property
    def completes(self) -> bool:
        """The row reaches the sequence's last token: the token sampled for it is the sequence's next."""
        return self.seq.num_cached + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(self, num_slots: int, blocks: BlockManager, max_step_tokens: int, depth: int = 1,
                 max_lost_steps: int = 3) -> None:
        if max_step_tokens <= num_slots:
            raise ValueError(f"a step's token budget ({max_step_tokens}) must exceed the sequences that can run at "
                             f"once ({num_slots}), or prompts could starve behind decodes")
        self.slots = SlotAllocator(num_slots)
        self.blocks = blocks
        self.max_step_tokens = max_step_tokens
        self.depth = depth  # steps the engine keeps in flight at most
        self.max_lost_steps = max_lost_steps  # a sequence in this many lost steps fails (ReplayLimit)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def sequences(self) -> list[Sequence]:
        """Every sequence waiting or running."""
        return [*self.waiting, *self.running]

    def users_of(self, adapter: str) -> list[Sequence]:
        return [s for s in self.sequences() if s.params.adapter == adapter]

    def holding_blocks(self) -> int:
        return sum(1 for s in self.running if s.block_table)

    def cancelled(self) -> list[Sequence]:
        """Cancelled sequences that may finish now: not in a step in flight (their blocks are in use until it is
        back)."""
        return [s for s in self.sequences() if s.cancelled and not s.in_flight]

    def strike(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences of a step that lost a slice get a strike; returns those out of strikes (they fail: their
        step may be what kills the slice). One with `ISOLATE_AFTER_LOST_STEPS` strikes steps alone."""
        for seq in seqs:
            seq.lost_steps += 1
        return [s for s in seqs if s.lost_steps >= self.max_lost_steps]

    def stepped(self, rows: list[Row]) -> None:
        """A step got through: a sequence that stepped alone is cleared of its strikes (not what kills the
        slice)."""
        if len(rows) == 1:
            rows[0].seq.lost_steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, room: int = 1) -> list[Row]:
        """The next step's rows, from sequences not in flight; empty when there is nothing to do. `room`: the
        steps the pipe can take now, this one included; prompts waiting are shared out among them."""
        idle = [s for s in self.running if not s.in_flight]
        suspect = next((s for s in self.running if s.lost_steps >= ISOLATE_AFTER_LOST_STEPS), None)
        if suspect is not None:
            # It steps alone, with nothing else in the pipe, until it gets through a step, so it cannot take
            # others down again.
            if len(idle) < len(self.running):
                return []
            row = self._row(suspect, min(len(suspect.pending()), self.max_step_tokens), [])
            return [row] if row else []
        rows: list[Row] = []
        share = math.ceil(len(self.running) / self.depth)
        for seq in [s for s in idle if self._decoding(s)][:share]:
            row = self._row(seq, 1, rows)
            if row:
                rows.append(row)
        budget = min(self.max_step_tokens - len(rows), self._prefill_share(idle, room))
        for seq in [s for s in idle if not self._decoding(s) and s in self.running]:
            if budget <= 0:
                return rows
            row = self._row(seq, min(len(seq.pending()), budget), rows)
            if row is None:
                return rows
            rows.append(row)
            budget -= row.count
        while self.waiting and self.slots.num_free and budget > 0:
            seq = self.waiting[0]
            self.blocks.admit(seq)
            count = min(len(seq.pending()), budget)
            if not self.blocks.reserve(seq, seq.num_cached + count):
                self.blocks.release(seq)  # back to waiting without holding anything
                break
            self.waiting.popleft()
            self.blocks.count_admitted(seq)
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            rows.append(Row(seq, count))
            budget -= count
        return rows

    @staticmethod
    def _decoding(seq: Sequence) -> bool:
        return seq.block_table != [] and len(seq.pending()) == 1

    def _row(self, seq: Sequence, count: int, taken: list[Row]) -> Row | None:
        """A row of `count` tokens for a running sequence, with the blocks it needs: preempting the newest
        other running sequences (not in flight, not in this step) while none are free. None if the blocks
        cannot be had now, or if the sequence itself was the one to go (or went for an earlier row)."""
        if seq not in self.running:
            return None
        if not seq.block_table:  # replayed after a lost cache, or preempted and back: find its prefix again
            self.blocks.admit(seq)
            count = min(count, len(seq.pending()))
        while not self.blocks.reserve(seq, seq.num_cached + count):
            busy = {r.seq for r in taken}
            victim = next((s for s in reversed(self.running) if not s.in_flight and s not in busy), None)
            if victim is None:
                return None
            self.preempt(victim)
            if victim is seq:
                return None
        return Row(seq, count)

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue without blocks or slot; its tokens are prefilled again later."""
        self.running.remove(seq)
        self.blocks.release(seq)
        self.slots.free(seq.slot)
        seq.slot = None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _prefill_share(self, idle: list[Sequence], room: int) -> int:
        """This step's share of the prefill backlog (running prompts and replays, and prompts that could start)
        with room for several steps in the pipe, so a burst of prompts is cut into steps that follow each other
        down the pipe instead of one step the other slices wait for. A sequence is in one step at a time, so the
        backlog is shared among no more steps than there are prompts in it: a lone prompt goes whole (up to the
        budget), not in shrinking pieces each waiting for the one before to come back."""
        prompts = [len(s.pending()) for s in idle if not self._decoding(s)]
        prompts += [len(s.pending()) for s in list(self.waiting)[: self.slots.num_free]]
        return math.ceil(sum(prompts) / max(min(room, len(prompts)), 1))

    def done(self, rows: list[Row]) -> None:
        """A step came back from every slice: its tokens are cached, its full blocks enter the prefix index."""
        for row in rows:
            row.seq.num_cached += row.count
            self.blocks.register(row.seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of scheduling, with its blocks and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def caches_lost(self) -> None:
        """The slices lost their caches (a recovery): every running sequence is prefilled again from scratch."""
        self.blocks.reset()
        for seq in self.running:
            seq.block_table, seq.block_keys, seq.num_cached = [], [], 0
