"""A preallocated, slot-indexed cache for one slice's layers (gpt-fast style buffers).

Every sequence owns one slot for its lifetime; its keys and values for position p of the slice's l-th
full-attention layer live at `k[l, slot, :, p]`. Sequences join and leave between steps without copying
anyone else's cache. One extra attention slot, `scratch`, belongs to no sequence: the padded rows of a static decode
step (shards/decode.py) write there, so that step needs no data-dependent indexing. The buffers are
zero-filled so that never-written positions (masked out in attention) are finite: a NaN there would poison
the softmax even under a -inf mask.

Linear-attention layers (Qwen3.5's Gated DeltaNet) keep a fixed-size state per sequence instead, allocated
per slot the same way: the conv state `conv[l, slot]` [conv_dim, kernel] and the DeltaNet state
`state[l, slot]` [heads, key_dim, value_dim], kept in fp32 as the kernels compute it. A step replaces them;
`lengths` counts the tokens they have absorbed, like the tokens cached for attention.
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


class CacheMismatch(RuntimeError):
    """The gateway's view of a sequence and the slice's cache disagree; the gateway must re-prefill."""


class KVCache:
    """Keys and values of `num_layers` layers for `num_slots` sequences of up to `max_len` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        recurrent: RecurrentShape | None = None,
    ) -> None:
        shape = (num_layers, num_slots + 1, num_kv_heads, max_len, head_dim)  # + the scratch slot
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        r = recurrent or RecurrentShape(0, 0, 0, 0, 0, 0)
        self.conv = torch.zeros((r.layers, num_slots, r.conv_dim, r.conv_kernel), dtype=dtype, device=device)
        self.state = torch.zeros((r.layers, num_slots, r.heads, r.key_dim, r.value_dim), dtype=torch.float32,
                                 device=device)
        self.num_slots = num_slots
        self.scratch = num_slots  # written by padded rows, read by nobody
        self.max_len = max_len
        self.lengths: dict[int, int] = {}  # slot -> tokens cached; a slot absent here holds nothing

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.conv.nbytes + self.state.nbytes

    def check(self, slots: list[int], starts: list[int], ends: list[int]) -> None:
        """Refuse a step that does not continue what this cache holds (say, after the actor restarted)."""
        for slot, start, end in zip(slots, starts, ends, strict=True):
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} outside the cache's {self.num_slots} slots")
            held = self.lengths.get(slot, 0)
            if start != held:
                raise CacheMismatch(f"slot {slot} holds {held} tokens but the step starts at {start}")
            if end > self.max_len:
                raise ValueError(f"slot {slot} would hold {end} tokens, over the cache's {self.max_len}")

    def commit(self, slots: list[int], ends: list[int]) -> None:
        for slot, end in zip(slots, ends, strict=True):
            self.lengths[slot] = end

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.lengths.pop(slot, None)

    def write(self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new keys/values [N, kv_heads, head_dim] of N tokens at (slot, position) pairs."""
        self.k[layer, slot_idx, :, pos_idx] = k
        self.v[layer, slot_idx, :, pos_idx] = v

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, length, head_dim] of the batch's slots.

        Consecutive slots (the common case: the allocator hands out the lowest free ones) are a view, not a
        copy; anything else gathers.
        """
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            rows = slice(first, first + len(slots))
        else:
            rows = torch.tensor(slots, device=self.k.device)
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]

    def gather(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, length, head_dim] of `slots` (a device tensor): the same indexing
        whatever the slots, as a captured step needs."""
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def read_state(self, layer: int, slots: torch.Tensor, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the conv and DeltaNet states [B, ...] of linear layer `layer`; zeros for `fresh` rows (a
        sequence starting at position 0), whatever an earlier owner of the slot left there."""
        conv = torch.where(fresh[:, None, None], 0.0, self.conv[layer, slots])
        state = torch.where(fresh[:, None, None, None], 0.0, self.state[layer, slots])
        return conv, state

    def write_state(self, layer: int, slots: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.conv[layer, slots] = conv.to(self.conv.dtype)
        self.state[layer, slots] = state.to(self.state.dtype)
