"""The inputs of a static decode step: every row one new token, shapes fixed per bucket.

A decode step (every row one token: the steady state) can run with shapes that depend only on its bucket, so
`torch.compile(fullgraph=True)` traces it whole and CUDA graphs can capture it (shards/runner.py):

- the batch is padded to a bucket of rows (powers of two up to the slot count); a padded row reads token 0 at
  position 0 and writes its key and value to the cache's scratch block, which no sequence owns, so writes and
  reads index the cache with tensors alone;
- keys are read up to a context bucket (powers of two from `CONTEXT_FLOOR` up to the longest context a request
  may have): each row's block table is padded with the scratch block to the bucket's width, and the mask is
  built on the device from positions inside the step;
- everything a step needs is built here, on the host, from the `StepBatch`'s plain lists: one tensor each,
  before the first kernel, so nothing in the step waits on the host.

Prefill and mixed batches keep the dynamic path (`StepMetadata`, shards/model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import StepBatch

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
