"""Turn the last slice's logits into token ids, so only ids (never vocab-sized logits) leave the slice.

Sampling is reproducible and replayable: row i draws from a generator seeded by (its seed, its position),
so re-running a step after a slice restart draws the same token as the first time.
"""

from __future__ import annotations

import torch

from .batch import SamplingParams

NO_TOKEN = -1  # a row whose logits are not finite: its request fails, the rest of the batch goes on


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of `logits` [B, V]; `NO_TOKEN` for a row with a NaN or infinite logit (say, from
    a broken adapter), which has no answer. Device-side only, so a captured decode step can end with it."""
    finite = torch.isfinite(logits).all(dim=-1)
    return logits.argmax(dim=-1).masked_fill(~finite, NO_TOKEN)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]: `greedy` for greedy rows (and rows with no answer), a seeded
    draw for the others."""
    tokens = greedy(logits)
    finite = tokens != NO_TOKEN
    for row, p in enumerate(params):
        if not p.greedy and finite[row]:
            tokens[row] = _draw(logits[row], p, positions[row])
    return tokens


def _draw(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    scores = logits / p.temperature
    if 0 < p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = torch.Generator(device="cpu").manual_seed((p.seed * 1_000_003 + position) % 2**63)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
