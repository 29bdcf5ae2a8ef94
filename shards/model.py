"""The forward of one layer slice of a Qwen2 decoder, with the KV cache in plain sight (gpt-fast style).

The slice keeps Hugging Face's own modules (`Qwen2DecoderLayer`, its projections, norms and MLP) under the
checkpoint's parameter names, so weights load by name and PEFT can wrap `q_proj`/`v_proj`; only the
attention glue is written here, because it reads and writes our slot-indexed cache instead of HF's `Cache`.
Batches are right-padded: row i holds `len(token_ids[i])` real tokens at positions `start_i ...`, and a key
at position p is visible to a query at position q iff p <= q. Padded queries attend to their row's first
token (so softmax never sees an all-masked row) and are never written to the cache.

The forward returns hidden states, or on the last slice the logits of each row's last token; the runner
samples (shards/runner.py), as in gpt-fast and nano-vllm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from .batch import StepBatch
from .kv_cache import KVCache


@dataclass(frozen=True)
class StepMetadata:
    """What every layer of a slice needs to know about one step's batch, built once per step."""

    ids: torch.Tensor  # [B, T] right-padded token ids (read by the first slice only)
    positions: torch.Tensor  # [B, T] absolute positions; pads continue past the row's end
    valid: torch.Tensor  # [B, T] True for real tokens
    mask: torch.Tensor  # [B, 1, T, L] key p visible to query q iff p <= q (pads see their row's first key)
    slots: list[int]  # cache slot of each row
    length: int  # L: keys read per row (the longest row's cache length after the step)
    write_rows: torch.Tensor  # [N] row of each real token, to write its key/value
    write_cols: torch.Tensor  # [N] its column in the padded batch
    write_slots: torch.Tensor  # [N] its cache slot
    write_pos: torch.Tensor  # [N] its position in that slot
    last: torch.Tensor  # [B] column of each row's last real token

    @classmethod
    def build(cls, batch: StepBatch, device: torch.device) -> StepMetadata:
        ids, positions, valid = batch.padded(device)
        length = max(batch.ends())
        key_pos = torch.arange(length, device=device)
        query_pos = torch.where(valid, positions, 0)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
        rows, cols = valid.nonzero(as_tuple=True)
        slots = torch.tensor(batch.slots, device=device)
        last = torch.tensor([len(t) - 1 for t in batch.token_ids], device=device)
        return cls(ids=ids, positions=positions, valid=valid, mask=mask, slots=list(batch.slots), length=length,
                   write_rows=rows, write_cols=cols, write_slots=slots[rows], write_pos=positions[rows, cols],
                   last=last)


class SliceBody(nn.Module):
    """Mirror of `Qwen2Model` holding only this slice's parts, so state-dict keys match the checkpoint."""

    def __init__(self, config: Qwen2Config, first: int, end: int, has_embed: bool, has_norm: bool) -> None:
        super().__init__()
        if has_embed:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Keyed by the global layer index: "model.layers.17.mlp..." loads as-is and adapters map by name.
        self.layers = nn.ModuleDict({str(i): Qwen2DecoderLayer(config, i) for i in range(first, end)})
        if has_norm:
            self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class ModelSlice(nn.Module):
    """Layers [first, end) of a Qwen2 model; embeddings if first == 0; norm and LM head if end == all."""

    def __init__(self, config: Qwen2Config, first: int, end: int) -> None:
        super().__init__()
        self.config = config
        self.first, self.end = first, end
        self.is_first = first == 0
        self.is_last = end == config.num_hidden_layers
        self.model = SliceBody(config, first, end, self.is_first, self.is_last)
        if self.is_last:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def attach_rotary(self, device: torch.device) -> None:
        """Build RoPE outside any meta-device context: its inv_freq buffer is not in the checkpoint."""
        self.rotary_emb = Qwen2RotaryEmbedding(self.config).to(device)

    def forward(self, meta: StepMetadata, hidden: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run one step through this slice: token ids (first slice) or hidden states [B, T, H] in; hidden
        states out, or, on the last slice, the logits [B, V] of each row's last token."""
        h = self.model.embed_tokens(meta.ids) if self.is_first else hidden
        cos, sin = self.rotary_emb(h, meta.positions)
        for local, layer in enumerate(self.model.layers.values()):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, meta, cache, local)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not self.is_last:
            return h
        h_last = self.model.norm(h[torch.arange(h.shape[0], device=h.device), meta.last])
        return self.lm_head(h_last).float()

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: StepMetadata, cache: KVCache, local: int) -> torch.Tensor:
        bsz, width, _ = x.shape
        q = attn.q_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        rows, cols = meta.write_rows, meta.write_cols
        cache.write(local, meta.write_slots, meta.write_pos, k[rows, :, cols], v[rows, :, cols])
        keys, values = cache.read(local, meta.slots, meta.length)

        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.mask, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(bsz, width, -1))
