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

A rank's `ModelSlice` is the family's own, built from `rank_config` (its share of heads and width, the same
head size), so HF's modules, parameter names and the cache layout all stay as they are; only the LM head is
swapped for its vocabulary share. Served families: Qwen2/2.5, Qwen3 and Qwen3-MoE; Qwen3.5 is refused at
start-up (`check_shardable`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from .family import UnsupportedModel

TP_FAMILIES = ("qwen2", "qwen3", "qwen3_moe")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
ROW_PARALLEL = ("o_proj", "down_proj")  # input columns split; outputs all-reduced


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
    if config.model_type not in TP_FAMILIES:
        raise UnsupportedModel(f"--tensor-parallel serves {', '.join(TP_FAMILIES)}, not {config.model_type!r} "
                               f"(Qwen3.5's DeltaNet heads are not split yet)")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the {heads} attention heads")
    if kv % world and world % kv:
        raise ValueError(f"--tensor-parallel {world} neither divides nor is a multiple of the {kv} KV heads")
    if config.intermediate_size % world:
        raise ValueError(f"--tensor-parallel {world} does not divide the MLP width {config.intermediate_size}")
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


def shard_range(name: str, config: PretrainedConfig, shard: Shard) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the checkpoint tensor behind slice parameter `name` that this rank holds, or None
    for a tensor every rank holds whole. `config` is the whole model's."""
    parts = name.split(".")
    module, kind = parts[-2], parts[-1]
    d, r, n = head_dim(config), shard.rank, shard.world
    if name == "lm_head.weight":
        per = vocab_rows(config.vocab_size, n)
        return 0, r * per, min((r + 1) * per, config.vocab_size)
    if module in ("q_proj", "o_proj"):
        per = config.num_attention_heads // n * d
        return (0 if module == "q_proj" else 1), r * per, (r + 1) * per
    if module in ("k_proj", "v_proj"):
        heads = kv_heads(config, shard)
        return 0, heads.start * d, heads.stop * d
    if module in ("gate_proj", "up_proj", "down_proj"):
        width = config.moe_intermediate_size if ".experts." in name else config.intermediate_size
        per = width // n
        return (1 if module == "down_proj" else 0), r * per, (r + 1) * per
    if module in ("q_norm", "k_norm", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
                  "gate"):  # "gate": a MoE layer's router, replicated so every rank picks the same experts
        return None
    raise ValueError(f"no tensor-parallel split known for {name} ({kind})")


def read_shard(tensor_slice, name: str, config: PretrainedConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a checkpoint tensor from a safetensors slice (only that part is read); the LM head's
    last share padded with zero rows to the others' size."""
    where = shard_range(name, config, shard)
    if where is None:
        return tensor_slice[:]
    dim, start, stop = where
    part = tensor_slice[start:stop] if dim == 0 else tensor_slice[:, start:stop]
    if name == "lm_head.weight":
        missing = vocab_rows(config.vocab_size, shard.world) - part.shape[0]
        if missing:
            part = torch.cat([part, part.new_zeros(missing, part.shape[1])])
    return part


def shard_lora(key: str, tensor: torch.Tensor, config: PretrainedConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a PEFT LoRA tensor (`...q_proj.lora_B.weight`): B split like the output rows of a
    column-parallel weight (rank r computes x A^T B_r^T, its own output rows), A like the input columns of a
    row-parallel one (x_r A_r^T B^T is a partial sum, all-reduced with the base layer's); the other factor, and
    adapters on replicated modules, whole."""
    module, _, factor = key.partition(".lora_")
    where = shard_range(module + ".weight", config, shard)
    if where is None:
        return tensor
    if factor not in ("A.weight", "B.weight"):
        raise ValueError(f"{key}: no tensor-parallel split for this adapter tensor")
    dim, start, stop = where
    if factor == "B.weight" and dim == 0:
        part = tensor[start:stop].contiguous()
        missing = vocab_rows(config.vocab_size, shard.world) - part.shape[0] if module == "lm_head" else 0
        return torch.cat([part, part.new_zeros(missing, part.shape[1])]) if missing else part  # as read_shard pads
    if factor == "A.weight" and dim == 1:
        return tensor[:, start:stop].contiguous()
    return tensor


def split_head(part: nn.Module, config: PretrainedConfig, world: int) -> None:
    """Replace a last slice's LM head (built on the meta device) with this rank's vocabulary share."""
    part.lm_head = nn.Linear(config.hidden_size, vocab_rows(config.vocab_size, world), bias=False)


def gather_vocab(all_gather: Callable[[torch.Tensor], torch.Tensor], vocab: int) -> Callable:
    """Every rank's logits [B, V / N] side by side, the padding dropped: [B, V]."""
    def gather(logits: torch.Tensor) -> torch.Tensor:
        return all_gather(logits)[..., :vocab]
    return gather
