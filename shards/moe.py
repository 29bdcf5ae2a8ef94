"""Qwen3-MoE's sparse block with every expert a module of its own, under the published tensor names.

Hugging Face keeps a layer's experts fused into two 3-D parameters and converts the published per-expert
tensors (`mlp.experts.E.gate_proj.weight`, ...) when it loads a whole model; a slice instead holds each expert
as a plain MLP under exactly those names, so the loader reads only its own layers' experts, one tensor at a
time, and each expert's projections can be prepacked like any linear layer (shards/packed.py).

Routing is HF's: softmax over the router's logits in fp32, the top-k experts per token, their weights
renormalised when `norm_topk_prob`. Tokens are then grouped by expert (one sort), so each expert any token
chose runs once, as one GEMM over all of its tokens of the batch; experts no token chose cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP


class Router(nn.Linear):
    """The expert router (`mlp.gate`): a subclass so it is never prepacked; a different GEMM kernel could
    tip a near-tie in the top-k to another expert than `generate()` picks."""


class SparseMoe(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Router(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size)
                                     for _ in range(config.num_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype).flatten()

        order = chosen.flatten().argsort(stable=True)  # (token, k) pairs grouped by expert, tokens in order
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows, pairs = tokens[start:start + count], order[start:start + count]
            out.index_add_(0, rows, self.experts[expert](x[rows]) * weights[pairs, None])
            start += count
        return out.view_as(hidden)
