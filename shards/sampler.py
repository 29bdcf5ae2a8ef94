"""Turn the last slice's logits into token ids, so only ids (never vocab-sized logits) leave the slice.

One batched pass on the logits' device for every row: greedy rows take the argmax; sampled rows scale by their
temperature, keep their top-k and top-p candidates (sort and cumsum per row) and draw with the Gumbel-max
trick, argmax(scores + Gumbel noise). The noise is a counter-based hash (splitmix64's finaliser in int64
tensor ops) of (seed, position, vocab index), so a row's draw depends only on its own seed, position and
logits, never on the batch it is in: a step replayed after a slice restart or a preemption runs the position
in another batch and draws the same token. (These draws differ from the torch.Generator-based sampler this
replaced, for the same seed; greedy is unchanged.)
"""

from __future__ import annotations

import torch

from .batch import SamplingParams

NO_TOKEN = -1  # a row whose logits are not finite: its request fails, the rest of the batch goes on


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    c %= 2**64
    return c - 2**64 if c >= 2**63 else c


GAMMA = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment
MIX1, MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: int64 products wrap, as the uint64 ones do."""
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V], float32, a pure function of each row's (seed, position) and the vocab index."""
    row = _mix(_mix(seeds + GAMMA) ^ positions)
    index = torch.arange(1, vocab + 1, device=seeds.device)
    return gumbel(_mix(row[:, None] + index[None, :] * GAMMA))


def gumbel(bits: torch.Tensor) -> torch.Tensor:
    """Random int64 bits to Gumbel(0, 1), finite for every input: the top 23 bits make a uniform in (0, 1)
    that float32 holds exactly (with 24, the largest rounds to 1.0 and its noise is infinite)."""
    uniform = (_shr(bits, 41).float() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(uniform))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of `logits` [B, V] (the first of tied maxima, as `argmax` and so `generate()`);
    `NO_TOKEN` for a row with a NaN or infinite logit (say, from a broken adapter), which has no answer.

    Two single passes over the logits: `max`'s indices, and a row sum in float32, which is finite exactly when
    every logit is (or when finite logits sum past float32's 3.4e38, which no working model's do). On a CPU,
    `argmax` and `isfinite().all()` took ten times as long: 10.6 ms for a 16-row bf16 batch of Qwen's 151936
    logits, a tenth of a decode step (docs/benchmarks.md)."""
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
    return logits.max(dim=-1).indices.masked_fill(~finite, NO_TOKEN)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    """One token per row of `logits` [B, V] on their device: `greedy` for greedy rows and rows with no answer,
    a seeded draw for the others (row i seeded by (params[i].seed, positions[i]))."""
    tokens = greedy(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    drawn = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([p.temperature for p in drawn], device=device)
    scores = logits[index].float() / temperature[:, None]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in drawn):
        scores = scores.masked_fill(~_candidates(scores, drawn), float("-inf"))
    seeds = torch.tensor([_signed(p.seed) for p in drawn], device=device)
    noise = gumbel_noise(seeds, torch.tensor([positions[i] for i in rows], device=device), vocab)
    picks = (scores + noise).argmax(dim=-1)
    tokens[index] = torch.where(tokens[index] == NO_TOKEN, NO_TOKEN, picks)
    return tokens


def _candidates(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's top-k, then within those the smallest prefix whose probability mass reaches top_p (always the
    top token): a mask [B, V] in vocab order. top_k 0 (or >= V) and top_p 1 keep everything."""
    device, vocab = scores.device, scores.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    ordered, order = scores.sort(dim=-1, descending=True)
    keep = torch.arange(vocab, device=device)[None, :] < top_k[:, None]
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= (probs.cumsum(-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    return torch.zeros_like(keep).scatter_(1, order, keep)
