"""Block tables for tests that drive slice runners directly, without the gateway's BlockManager.

A runner keeps no per-sequence state for attention: every step names, per row, the blocks holding positions
0 .. end - 1 (shards/kv_cache.py). Here each slot owns a run of blocks of its own, interleaved with the other
slots' (slot s's k-th block is `base + k * stride + s`), so no row's table is a contiguous range and a row
that read another row's blocks, or a block out of order, would get other keys. `base` moves every table to
other blocks: what a replay after a lost cache gets from the gateway, whose new tables point anywhere.
"""

from __future__ import annotations

from qwen_relay.shards.batch import SamplingParams, StepBatch

STRIDE = 8  # slots whose runs interleave; a runner's max_slots must not exceed it


def own_blocks(slot: int, end: int, block_size: int, base: int = 0, stride: int = STRIDE) -> list[int]:
    """Slot `slot`'s blocks for positions 0 .. end - 1."""
    assert 0 <= slot < stride, f"slot {slot} outside the {stride} interleaved runs"
    return [base + k * stride + slot for k in range(-(-end // block_size))]


def blocks_needed(max_len: int, block_size: int, base: int = 0, stride: int = STRIDE) -> int:
    """Blocks a pool needs so every slot can hold `max_len` positions at `base`."""
    return base + -(-max_len // block_size) * stride


def step_batch(slots: list[int], starts: list[int], token_ids: list[list[int]], sampling: list[SamplingParams],
               adapters: list[str] | None = None, *, block_size: int = 16, base: int = 0) -> StepBatch:
    """A StepBatch whose rows use their slot's own blocks (`own_blocks`)."""
    blocks = [own_blocks(slot, start + len(ids), block_size, base)
              for slot, start, ids in zip(slots, starts, token_ids, strict=True)]
    return StepBatch(slots, starts, token_ids, blocks, sampling, adapters)


def runner_batch(runner, slots: list[int], starts: list[int], token_ids: list[list[int]],
                 sampling: list[SamplingParams] | None = None, adapters: list[str] | None = None,
                 base: int = 0) -> StepBatch:
    """`step_batch` with the runner's block size (greedy rows unless `sampling` says otherwise)."""
    sampling = sampling or [SamplingParams()] * len(slots)
    return step_batch(slots, starts, token_ids, sampling, adapters, block_size=runner.spec.block_size, base=base)
