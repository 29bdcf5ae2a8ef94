"""The forward of one layer slice of a Qwen decoder, with the cache in plain sight (gpt-fast style).

The slice keeps Hugging Face's own modules (the family's decoder layer, its projections, norms and MLP;
shards/family.py) under the checkpoint's parameter names, so weights load by name and PEFT can wrap
`q_proj`/`v_proj`; only the glue that touches the cache is written here, because it reads and writes our
block cache instead of HF's `Cache`: attention below, Qwen3.5's linear attention in shards/deltanet.py.
Batches are right-padded: row i holds `len(token_ids[i])` real tokens at positions `start_i ...`, and a key
at position p is visible to a query at position q iff p <= q. Padded queries attend to their row's first
token (so softmax never sees an all-masked row) and are never written to the cache.

The forward returns hidden states, or on the last slice the logits of each row's last token; the runner
samples (shards/runner.py), as in gpt-fast and nano-vllm.

`decode` is the same computation for a decode step with static shapes (`DecodeInputs`, shards/step_inputs.py),
which `torch.compile(fullgraph=True)` traces whole and CUDA graphs capture; like `forward` it returns hidden
states, or logits on the last slice. It serves dense full-attention slices (Qwen2/2.5, Qwen3): Qwen3-MoE
groups tokens by expert (data-dependent shapes) and Qwen3.5's linear-attention layers update a recurrent state
through the dynamic path's metadata, so those slices keep the dynamic path for every step (`static_decode` is
False).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from .attention import Attend, additive_mask, choose_attention, expanded
from .deltanet import gated_deltanet
from .family import FULL_ATTENTION, LINEAR_ATTENTION, family_of, layer_kind
from .fused import FUSE_MIN_TOKENS, norm, rotary, silu_mul
from .kv_cache import KVCache, RecurrentShape
from .packed import GROUPS, grouped
from .paged_attention import paged_attention, paged_decode_attention
from .step_inputs import AttentionGroup, StepMetadata

STATIC_FAMILIES = ("qwen2", "qwen3")  # dense, full attention only: the families `decode` serves


def mlp(module: nn.Module, x: torch.Tensor, fuse: bool = False) -> torch.Tensor:
    """The layer's MLP; a dense one whose gate and up projections are packed as one weight in one call (and,
    `fuse`, whose SiLU gate is one fused kernel: shards/fused.py)."""
    group = grouped(module, GROUPS[1])
    if group is None:
        return module(x)
    gate, up = group(x)
    if fuse and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"):
        return module.down_proj(silu_mul(gate, up))
    return module.down_proj(module.act_fn(gate) * up)


def whole(x: torch.Tensor) -> torch.Tensor:
    """One rank holds the whole layer: its outputs need no sum, its logits no gather."""
    return x


class SliceBody(nn.Module):
    """Mirror of the family's decoder model holding only this slice's parts, so state-dict keys match the
    checkpoint (for a multimodal checkpoint, its language model's keys: shards/loader.py maps them)."""

    def __init__(self, config: PretrainedConfig, first: int, end: int, has_embed: bool, has_norm: bool) -> None:
        super().__init__()
        family = family_of(config)
        if has_embed:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Keyed by the global layer index: "model.layers.17.mlp..." loads as-is and adapters map by name.
        self.layers = nn.ModuleDict({str(i): family.decoder_layer(config, i) for i in range(first, end)})
        if has_norm:
            self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)


class ModelSlice(nn.Module):
    """Layers [first, end) of a Qwen model; embeddings if first == 0; norm and LM head if end == all."""

    def __init__(self, config: PretrainedConfig, first: int, end: int) -> None:
        super().__init__()
        self.config = config
        self.family = family_of(config)
        self.first, self.end = first, end
        self.is_first = first == 0
        self.is_last = end == config.num_hidden_layers
        self.model = SliceBody(config, first, end, self.is_first, self.is_last)
        if self.is_last:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Each layer's kind and its index among the slice's layers of that kind (its place in the cache).
        kinds = [layer_kind(config, i) for i in range(first, end)]
        self.mixers = [(kind, kinds[:n].count(kind)) for n, kind in enumerate(kinds)]
        self.num_attention_layers = kinds.count(FULL_ATTENTION)
        self.recurrent_shape = self._recurrent_shape(kinds.count(LINEAR_ATTENTION))
        self.static_decode = self.family.name in STATIC_FAMILIES and kinds.count(FULL_ATTENTION) == len(kinds)
        self.attend: Attend = expanded  # chosen for the device by `attach_device`
        self.paged = False  # one-token queries read the block cache in place (shards/paged_attention.py)
        self.fuse_prompts = False  # prompt steps' norms, activation and rotary fused (shards/fused.py)
        # A tensor-parallel rank sums the row-parallel outputs (o_proj, DeltaNet's out_proj, down_proj) of its
        # group and gathers the vocabulary shares of the logits (shards/tensor_parallel.py).
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] = whole
        self.gather_vocab: Callable[[torch.Tensor], torch.Tensor] = whole

    def _recurrent_shape(self, layers: int) -> RecurrentShape | None:
        if layers == 0:
            return None
        c = self.config
        key_dim = c.linear_key_head_dim * c.linear_num_key_heads
        return RecurrentShape(layers=layers, conv_dim=2 * key_dim + c.linear_value_head_dim * c.linear_num_value_heads,
                              conv_kernel=c.linear_conv_kernel_dim, heads=c.linear_num_value_heads,
                              key_dim=c.linear_key_head_dim, value_dim=c.linear_value_head_dim)

    def attach_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Build RoPE outside any meta-device context (its inv_freq buffer is not in the checkpoint) and pick
        the attention kernel for the device (shards/attention.py)."""
        self.rotary_emb = self.family.rotary(self.config).to(device)
        if self.num_attention_layers:
            c = self.config
            self.attend = choose_attention(device, dtype, c.num_attention_heads, c.num_key_value_heads,
                                           self.head_dim).attend
            self.paged = paged_attention(device, dtype, self.head_dim)

    def forward(self, meta: StepMetadata, hidden: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run one step through this slice: token ids (first slice) or hidden states [N, 1, H] of the step's N
        real tokens in; hidden states out, or, on the last slice, the logits [B, V] of each row's last token.

        The residual stream is packed, one real token per row ([N, 1, H]: rows in order, each row's tokens in
        order), so the projections and MLPs cost the tokens the step brings, not rows x the longest row: a
        chunk of a long prompt mixed with decodes does not make every decode row as wide as the chunk. Only
        attention (and Qwen3.5's linear attention) sees the padded [B, T] layout its masks are built for."""
        rows, cols = meta.write_rows, meta.write_cols
        fuse = self.fuse_prompts and rows.numel() >= FUSE_MIN_TOKENS
        h = self.model.embed_tokens(meta.ids[rows, cols])[:, None] if self.is_first else hidden
        cos, sin = (self.rotary_emb(h, meta.positions[rows, cols][:, None]) if self.num_attention_layers
                    else (None, None))
        lengths = meta.last + 1
        # Each attention group's mask, made additive once for every layer (shards/attention.py).
        masks = [additive_mask(group.mask, h.dtype) for group in meta.groups]
        for layer, (kind, index) in zip(self.model.layers.values(), self.mixers, strict=True):
            x = norm(layer.input_layernorm, h, fuse)
            if kind == LINEAR_ATTENTION:
                mixed = gated_deltanet(layer.linear_attn, x, rows, cols, meta.valid, lengths, meta.fresh,
                                       meta.slot_index, cache, index)
            else:
                mixed = self._attention(layer.self_attn, x, cos, sin, meta, masks, cache, index, fuse)
            h = h + self.all_reduce(mixed)
            h = h + self.all_reduce(mlp(layer.mlp, norm(layer.post_attention_layernorm, h, fuse), fuse))
        if not self.is_last:
            return h
        return self.gather_vocab(self.lm_head(self.model.norm(h[meta.last_token, 0]))).float()

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, hidden: torch.Tensor | None,
               cache: KVCache) -> torch.Tensor:
        """One decode step with static shapes (`DecodeInputs`): ids [R, 1] (first slice) or hidden [R, 1, H]
        in, positions [R, 1], block tables [R, W] (keys read: W * block_size per row). Hidden states [R, 1, H]
        out, or on the last slice the logits [R, V]. No host synchronisation from first kernel to output."""
        h = self.model.embed_tokens(ids) if self.is_first else hidden
        cos, sin = self.rotary_emb(h, positions)
        if self.paged:  # the kernel reads each row's keys up to its own position
            lengths = positions[:, 0] + 1
        else:  # gather + SDPA reads the whole bucket, masked: [R, 1, 1, W * block_size]
            keys = torch.arange(tables.shape[1] * cache.block_size, device=h.device)
            mask = additive_mask(keys[None, None, None, :] <= positions[:, None, :, None], h.dtype)
        at = positions[:, 0]
        blocks = tables.gather(1, (at // cache.block_size)[:, None])[:, 0]
        offsets = at % cache.block_size
        for layer, (_, index) in zip(self.model.layers.values(), self.mixers, strict=True):
            x = layer.input_layernorm(h)
            q, k, v, gate = self._project(layer.self_attn, x, cos, sin)
            cache.write(index, blocks, offsets, k[:, :, 0], v[:, :, 0])
            if self.paged:
                attended = paged_decode_attention(q, cache.k, cache.v, index, tables, lengths)
            else:
                attended = self.attend(q, *cache.gather(index, tables), mask)
            h = h + self.all_reduce(self._output(layer.self_attn, attended, gate))
            h = h + self.all_reduce(mlp(layer.mlp, layer.post_attention_layernorm(h)))
        if not self.is_last:
            return h
        return self.gather_vocab(self.lm_head(self.model.norm(h[:, 0]))).float()

    def _project(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 fuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries [B, H, T, D], rotated keys and values [B, Hkv, T, D], and Qwen3.5's output gate."""
        bsz, width, _ = x.shape
        heads = (bsz, width, -1, self.head_dim)
        gate = None
        group = grouped(attn, GROUPS[0])  # q, k and v packed as one weight: one call (shards/packed.py)
        q, k, v = group(x) if group is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        if self.family.gated_query:  # Qwen3.5: q_proj yields each head's query and its output gate side by side
            q, gate = torch.chunk(q.view(bsz, width, -1, 2 * self.head_dim), 2, dim=-1)
            gate = gate.reshape(bsz, width, -1)
        else:
            q = q.view(heads)
        k = k.view(heads)
        if hasattr(attn, "q_norm"):  # Qwen3 and later: an RMSNorm over each query and key head
            q, k = norm(attn.q_norm, q, fuse), norm(attn.k_norm, k, fuse)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(heads).transpose(1, 2)
        q, k = (rotary(self.family.apply_rotary) if fuse else self.family.apply_rotary)(q, k, cos, sin)
        return q, k, v, gate

    def _output(self, attn: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        bsz, _, width, _ = out.shape
        out = out.transpose(1, 2).reshape(bsz, width, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return attn.o_proj(out)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: StepMetadata, masks: list[torch.Tensor], cache: KVCache, index: int,
                   fuse: bool = False) -> torch.Tensor:
        """Packed tokens [N, 1, H] in and out; the queries meet their rows' keys group by group (the one-token
        rows in one call, each longer row in its own: `AttentionGroup`)."""
        q, k, v, gate = self._project(attn, x, cos, sin, fuse)  # q [N, heads, 1, D], k / v [N, kv_heads, 1, D]
        cache.write(index, meta.write_blocks, meta.write_offsets, k[:, :, 0], v[:, :, 0])
        if len(meta.groups) == 1:  # every row one token, or one row: the packed order is the group's
            return self._output(attn, self._attend_group(q, meta.groups[0], masks[0], cache, index), gate)
        out = q.new_empty(q.shape)
        for group, mask in zip(meta.groups, masks, strict=True):
            out[group.tokens] = self._attend_group(q[group.tokens], group, mask, cache, index)
        return self._output(attn, out, gate)

    def _attend_group(self, q: torch.Tensor, group: AttentionGroup, mask: torch.Tensor, cache: KVCache,
                      index: int) -> torch.Tensor:
        """Queries [n, heads, 1, D] of one group's tokens in, their attention outputs in the same layout out;
        `mask`: the group's, additive (unread where the paged kernel reads the cache in place)."""
        if group.width == 1 and self.paged:
            return paged_decode_attention(q, cache.k, cache.v, index, group.tables, group.lengths)
        keys, values = cache.gather(index, group.tables)
        if group.width == 1:  # one query per row
            return self.attend(q, keys, values, mask)
        queries = q[:, :, 0].transpose(0, 1)[None]  # one row: [1, heads, n, D]
        return self.attend(queries, keys, values, mask)[0].transpose(0, 1)[:, :, None]

