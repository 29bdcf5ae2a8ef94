"""How many KV blocks every slice holds: sized once at start-up, the same number on every slice.

The gateway owns the block tables (server/block_manager.py), so the pool is one number for the whole
pipeline: the tokens asked for (`--kv-cache-tokens`), or as many as the largest slice's KV fits in
`--kv-cache-memory` bytes. Memory is no longer reserved per sequence for the longest context: a sequence holds
the blocks its tokens fill, and `--max-context` is a per-request limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from qwen_relay.shards.family import FULL_ATTENTION, layer_kind
from qwen_relay.shards.kv_cache import kv_bytes_per_token

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 16 * 2048  # what the slot cache reserved by default (16 sequences of 2,048 tokens)


@dataclass(frozen=True)
class KvCapacity:
    num_blocks: int
    block_size: int
    bytes_per_block: int  # of the slice whose layers hold the most KV (of each of its ranks)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return (f"{self.num_blocks} blocks of {self.block_size} tokens = {self.tokens} tokens "
                f"({self.num_blocks * self.bytes_per_block / 2**20:.0f} MiB on the largest slice or rank)")


def attention_heads(config: PretrainedConfig) -> tuple[int, int]:
    """KV heads and head size of the full-attention layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def has_recurrent_layers(config: PretrainedConfig) -> bool:
    """Linear-attention layers (Qwen3.5) carry a recurrent state that a cached prefix's blocks do not hold."""
    return any(layer_kind(config, i) != FULL_ATTENTION for i in range(config.num_hidden_layers))


def kv_capacity(config: PretrainedConfig, ranges: list[tuple[int, int]], dtype: torch.dtype, block_size: int,
                tokens: int | None, memory: int | None, tensor_parallel: int = 1) -> KvCapacity:
    """Blocks for `tokens` (default `DEFAULT_TOKENS`), or for `memory` bytes per slice when given; with tensor
    parallelism, per rank, whose blocks hold only its share of the KV heads (shards/tensor_parallel.py)."""
    kv_heads, head_dim = attention_heads(config)
    kv_heads = max(kv_heads // tensor_parallel, 1)
    layers = max(sum(layer_kind(config, i) == FULL_ATTENTION for i in range(a, b)) for a, b in ranges)
    per_block = max(kv_bytes_per_token(layers, kv_heads, head_dim, dtype) * block_size, 1)
    if memory is not None:
        num_blocks = memory // per_block
    else:
        num_blocks = -(-(tokens or DEFAULT_TOKENS) // block_size)
    if num_blocks < 1:
        raise ValueError(f"the KV cache memory holds no block of {block_size} tokens ({per_block} bytes)")
    return KvCapacity(num_blocks, block_size, per_block)
