"""What one decoding step asks of every slice: a batch of sequences, their cache slots and new tokens.

The gateway builds one `StepBatch` per step and every slice receives the same object, so a slice never needs
to ask the gateway anything: slot and start say where the new tokens' keys and values go in its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Sequences that step together: for row i, `token_ids[i]` go into cache slot `slots[i]` at `starts[i]`.

    A prefill has `starts[i] == 0` and the whole prompt; a decode has one token; a replay after a lost cache
    is a prefill of prompt plus everything generated so far. One shape covers all three.

    `release` lists slots of finished sequences that every slice forgets before it runs the rows. Carried on
    the step, a release reaches each slice in step order with no ordering of its own: a slot freed and handed
    to a new sequence in the same step is released before the new prefill is checked. A batch may carry only
    releases (no rows).
    """

    slots: list[int]
    starts: list[int]
    token_ids: list[list[int]]
    sampling: list[SamplingParams]
    adapters: list[str] | None = None
    release: list[int] = field(default_factory=list)

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
