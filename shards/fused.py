"""The elementwise work of a prompt step, fused by inductor, for fp32 CPU slices that compile their decode step.

A prompt step runs eagerly (its shapes change every step), and in eager mode each RMSNorm is five kernels (to
fp32, square, mean, rsqrt, scale, back), the MLP's activation two and rotary six, each a pass over the step's
activations. On a 512-token prefill of the 0.5B shape (2 threads) they took a quarter of the step, where
vLLM's compiled forward fuses them (docs/benchmarks.md). Here each is one small function compiled once with
symbolic shapes, so one graph serves every step size; the projections stay the slices' oneDNN calls. fp32
prefill measured 10% faster fused (same tokens); bf16 measured no faster once its intermediates were rounded
to bf16 where eager mode rounds them (faster without, but then its tokens were not eager's), so bf16 slices
keep the modules (shards/runner.py).

Only steps of at least `FUSE_MIN_TOKENS` tokens take them: a compiled call costs a guard check (tens of
microseconds) that a decode-sized step would not win back. Rotary is the family's own `apply_rotary_pos_emb`,
compiled; the norm and the gate are HF's Qwen2/Qwen3 RMSNorm and SiLU gate written as functions of tensors (a
compiled module would be guarded on each layer's instance), so a fused step computes what the modules
compute, in a different order of the same fp32 operations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

FUSE_MIN_TOKENS = 64
# The step size the warm-up compiles at: one no model dimension has, as inductor ties equal sizes together
# (duck sizing) and a graph compiled at 64 tokens would recompile for every step of another size.
WARMUP_TOKENS = 97
NORMS = (Qwen2RMSNorm, Qwen3RMSNorm)  # modules whose forward is `_rms_norm`


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


rms_norm = torch.compile(_rms_norm, dynamic=True)
silu_mul = torch.compile(_silu_mul, dynamic=True)


@functools.cache
def rotary(apply_rotary: Callable) -> Callable:
    """The family's own `apply_rotary_pos_emb` (a plain function of tensors), compiled once."""
    return torch.compile(apply_rotary, dynamic=True)


def norm(module: nn.Module, x: torch.Tensor, fuse: bool) -> torch.Tensor:
    """`module(x)`, fused where asked and the module is a plain RMSNorm."""
    if fuse and type(module) in NORMS:
        return rms_norm(x, module.weight, module.variance_epsilon)
    return module(x)
