"""Which KV blocks each sequence holds, and which blocks hold which prefix (nano-vllm's BlockManager, vLLM v1's
prefix cache).

Every slice holds the same number of blocks; the gateway alone decides who holds which, so slices need no
coordination and a block is never handed out twice (docs/design.md, "KV blocks and shared prefixes").

A full block is keyed by a hash chain: (the previous block's key, its tokens, the adapter's content
fingerprint), so a key names the whole prefix up to that block under that adapter. Keys enter the index once
the step that filled the block is back from every slice; a later sequence whose tokens begin with the same
blocks takes them (reference count + 1) and prefills only the rest. A block is never written once full, so
sharing needs no copy. The adapter's fingerprint is of its files, not its name: an adapter reloaded under the
same name with other weights can never be served another version's keys and values.

Blocks nobody holds go to a free queue in least-recently-freed order and keep their key until they are taken
again, so the next turn of a conversation finds the last turn's blocks. A sequence's blocks are queued tail
first, so under pressure the ends of prefixes go before their beginnings; blocks with no key go first of all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: int | None = None  # set while the block is in the prefix index
    tokens: tuple[int, ...] = ()  # the tokens under `key`, checked on a hit (a hash is not an identity)


@dataclass
class CacheUsage:
    """Counters since start (a recovery empties the cache, not these)."""

    prompt_tokens: int = 0  # prompt tokens of admitted sequences (first admission only)
    hit_tokens: int = 0  # of those, found in the prefix cache


@dataclass(frozen=True)
class KvStats:
    """The KV cache seen from outside (metrics, GetModelInfo)."""

    capacity_tokens: int
    block_size: int
    blocks_free: int
    blocks_used: int
    prefix_cache: bool
    prompt_tokens: int
    hit_tokens: int
    preemptions: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one position")
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out: evicted first
        self.index: dict[int, int] = {}  # key -> block id
        self.usage = CacheUsage()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def stats(self, preemptions: int) -> KvStats:
        return KvStats(capacity_tokens=self.capacity_tokens, block_size=self.block_size, blocks_free=self.num_free,
                       blocks_used=self.num_blocks - self.num_free, prefix_cache=self.prefix_cache,
                       prompt_tokens=self.usage.prompt_tokens, hit_tokens=self.usage.hit_tokens,
                       preemptions=preemptions)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def admit(self, seq: Sequence) -> None:
        """Give a sequence with no blocks the longest cached prefix of its tokens. At least its last token is
        left to compute: a step must produce the logits its next token comes from."""
        assert not seq.block_table, f"request {seq.log_id} already holds blocks"
        hits: list[Block] = []
        if self.prefix_cache:
            key = None
            for i in range((len(seq.tokens) - 1) // self.block_size):
                key, tokens = self._key(seq, i, key)
                block = self.blocks[self.index[key]] if key in self.index else None
                if block is None or block.tokens != tokens:
                    break
                hits.append(block)
                seq.block_keys.append(key)
        for block in hits:
            if block.ref_count == 0:
                del self.free[block.id]
            block.ref_count += 1
        seq.block_table = [b.id for b in hits]
        seq.num_cached = len(hits) * self.block_size

    def count_admitted(self, seq: Sequence) -> None:
        """Count a sequence's prompt and its cached part once, when it first starts running (a preempted or
        replayed sequence is not counted again)."""
        if seq.cached_tokens is None:
            seq.cached_tokens = min(seq.num_cached, len(seq.prompt_ids))
            self.usage.prompt_tokens += len(seq.prompt_ids)
            self.usage.hit_tokens += seq.cached_tokens

    def reserve(self, seq: Sequence, end: int) -> bool:
        """Blocks for positions up to `end`; False (nothing taken) if too few are free."""
        need = self.blocks_for(end) - len(seq.block_table)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:  # evicted from the prefix index
            if self.index.get(block.key) == block_id:
                del self.index[block.key]
            block.key, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def register(self, seq: Sequence) -> None:
        """Index the sequence's blocks that its last step filled (their keys and values are on every slice now)."""
        if not self.prefix_cache:
            return
        key = seq.block_keys[-1] if seq.block_keys else None
        for i in range(len(seq.block_keys), seq.num_cached // self.block_size):
            key, tokens = self._key(seq, i, key)
            seq.block_keys.append(key)
            block = self.blocks[seq.block_table[i]]
            if key not in self.index:  # else another sequence computed the same prefix first: keep that one
                self.index[key] = block.id
                block.key, block.tokens = key, tokens

    def _key(self, seq: Sequence, i: int, parent: int | None) -> tuple[int, tuple[int, ...]]:
        """The prefix-index key of the sequence's block `i` (its parent's key, its tokens, the adapter's
        fingerprint), and the block's tokens."""
        tokens = tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])
        return hash((parent, tokens, seq.params.adapter_fingerprint)), tokens

    def release(self, seq: Sequence) -> None:
        """The sequence finished, was preempted or its caches were lost: its blocks go back, tail first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.key is None:  # nothing to find in it: taken before any cached prefix
                    self.free.move_to_end(block_id, last=False)
        seq.block_table, seq.block_keys = [], []
        seq.num_cached = 0

    def reset(self) -> None:
        """The slices lost their caches (a recovery): nothing is held and nothing is cached."""
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict.fromkeys(range(self.num_blocks))
        self.index.clear()
