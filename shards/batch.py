"""What one decoding step asks of every slice: a batch of sequences, their KV blocks and new tokens.

The gateway builds one `StepBatch` per step and every slice receives the same object, so a slice never needs
to ask the gateway anything: the block table and start say where the new tokens' keys and values go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the last slice picks a sequence's next token. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StepBatch:
    """Sequences that step together: row i brings `token_ids[i]` at positions `starts[i]` onward; its keys and
    values go to (and its attention reads) the KV blocks `blocks[i]`, which cover positions 0 .. end - 1 in
    order; `slots[i]` is its sequence slot (recurrent state of linear-attention layers, static decode rows).

    A prefill has `starts[i] == 0` and the whole prompt, or with a prefix found in the cache the prompt's
    uncached rest; a chunk of a long prompt brings part of it (its sampled token is ignored); a decode brings
    one token; a replay after a lost cache is a prefill of prompt plus everything generated so far. One shape
    covers all of them. The gateway owns the blocks (server/block_manager.py): a slice keeps no per-sequence
    state for attention, so a finished sequence needs no message to any slice.
    """

    slots: list[int]
    starts: list[int]
    token_ids: list[list[int]]
    blocks: list[list[int]]
    sampling: list[SamplingParams]
    adapters: list[str] | None = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def ends(self) -> list[int]:
        """Cache length of each row after this step."""
        return [s + len(t) for s, t in zip(self.starts, self.token_ids, strict=True)]

    def padded(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T], absolute positions [B, T] and a validity mask [B, T]."""
        lengths = torch.tensor([len(t) for t in self.token_ids], device=device)
        width = int(lengths.max())
        ids = torch.zeros(len(self), width, dtype=torch.long, device=device)
        for row, tokens in enumerate(self.token_ids):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        offsets = torch.arange(width, device=device)
        positions = torch.tensor(self.starts, device=device)[:, None] + offsets[None, :]
        valid = offsets[None, :] < lengths[:, None]
        return ids, positions, valid

    def tables(self, width: int, scratch: int, device: torch.device) -> torch.Tensor:
        """Block tables [B, width]: each row's blocks, padded with `scratch` (a block nobody reads)."""
        return torch.tensor([t[:width] + [scratch] * (width - len(t[:width])) for t in self.blocks],
                            dtype=torch.long, device=device)
