"""Which Qwen architecture a checkpoint is, read from config.json's `model_type`, and the Hugging Face parts
its slices are built from.

A slice reuses the family's own decoder layer, norms and rotary embedding (so parameter names match the
checkpoint and PEFT wraps the same projections as in training) and writes only the glue that touches the
slot cache (shards/model.py). What differs between families:

- qwen2: biased q/k/v projections.
- qwen3: no q/k/v bias, an RMSNorm over each query and key head, an explicit `head_dim`.
- qwen3_moe: qwen3's attention; sparse MoE blocks (shards/moe.py) where `decoder_sparse_step` and
  `mlp_only_layers` say, a dense MLP elsewhere.
- qwen3_5 (the published multimodal checkpoint) / qwen3_5_text: a hybrid. `layer_types` marks each layer
  "linear_attention" (Gated DeltaNet, shards/deltanet.py, with a recurrent state per sequence) or
  "full_attention" (a sigmoid-gated query, q/k head norms, rotary over a quarter of each head); norms are
  zero-centred (`1 + weight`). The multimodal config carries the text model's config as `text_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .moe import SparseMoe

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class Family:
    name: str
    decoder_layer: Callable[[PretrainedConfig, int], nn.Module]
    norm: type[nn.Module]  # the final norm (hidden_size, eps)
    rotary: type[nn.Module]
    apply_rotary: Callable  # (q, k, cos, sin) -> (q, k); Qwen3.5's rotates only the first part of each head
    gated_query: bool = False  # q_proj also yields a gate for the attention output (Qwen3.5)


def _moe_layer(config: PretrainedConfig, index: int) -> nn.Module:
    """HF's layer with its fused-experts MoE block swapped for one that holds each expert under its published
    name (`mlp.experts.E.gate_proj`), so a slice loads exactly its own layers' expert tensors by name."""
    layer = qwen3_moe.Qwen3MoeDecoderLayer(config, index)
    if isinstance(layer.mlp, qwen3_moe.Qwen3MoeSparseMoeBlock):
        layer.mlp = SparseMoe(config)
    return layer


FAMILIES = {
    "qwen2": Family("qwen2", qwen2.Qwen2DecoderLayer, qwen2.Qwen2RMSNorm, qwen2.Qwen2RotaryEmbedding,
                    qwen2.apply_rotary_pos_emb),
    "qwen3": Family("qwen3", qwen3.Qwen3DecoderLayer, qwen3.Qwen3RMSNorm, qwen3.Qwen3RotaryEmbedding,
                    qwen3.apply_rotary_pos_emb),
    "qwen3_moe": Family("qwen3_moe", _moe_layer, qwen3_moe.Qwen3MoeRMSNorm, qwen3_moe.Qwen3MoeRotaryEmbedding,
                        qwen3_moe.apply_rotary_pos_emb),
    "qwen3_5_text": Family("qwen3_5_text", qwen3_5.Qwen3_5DecoderLayer, qwen3_5.Qwen3_5RMSNorm,
                           qwen3_5.Qwen3_5TextRotaryEmbedding, qwen3_5.apply_rotary_pos_emb, gated_query=True),
}
MULTIMODAL = {"qwen3_5": "qwen3_5_text"}  # published config type -> the text model's
SUPPORTED = sorted([*FAMILIES, *MULTIMODAL])


class UnsupportedModel(ValueError):
    """The checkpoint's architecture is not one the relay can slice."""


def family_of(config: PretrainedConfig) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedModel(f"model_type {config.model_type!r} is not supported; the relay serves "
                               f"{', '.join(SUPPORTED)}")
    return family


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: the checkpoint's own, or the text model's of a multimodal checkpoint.

    Refuses an unsupported `model_type` at once, naming the supported ones, and sliding-window layers (the
    slot cache holds every position).
    """
    if config.model_type in MULTIMODAL:
        text = config.text_config
        text.tie_word_embeddings = config.tie_word_embeddings  # the multimodal class ties (or not) its head
    else:
        text = config
    family_of(text)
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        raise UnsupportedModel(f"{text.model_type}: sliding-window attention layers are not supported")
    text._attn_implementation = "sdpa"
    return text


def layer_kind(config: PretrainedConfig, index: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[index] if types else FULL_ATTENTION
