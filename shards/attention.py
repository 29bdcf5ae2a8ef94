"""Attention over the slot cache with grouped KV heads, and which kernel runs it, chosen once per slice.

Qwen shares each KV head among G query heads (GQA). Two ways to hand that to `scaled_dot_product_attention`:

- `expanded`: queries [B, H, T, D] against keys [B, Hkv, L, D] with `enable_gqa=True`. The CPU kernel takes
  the mask as is; in fp32 it is as fast as the folded layout at the 0.5B shape (docs/benchmarks.md), but in bf16
  it is 5-17x slower at decode (B x H one-row tasks that each convert their K/V block). On CUDA the fused kernels
  that accept a mask do not all accept `enable_gqa`, and the math fallback repeats K/V per head in fp32.
- `folded`: the G query heads of a KV head become G x T query rows of that head, [B, Hkv, G*T, D], and the mask
  is repeated over them (a stride-0 view at decode, T = 1). It is plain multi-head attention with Hkv heads, so
  a fused kernel that takes a mask (SDPA's memory-efficient one on CUDA) runs it and K/V are never expanded.

On a CPU, one-token queries read the block cache in place instead, without either layout's gathered copy
(shards/paged_attention.py); these layouts serve prompt chunks there, and everything on CUDA.

Masks are additive (0 where a key is visible, -inf where not, in the queries' dtype: `additive_mask`), built
once per step. Given a boolean mask, SDPA converts it to exactly that on every call, twice per layer: at a
256-token prompt (bf16, the 0.5B shape, 2 threads) 8 ms of a 233 ms step, the outputs bit for bit the same.

`choose_attention` picks the path for the slice's device, dtype and head layout at start-up and asks PyTorch
which SDPA backend it will dispatch that call to (`torch._fused_sdp_choice`), so the log line names the kernel
that really runs, and warns when it is the unfused math kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: visible) as the additive one SDPA makes of it: 0 or -inf, in `dtype`."""
    return torch.where(visible, 0.0, torch.full((), float("-inf"), dtype=dtype, device=visible.device))


def expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D], additive mask [B, 1, T, L] (`additive_mask`) -> [B, H, T, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def fold(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [B, Hkv, G*T, D] and mask [B, 1, G*T, L] of the folded layout. Query head h reads KV head
    h // G (as `repeat_kv` and `enable_gqa` pair them), so head-major order groups them already."""
    bsz, heads, width, dim = q.shape
    groups = heads // k.shape[1]
    q = q.reshape(bsz, k.shape[1], groups * width, dim)
    mask = mask[:, :, None].expand(bsz, 1, groups, width, mask.shape[-1]).reshape(bsz, 1, groups * width, -1)
    return q, mask


def folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Same contract as `expanded`, through the folded layout (no `enable_gqa`, no K/V repeat)."""
    fq, fmask = fold(q, k, mask)
    return F.scaled_dot_product_attention(fq, k, v, attn_mask=fmask).view(q.shape)


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # "expanded" or "folded"
    attend: Attend
    backend: str  # the SDPA backend PyTorch dispatches it to, e.g. "FLASH_ATTENTION", "EFFICIENT_ATTENTION"


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, gqa: bool) -> str:
    """The SDPA backend these inputs dispatch to (what `scaled_dot_product_attention` would run)."""
    choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None, enable_gqa=gqa)
    return SDPBackend(choice).name


def choose_attention(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                     head_dim: int) -> AttentionChoice:
    """CPU: `expanded` in fp32 (the layout `generate()` computes, as fast there), `folded` in bf16/fp16 (5-17x
    faster at decode). CUDA: `folded` when a fused kernel takes it, else `expanded`. Logged once, with the backend
    PyTorch will dispatch a decode step to."""
    q = torch.zeros(2, heads, 1, head_dim, dtype=dtype, device=device)
    k = torch.zeros(2, kv_heads, 64, head_dim, dtype=dtype, device=device)
    mask = additive_mask(torch.ones(2, 1, 1, 64, dtype=torch.bool, device=device), dtype)
    name, attend, backend = "expanded", expanded, sdpa_backend(q, k, k, mask, gqa=True)
    if device.type == "cpu" and dtype != torch.float32:
        fq, fmask = fold(q, k, mask)
        name, attend, backend = "folded", folded, sdpa_backend(fq, k, k, fmask, gqa=False)
    elif device.type == "cuda":
        fq, fmask = fold(q, k, mask)
        folded_backend = sdpa_backend(fq, k, k, fmask, gqa=False)
        if folded_backend != SDPBackend.MATH.name or backend == SDPBackend.MATH.name:
            name, attend, backend = "folded", folded, folded_backend
    level = logging.WARNING if backend == SDPBackend.MATH.name and device.type == "cuda" else logging.INFO
    log.log(level, "attention on %s %s: %s layout (%d query heads on %d KV heads), SDPA backend %s", device,
            str(dtype).removeprefix("torch."), name, heads, kv_heads, backend)
    return AttentionChoice(name=name, attend=attend, backend=backend)
