"""The forward of one layer slice of a Qwen2 decoder, with the KV cache in plain sight (gpt-fast style).

The slice keeps Hugging Face's own modules (`Qwen2DecoderLayer`, its projections, norms and MLP) under the
checkpoint's parameter names, so weights load by name and PEFT can wrap `q_proj`/`v_proj`; only the
attention glue is written here, because it reads and writes our slot-indexed cache instead of HF's `Cache`.
Batches are right-padded: row i holds `len(token_ids[i])` real tokens at positions `start_i ...`, and a key
at position p is visible to a query at position q iff p <= q. Padded queries attend to their row's first
token (so softmax never sees an all-masked row) and are never written to the cache.
"""

from __future__ import annotations

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
from .sampler import sample


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

    def forward(self, batch: StepBatch, hidden: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run the batch through this slice: token ids in (first slice) or hidden states [B, T, H] in;
        hidden states out, or, on the last slice, the chosen token ids [B]."""
        device = next(self.parameters()).device
        ids, positions, valid = batch.padded(device)
        h = self.model.embed_tokens(ids) if self.is_first else hidden
        cos, sin = self.rotary_emb(h, positions)

        ends = batch.ends()
        length = max(ends)
        key_pos = torch.arange(length, device=device)
        query_pos = torch.where(valid, positions, 0)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # [B, 1, T, L]

        rows, cols = valid.nonzero(as_tuple=True)
        slots = torch.tensor(batch.slots, device=device)
        write_slots, write_pos = slots[rows], positions[rows, cols]

        for local, layer in enumerate(self.model.layers.values()):
            residual = h
            x = layer.input_layernorm(h)
            x = self._attention(layer.self_attn, x, cos, sin, mask, cache, local, batch.slots, length,
                                (rows, cols, write_slots, write_pos))
            h = residual + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))

        if not self.is_last:
            return h
        last = torch.tensor([len(t) - 1 for t in batch.token_ids], device=device)
        h_last = self.model.norm(h[torch.arange(len(batch), device=device), last])
        logits = self.lm_head(h_last).float()
        return sample(logits, batch.sampling, ends)

    def _attention(
        self,
        attn: nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        local: int,
        slots: list[int],
        length: int,
        writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        bsz, width, _ = x.shape
        q = attn.q_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, width, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        rows, cols, write_slots, write_pos = writes
        cache.write(local, write_slots, write_pos, k[rows, :, cols], v[rows, :, cols])
        keys, values = cache.read(local, slots, length)

        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(bsz, width, -1))
