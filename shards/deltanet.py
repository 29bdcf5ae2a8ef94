"""Qwen3.5's linear-attention (Gated DeltaNet) layer against the slot cache.

Each sequence carries two states per linear layer instead of keys and values: the last `conv_kernel` inputs
of the short causal convolution, and the DeltaNet state [value heads, key dim, value dim]. Both live in the
slot cache beside the full-attention layers' KV (shards/kv_cache.py) and are replaced, not appended to, by
each step; a row starting at position 0 (a prefill, or a replay after a lost cache) starts from zeros, so a
replay rebuilds them exactly by re-running the sequence.

The maths is Hugging Face's own functions (`causal_conv1d_*`, `torch_*_gated_delta_rule`), which use the
fused kernels (causal-conv1d, flash-linear-attention) when those packages are installed and pure PyTorch
otherwise; like `generate()`, a step of single-token decodes takes the recurrent form, anything else the
chunked one.

Right padding must not reach a state: pad positions get beta = 0 (no write) and g = 0 (no decay), and zero
q/k/v (exactly the padding the chunked kernel adds itself), so the state after a padded row is the state after
its real tokens; each row's conv state is cut at its own last real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    causal_conv1d_fn,
    causal_conv1d_update,
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from .kv_cache import KVCache


def gated_deltanet(mod: nn.Module, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor,
                   lengths: torch.Tensor, fresh: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                   index: int) -> torch.Tensor:
    """`mod` is HF's `Qwen3_5GatedDeltaNet` (its parameters only); `index` its place among the slice's linear
    layers. `x` [N, 1, H]: the step's real tokens, packed (token i is row `rows[i]`, column `cols[i]` of the
    padded batch); `valid` [B, T] marks real tokens, `lengths` [B] counts them, `fresh` [B] marks rows from
    position 0. The projections (LoRA-wrapped ones too) run on the packed tokens, the convolution and the
    recurrence on the padded batch; the output is packed again."""
    bsz, width = valid.shape

    def padded(y: torch.Tensor) -> torch.Tensor:
        out = y.new_zeros(bsz, width, y.shape[-1])
        out[rows, cols] = y[:, 0]
        return out

    qkv = padded(mod.in_proj_qkv(x)).transpose(1, 2)  # [B, conv_dim, T]
    z = mod.in_proj_z(x).reshape(-1, mod.head_v_dim)  # packed
    b, a = padded(mod.in_proj_b(x)), padded(mod.in_proj_a(x))
    conv_state, state = cache.read_state(index, slots, fresh)
    decode = width == 1 and not bool(fresh.any())

    weight = mod.conv1d.weight.squeeze(1)
    if decode:
        qkv = causal_conv1d_update(qkv, conv_state, weight, mod.conv1d.bias, mod.activation)  # updates conv_state
    else:
        full = torch.cat([conv_state, qkv], dim=-1)  # [B, conv_dim, K + T]: the cached left context first
        kernel = conv_state.shape[-1]
        keep = lengths[:, None] + torch.arange(kernel, device=x.device)  # the K inputs ending at the last real one
        conv_state = full.gather(2, keep[:, None, :].expand(-1, full.shape[1], -1))
        qkv = causal_conv1d_fn(full, weight, mod.conv1d.bias, activation=mod.activation)[:, :, -width:]

    q, k, v = torch.split(qkv.transpose(1, 2), [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
    pad = ~valid[..., None]
    q = q.masked_fill(pad, 0).reshape(bsz, width, -1, mod.head_k_dim)
    k = k.masked_fill(pad, 0).reshape(bsz, width, -1, mod.head_k_dim)
    v = v.masked_fill(pad, 0).reshape(bsz, width, -1, mod.head_v_dim)
    beta = b.sigmoid().masked_fill(pad, 0)
    g = (-mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)).masked_fill(pad, 0)

    rule = torch_recurrent_gated_delta_rule if decode else torch_chunk_gated_delta_rule
    out, state = rule(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
    cache.write_state(index, slots, conv_state, state)

    out = mod.norm(out[rows, cols].reshape(-1, mod.head_v_dim), z)
    return mod.out_proj(out.reshape(len(rows), 1, -1))
