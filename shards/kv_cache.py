"""A slice's KV cache in fixed-size blocks (vLLM's paged layout, gpt-fast's plain buffers).

Keys and values of the slice's l-th full-attention layer for block b live at `k[l, b]` [block_size, kv_heads,
head_dim]. The gateway owns the block tables (server/block_manager.py): each step names, per row, the blocks
that hold that sequence's positions 0, 1, ... in order, so position p of a row is at offset p % block_size of
its table's block p // block_size. A slice only reads and writes the blocks a step names; it keeps no
per-sequence bookkeeping for attention, and two sequences that share a prefix read the same blocks.

One extra block, `scratch`, belongs to no sequence: padded rows of a static decode step (shards/step_inputs.py) and
padded table entries point at it, so gathers and writes index with tensors alone. The buffers are
zero-filled so never-written positions (masked out in attention) are finite: a NaN there would poison the
softmax even under a -inf mask.

Linear-attention layers (Qwen3.5's Gated DeltaNet) keep a fixed-size state per sequence instead, in one of
`num_slots` sequence slots: the conv state `conv[l, slot]` [conv_dim, kernel] and the DeltaNet state
`state[l, slot]` [heads, key_dim, value_dim], kept in fp32 as the kernels compute it. A step replaces them.

A cache built by a restarted actor holds nothing the gateway's tables point to. It refuses steps
(`CacheMismatch`) until the gateway resets it, which the gateway does only in a recovery, after which it
replays every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecurrentShape:
    """The per-sequence state of a slice's linear-attention layers."""

    layers: int
    conv_dim: int
    conv_kernel: int
    heads: int
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class CacheShape:
    """How much cache a slice holds: blocks for attention, slots for recurrent state."""

    num_blocks: int
    block_size: int
    num_slots: int  # sequences that can run at once (recurrent state, static decode rows)


class CacheMismatch(RuntimeError):
    """The gateway's view of a sequence and the slice's cache disagree; the gateway must re-prefill."""


def kv_bytes_per_token(attention_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in `attention_layers` layers (what sizes the block pool)."""
    return 2 * attention_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Keys and values of `num_layers` layers in `shape.num_blocks` blocks, plus recurrent state per slot."""

    def __init__(
        self,
        num_layers: int,
        shape: CacheShape,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        recurrent: RecurrentShape | None = None,
    ) -> None:
        blocks = (num_layers, shape.num_blocks + 1, shape.block_size, num_kv_heads, head_dim)  # + the scratch block
        self.k = torch.zeros(blocks, dtype=dtype, device=device)
        self.v = torch.zeros(blocks, dtype=dtype, device=device)
        r = recurrent or RecurrentShape(0, 0, 0, 0, 0, 0)
        self.conv = torch.zeros((r.layers, shape.num_slots, r.conv_dim, r.conv_kernel), dtype=dtype, device=device)
        self.state = torch.zeros((r.layers, shape.num_slots, r.heads, r.key_dim, r.value_dim), dtype=torch.float32,
                                 device=device)
        self.shape = shape
        self.block_size = shape.block_size
        self.scratch = shape.num_blocks  # written by padded rows, read by nobody
        self.live = False  # False until the gateway resets this cache (module docstring)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.conv.nbytes + self.state.nbytes

    def check(self, slots: list[int], blocks: list[list[int]], ends: list[int]) -> None:
        """Refuse a step this cache cannot hold: before the gateway reset it (a restarted actor), or one that
        names blocks or slots it does not have, or too few blocks for the row's positions."""
        if not self.live:
            raise CacheMismatch("this slice's cache was rebuilt (the actor restarted) and holds no sequence")
        for slot, table, end in zip(slots, blocks, ends, strict=True):
            if not 0 <= slot < self.shape.num_slots:
                raise ValueError(f"slot {slot} outside the cache's {self.shape.num_slots} slots")
            if len(table) * self.block_size < end:
                raise ValueError(f"{len(table)} blocks cannot hold {end} positions")
            if table and not 0 <= min(table) <= max(table) < self.shape.num_blocks:
                raise ValueError(f"a block outside the cache's {self.shape.num_blocks} blocks")

    def reset(self) -> None:
        """The gateway forgot every sequence (a recovery): from now on steps are accepted."""
        self.live = True

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new keys/values [N, kv_heads, head_dim] of N tokens at (block, offset) pairs.

        Indexed on the whole tensor, not on the layer's view (`self.k[layer, blocks, offsets] = k`): the same in
        eager mode, but a compiled step functionalizes a write into a view of its input as a copy of that view,
        which copied every layer's whole cache (8 MiB a layer at the 0.5B shape) on every step."""
        index = (torch.full_like(blocks, layer), blocks, offsets)
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, W * block_size, head_dim] of block tables [B, W] (padded with the
        scratch block): row b's positions 0 .. W * block_size - 1 in order."""
        bsz, width = tables.shape
        k = self.k[layer, tables].view(bsz, width * self.block_size, *self.k.shape[-2:])
        v = self.v[layer, tables].view(bsz, width * self.block_size, *self.v.shape[-2:])
        return k.transpose(1, 2), v.transpose(1, 2)

    def read_state(self, layer: int, slots: torch.Tensor, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the conv and DeltaNet states [B, ...] of linear layer `layer`; zeros for `fresh` rows (a
        sequence starting at position 0), whatever an earlier owner of the slot left there."""
        conv = torch.where(fresh[:, None, None], 0.0, self.conv[layer, slots])
        state = torch.where(fresh[:, None, None, None], 0.0, self.state[layer, slots])
        return conv, state

    def write_state(self, layer: int, slots: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.conv[layer, slots] = conv.to(self.conv.dtype)
        self.state[layer, slots] = state.to(self.state.dtype)
