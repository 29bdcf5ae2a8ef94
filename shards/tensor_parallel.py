"""Tensor parallelism inside a slice (Megatron's split, as vLLM does it): what rank r of N holds, and how it
reads its share of the checkpoint.

Each rank holds 1/N of every layer's query heads and of its KV heads (column-parallel q/k/v projections,
row-parallel o_proj) and 1/N of the MLP's intermediate width (column-parallel gate/up, row-parallel down). The
row-parallel outputs are partial sums, all-reduced across the group before the residual add; norms and the
residual stream are replicated, so every rank holds the same hidden state between layers. With fewer KV heads
than ranks each KV head is replicated (rank r holds KV head r * Hkv // N, vLLM's rule), and N must divide the
KV heads or be a multiple of them.

The embedding is replicated (a lookup reads 1 row of it per token; splitting it would add an all-reduce per
step). The LM head, read whole for every token (136M of Qwen2.5-0.5B's 494M parameters), is split by
vocabulary: each rank computes ceil(V / N) logits (the last rank's padded with zero rows) and an all-gather
puts them side by side, so every rank holds every logit and samples the same token (docs/benchmarks.md).

Qwen3-MoE splits every expert's width the same way (each rank holds 1/N of every expert, not 1/N of the
experts: no token's expert is ever on another rank, and the router, replicated, picks the same experts on
every rank); its MoE output is a partial sum, all-reduced like a dense MLP's.

Qwen3.5's Gated DeltaNet layers split by heads: each rank holds 1/N of the key heads and of the value heads
they serve (value head j reads key head j // (Hv / Hk), so contiguous shares line up): its rows of the fused
[q | k | v] projection and of the short convolution's channels, of z, a, b, dt_bias and A_log, and its
columns of out_proj, whose output is all-reduced; its recurrent state holds its heads only. Its full-attention
layers' q_proj yields each head's query and gate side by side, so a head there is 2 x head_dim rows.

A rank's `ModelSlice` is the family's own, built from `rank_config` (its share of heads and width, the same
head size), so HF's modules, parameter names and the cache layout all stay as they are; only the LM head is
swapped for its vocabulary share. Every family the relay serves splits; `check_shardable` refuses, at
start-up, a group size that does not divide what it must.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of a tensor-parallel group of `world` ranks."""

    rank: int
    world: int


WHOLE = Shard(0, 1)  # no tensor parallelism: one rank holds every layer whole

def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_shardable(config: PretrainedConfig, world: int) -> None:
    """Refuse, before anything loads, a model this group size cannot split."""
    if world == 1:
        return
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the {heads} attention heads")
    if kv % world and world % kv:
        raise ValueError(f"--tensor-parallel {world} neither divides nor is a multiple of the {kv} KV heads")
    if config.intermediate_size % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the MLP width {config.intermediate_size}")
    if getattr(config, "linear_num_key_heads", 0) % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the {config.linear_num_key_heads} DeltaNet key "
                         f"heads")
    if getattr(config, "moe_intermediate_size", 0) % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the experts' width "
                         f"{config.moe_intermediate_size}")


def rank_config(config: PretrainedConfig, world: int) -> PretrainedConfig:
    """The config one rank's layers are built from: its share of heads and MLP width, the same head size."""
    rank = copy.deepcopy(config)
    rank.head_dim = head_dim(config)
    rank.num_attention_heads = config.num_attention_heads // world
    rank.num_key_value_heads = max(config.num_key_value_heads // world, 1)
    rank.intermediate_size = config.intermediate_size // world
    if hasattr(config, "moe_intermediate_size"):
        rank.moe_intermediate_size = config.moe_intermediate_size // world
    if hasattr(config, "linear_num_key_heads"):  # Qwen3.5's DeltaNet: key heads, and the value heads they serve
        rank.linear_num_key_heads = config.linear_num_key_heads // world
        rank.linear_num_value_heads = config.linear_num_value_heads // world
    return rank


def vocab_rows(vocab: int, world: int) -> int:
    """LM-head rows per rank (the last rank's padded)."""
    return -(-vocab // world)


def kv_heads(config: PretrainedConfig, shard: Shard) -> range:
    """The KV heads rank `shard.rank` holds: its 1/N of them, or the one it shares with other ranks."""
    kv = config.num_key_value_heads
    if kv >= shard.world:
        per = kv // shard.world
        return range(shard.rank * per, (shard.rank + 1) * per)
    first = shard.rank * kv // shard.world
    return range(first, first + 1)


Split = tuple[int, list[tuple[int, int]]]  # (dim, [(start, stop), ...]): the pieces a rank holds, in order


def shard_range(name: str, config: PretrainedConfig, shard: Shard) -> Split | None:
    """The dim and the ranges along it of the checkpoint tensor behind slice parameter `name` that this rank
    holds (several for Qwen3.5's fused q/k/v projection), or None for a tensor every rank holds whole. `config`
    is the whole model's."""
    parts = name.split(".")
    module, kind = parts[-2], parts[-1]
    d, r, n = head_dim(config), shard.rank, shard.world

    def share(width: int, dim: int = 0, offset: int = 0) -> Split:
        return dim, [(offset + r * width // n, offset + (r + 1) * width // n)]

    if name == "lm_head.weight":
        per = vocab_rows(config.vocab_size, n)
        return 0, [(r * per, min((r + 1) * per, config.vocab_size))]
    if module == "q_proj":  # Qwen3.5's yields each head's query and output gate side by side: 2 x head_dim rows
        return share(config.num_attention_heads * d * (2 if config.model_type == "qwen3_5_text" else 1))
    if module == "o_proj":
        return share(config.num_attention_heads * d, dim=1)
    if module in ("k_proj", "v_proj"):
        heads = kv_heads(config, shard)
        return 0, [(heads.start * d, heads.stop * d)]
    if module in ("gate_proj", "up_proj", "down_proj"):
        width = config.moe_intermediate_size if ".experts." in name else config.intermediate_size
        return share(width, dim=1 if module == "down_proj" else 0)
    if module == "linear_attn" or parts[-3] == "linear_attn":  # Qwen3.5's Gated DeltaNet: split by heads
        keys = config.linear_num_key_heads * config.linear_key_head_dim
        values = config.linear_num_value_heads * config.linear_value_head_dim
        if module in ("in_proj_qkv", "conv1d"):  # [q | k | v] channels: this rank's heads of each
            return 0, [share(keys)[1][0], share(keys, offset=keys)[1][0], share(values, offset=2 * keys)[1][0]]
        if module == "in_proj_z":
            return share(values)
        if module in ("in_proj_a", "in_proj_b") or kind in ("dt_bias", "A_log"):
            return share(config.linear_num_value_heads)
        if module == "out_proj":
            return share(values, dim=1)
        if module == "norm":  # per value head, over its head_dim: the same on every rank
            return None
    if module in ("q_norm", "k_norm", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
                  "gate"):  # "gate": a MoE layer's router, replicated so every rank picks the same experts
        return None
    raise ValueError(f"no tensor-parallel split known for {name} ({kind})")


def _take(tensor, split: Split) -> torch.Tensor:
    """The pieces `split` names of a tensor or safetensors slice (only those are read), concatenated."""
    dim, ranges = split
    pieces = [tensor[a:b] if dim == 0 else tensor[:, a:b] for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _pad_head(part: torch.Tensor, config: PretrainedConfig, world: int) -> torch.Tensor:
    """The LM head's last vocabulary share padded with zero rows to the others' size."""
    missing = vocab_rows(config.vocab_size, world) - part.shape[0]
    return torch.cat([part, part.new_zeros(missing, part.shape[1])]) if missing else part


def read_shard(tensor_slice, name: str, config: PretrainedConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a checkpoint tensor from a safetensors slice (only that part is read)."""
    split = shard_range(name, config, shard)
    if split is None:
        return tensor_slice[:]
    part = _take(tensor_slice, split)
    return _pad_head(part, config, shard.world) if name == "lm_head.weight" else part


def shard_lora(key: str, tensor: torch.Tensor, config: PretrainedConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a PEFT LoRA tensor (`...q_proj.lora_B.weight`): B split like the output rows of a
    column-parallel weight (rank r computes x A^T B_r^T, its own output rows), A like the input columns of a
    row-parallel one (x_r A_r^T B^T is a partial sum, all-reduced with the base layer's); the other factor, and
    adapters on replicated modules, whole."""
    module, _, factor = key.partition(".lora_")
    split = shard_range(module + ".weight", config, shard)
    if split is None:
        return tensor
    if factor not in ("A.weight", "B.weight"):
        raise ValueError(f"{key}: no tensor-parallel split for this adapter tensor")
    dim = split[0]
    if factor == "B.weight" and dim == 0:
        part = _take(tensor, split).contiguous()
        return _pad_head(part, config, shard.world) if module == "lm_head" else part
    if factor == "A.weight" and dim == 1:
        return _take(tensor, split).contiguous()
    return tensor


def split_head(part: nn.Module, config: PretrainedConfig, world: int) -> None:
    """Replace a last slice's LM head (built on the meta device) with this rank's vocabulary share."""
    part.lm_head = nn.Linear(config.hidden_size, vocab_rows(config.vocab_size, world), bias=False)


def gather_vocab(all_gather: Callable[[torch.Tensor], torch.Tensor], vocab: int) -> Callable:
    """Every rank's logits [B, V / N] side by side, the padding dropped: [B, V]."""
    def gather(logits: torch.Tensor) -> torch.Tensor:
        return all_gather(logits)[..., :vocab]
    return gather
