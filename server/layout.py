"""How a model's layers are cut into contiguous slices.

Without `--layers`, slices get layer counts that even out their cost (`balanced_split`), not equal counts:
the slice with the LM head would otherwise be the pipeline's bottleneck. A slice's cost is counted in
parameters (each weight is read and used once per token row): the LM head costs vocab x hidden, the embedding
one row per token (hidden; nothing, in layers), and a decoder layer its parameter count plus
`LAYER_OVERHEAD` of it for the work that is not one big matmul (attention over the context, norms, rotary,
the activation: some thirty small operations). Measured on Qwen2.5-0.5B's shape, fp32 on one CPU thread at
decode batches of 1 to 8 rows, a layer took 1.35x the time its parameters' share of the LM head's time
predicts, so the 136M-parameter head is worth ~6.8 layers of 15M, not 9 (docs/benchmarks.md, "Pipelining").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOLERANCE = 1e-9  # relative: costs this close are equal
LAYER_OVERHEAD = 0.35  # a decoder layer's non-matmul work, as a share of its parameter count (measured)


@dataclass(frozen=True)
class ModelCosts:
    """Per-token cost of each part of the model, in multiply-adds (= parameters used once per token)."""

    layers: tuple[float, ...]  # each decoder layer
    embed: float  # the input embedding (on the first slice): one row looked up per token
    head: float  # the final norm and LM head (on the last slice)


def model_costs(config: Any) -> ModelCosts:
    """Count each decoder layer's parameters on a weightless (meta) copy of the model, so any layer type the
    config describes is counted as built, plus its overhead; the head is vocab x hidden, the embedding lookup
    hidden."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stack = next(m for m in model.modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers)
    layers = tuple(float(sum(p.numel() for p in layer.parameters())) * (1 + LAYER_OVERHEAD) for layer in stack)
    hidden = text.hidden_size
    return ModelCosts(layers=layers, embed=float(hidden), head=float(text.vocab_size * hidden + hidden))


def balanced_split(costs: ModelCosts, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous [first, end) ranges whose costs are as even as can be: the costliest slice as cheap
    as possible, then, among such splits, the smallest sum of squared slice costs (the rest evened out too).
    With equal layer costs and no head or embedding this is the even split, earlier slices larger."""
    n = len(costs.layers)
    if not 1 <= shards <= n:
        raise ValueError(f"--shards must be between 1 and the model's {n} layers, got {shards}")
    weights = list(costs.layers)
    weights[0] += costs.embed
    weights[-1] += costs.head
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(a: int, b: int) -> float:
        return prefix[b] - prefix[a]

    # Phase 1: the least possible cost of the costliest slice (minimax over cut points).
    inf = float("inf")
    worst = [[inf] * (n + 1) for _ in range(shards + 1)]  # worst[k][j]: first j layers in k slices
    worst[0][0] = 0.0
    for k in range(1, shards + 1):
        for j in range(k, n + 1):
            worst[k][j] = min(max(worst[k - 1][i], cost(i, j)) for i in range(k - 1, j))
    bound = worst[shards][n] * (1 + TOLERANCE)
    # Phase 2: under that bound, the least sum of squares; remember the cuts.
    best = [[inf] * (n + 1) for _ in range(shards + 1)]
    cut = [[0] * (n + 1) for _ in range(shards + 1)]
    best[0][0] = 0.0
    for k in range(1, shards + 1):
        for j in range(k, n + 1):
            for i in range(j - 1, k - 2, -1):  # on a tie the later cut wins: earlier slices take more layers
                c = cost(i, j)
                if c <= bound and best[k - 1][i] + c * c < best[k][j] * (1 - TOLERANCE):
                    best[k][j], cut[k][j] = best[k - 1][i] + c * c, i
    ranges, end = [], n
    for k in range(shards, 0, -1):
        ranges.append((cut[k][end], end))
        end = cut[k][end]
    return ranges[::-1]


def parse_layers(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """Parse `0-15,16-31` (inclusive ranges, in order, covering every layer once) into [first, end) ranges."""
    ranges, expected = [], 0
    for part in spec.split(","):
        first_text, sep, last_text = part.strip().partition("-")
        try:
            first, last = int(first_text), int(last_text if sep else first_text)
        except ValueError as e:
            raise ValueError(f"--layers: {part!r} is not a range like 0-15") from e
        if first != expected or last < first:
            raise ValueError(f"--layers: {part!r} must start at layer {expected} and not end before it starts")
        ranges.append((first, last + 1))
        expected = last + 1
    if expected != num_layers:
        raise ValueError(f"--layers: the ranges cover layers 0-{expected - 1}, the model has {num_layers}")
    return ranges


def describe(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b - 1}" for a, b in ranges)
