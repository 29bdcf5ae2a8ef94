"""What one step's batch becomes on the device, before the first kernel: the inputs every layer reads.

Two shapes of step, side by side:

- `StepMetadata`, the dynamic path (any batch: prefills, chunks, mixed batches, and every step of a slice
  with no static decode): sized from the batch (the longest row, real tokens found with `nonzero()`), so its
  shapes change every step. Its attention runs in `AttentionGroup`s: the one-token rows together, each longer
  row alone, so a prompt chunk does not pad every decode row of its step to the chunk's width (a 136-token
  prompt beside 15 decodes: 581 ms in one padded call on the 0.5B shape in bf16, more than the two steps apart).
- `DecodeInputs`, the static decode step (every row one new token: the steady state), whose shapes depend
  only on its bucket, so `torch.compile(fullgraph=True)` traces `ModelSlice.decode` whole and CUDA graphs can
  capture it (shards/runner.py):
  - the batch is padded to a bucket of rows (powers of two up to the slot count); a padded row reads token 0
    at position 0 and writes its key and value to the cache's scratch block, which no sequence owns, so
    writes and reads index the cache with tensors alone;
  - keys are read up to a context bucket (powers of two from `CONTEXT_FLOOR` up to the longest context a
    request may have): each row's block table is padded with the scratch block to the bucket's width, and
    the mask is built on the device from positions inside the step.

Both are built here, on the host, from the `StepBatch`'s plain lists: one tensor each, before the first
kernel, so nothing in a static step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import StepBatch


@dataclass(frozen=True)
class AttentionGroup:
    """Rows whose queries meet their keys in one attention call: every one-token row of the step (width 1),
    or one longer row. Keys are read only up to the group's longest row."""

    tokens: torch.Tensor  # [n] the group's tokens among the step's N packed tokens, row by row
    tables: torch.Tensor  # [b, w] its rows' KV blocks, w covering its longest row
    mask: torch.Tensor  # [b, 1, t, w * block_size] key p visible to query q iff p <= q (the slice makes it additive)
    width: int  # t: 1 for the one-token rows, else the row's tokens
    lengths: torch.Tensor  # [b] each row's positions so far (a one-token row's query sees keys 0 .. length - 1)


@dataclass(frozen=True)
class StepMetadata:
    """What every layer of a slice needs to know about one step's batch, built once per step."""

    ids: torch.Tensor  # [B, T] right-padded token ids (read by the first slice only)
    positions: torch.Tensor  # [B, T] absolute positions; pads continue past the row's end
    valid: torch.Tensor  # [B, T] True for real tokens
    slot_index: torch.Tensor  # [B] each row's sequence slot (recurrent state)
    write_rows: torch.Tensor  # [N] row of each real token, to write its key/value
    write_cols: torch.Tensor  # [N] its column in the padded batch
    write_blocks: torch.Tensor  # [N] the block its key/value goes to
    write_offsets: torch.Tensor  # [N] its offset in that block
    last: torch.Tensor  # [B] column of each row's last real token
    last_token: torch.Tensor  # [B] the same token's index among the step's N real tokens (packed order)
    fresh: torch.Tensor  # [B] rows starting at position 0: their recurrent state starts from zeros
    groups: tuple[AttentionGroup, ...]  # the attention calls of a layer, covering the N tokens between them

    @classmethod
    def build(cls, batch: StepBatch, device: torch.device, block_size: int, scratch: int) -> StepMetadata:
        ids, positions, valid = batch.padded(device)
        width = -(-max(batch.ends()) // block_size)
        tables = batch.tables(width, scratch, device)
        key_pos = torch.arange(width * block_size, device=device)
        query_pos = torch.where(valid, positions, 0)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
        rows, cols = valid.nonzero(as_tuple=True)
        at = positions[rows, cols]
        lengths = [len(t) for t in batch.token_ids]
        last = torch.tensor([n - 1 for n in lengths], device=device)
        last_token = torch.tensor(lengths, device=device).cumsum(0) - 1
        fresh = torch.tensor([s == 0 for s in batch.starts], device=device)
        return cls(ids=ids, positions=positions, valid=valid,
                   slot_index=torch.tensor(batch.slots, device=device), write_rows=rows, write_cols=cols,
                   write_blocks=tables[rows, at // block_size], write_offsets=at % block_size, last=last,
                   last_token=last_token, fresh=fresh, groups=_groups(batch, tables, mask, block_size))


def _groups(batch: StepBatch, tables: torch.Tensor, mask: torch.Tensor, block_size: int) -> tuple[AttentionGroup, ...]:
    """The one-token rows as one group, then each longer row alone (see `AttentionGroup`)."""
    lengths = [len(t) for t in batch.token_ids]
    firsts = [sum(lengths[:i]) for i in range(len(lengths))]  # each row's first token in packed order
    ends = batch.ends()
    singles = [i for i, n in enumerate(lengths) if n == 1]
    members = ([singles] if singles else []) + [[i] for i, n in enumerate(lengths) if n > 1]
    groups = []
    for rows in members:
        width = lengths[rows[0]] if len(rows) == 1 else 1
        blocks = -(-max(ends[i] for i in rows) // block_size)
        index = torch.tensor(rows, device=tables.device)
        tokens = [firsts[i] + c for i in rows for c in range(lengths[i])]
        groups.append(AttentionGroup(tokens=torch.tensor(tokens, device=tables.device),
                                     tables=tables[index, :blocks].contiguous(),  # as the paged kernel reads it
                                     mask=mask[index, :, :width, : blocks * block_size], width=width,
                                     lengths=torch.tensor([ends[i] for i in rows], device=tables.device)))
    return tuple(groups)


CONTEXT_FLOOR = 128  # the smallest context bucket: short sequences share one graph


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), but never over `cap` (itself the last bucket)."""
    size = max(floor, 1)
    while size < n:
        size *= 2
    return min(size, cap)


def is_decode(batch: StepBatch) -> bool:
    """Every row brings exactly one token (a 1-token prompt at position 0 counts too)."""
    return len(batch) > 0 and all(len(t) == 1 for t in batch.token_ids)


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step's padded inputs. `rows` real rows come first; the rest are padding."""

    ids: torch.Tensor  # [R, 1] the new token of each row (read by the first slice only)
    positions: torch.Tensor  # [R, 1] its position; 0 for padding
    tables: torch.Tensor  # [R, W] each row's blocks up to the context bucket; the scratch block for padding
    rows: int  # real rows

    @classmethod
    def build(cls, batch: StepBatch, device: torch.device, max_rows: int, max_len: int, block_size: int,
              scratch: int) -> DecodeInputs:
        height = bucket(len(batch), max_rows)
        pad = height - len(batch)
        context = bucket(max(batch.ends()), max(max_len, block_size), max(CONTEXT_FLOOR, block_size))
        width = -(-context // block_size)
        tables = batch.tables(width, scratch, device)
        if pad:
            tables = torch.cat([tables, tables.new_full((pad, width), scratch)])
        return cls(
            ids=torch.tensor([t[0] for t in batch.token_ids] + [0] * pad, device=device)[:, None],
            positions=torch.tensor(list(batch.starts) + [0] * pad, device=device)[:, None],
            tables=tables,
            rows=len(batch),
        )

    def pad(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [rows, 1, H] from the previous slice, padded with zero rows to the bucket."""
        extra = self.tables.shape[0] - hidden.shape[0]
        return torch.cat([hidden, hidden.new_zeros(extra, *hidden.shape[1:])]) if extra else hidden
