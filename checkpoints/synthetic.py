"""Random-weight Qwen checkpoints that load like real ones, for tests, the demo and benchmarks.

No model hub is reachable where this project is built and tested, yet every part of it (slice loading,
the KV cache, streaming detokenisation, LoRA training) has to run against a real Hugging Face Qwen
checkpoint directory, of each family the relay serves: Qwen2, Qwen3, Qwen3-MoE and Qwen3.5.
This module writes one: ``config.json``, ``generation_config.json``, safetensors
weights (sharded with ``model.safetensors.index.json`` when asked) and a small byte-level BPE tokenizer
with Qwen's special tokens and its family's chat template (Qwen3's for Qwen3 and Qwen3-MoE, ChatML otherwise).
``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)`` load the result offline.

The weights are written tensor by tensor, in chunks, straight into the safetensors files (the model is
only ever built on the ``meta`` device, to learn the key names and shapes), so memory stays at a few
hundred MB even for the 7B shape, and no time is spent on default initialisation. The tensors are named
and laid out as the published checkpoints are (what ``save_pretrained`` writes): Qwen3-MoE experts one by
one (``mlp.experts.E.gate_proj.weight``), not fused as the model holds them; a Qwen3.5 checkpoint optionally
as Qwen publishes it, the multimodal ``Qwen3_5ForConditionalGeneration`` with the text model under
``model.language_model.``, a (tiny) vision tower and multi-token-prediction weights (``mtp.*``) beside it.
Each tensor is drawn from its own generator seeded from ``(seed, key name)``: the values do not depend
on how the checkpoint is sharded, and a bf16 build is exactly the fp32 build cast to bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from qwen_relay.shards.dtypes import DTYPES

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN3_CHAT_TEMPLATE",
    "SHAPES",
    "Shape",
    "add_parser",
    "build_checkpoint",
    "build_tokenizer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of a Qwen model (the parts of its config that set its size)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int | None  # None: the tokenizer's size rounded up to a multiple of 64
    tie_word_embeddings: bool
    max_position_embeddings: int
    family: str = "qwen2"  # qwen2, qwen3, qwen3_moe or qwen3_5
    config: dict[str, Any] = field(default_factory=dict)  # the family's own fields (head_dim, experts, ...)


# The newer families' test shapes: a few seconds to build and run, each family's features present, untied (a tied
# random model this small mostly repeats its input token, which would make parity tests vacuous).
_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=None,
             max_position_embeddings=1024)


SHAPES: dict[str, Shape] = {
    # Small enough for unit tests (~0.1M parameters), but with GQA (2 query heads per KV head) like Qwen.
    "tiny": Shape(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=None,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    ),
    # Same tensor shapes as Qwen/Qwen2.5-0.5B(-Instruct): 494M parameters, 136M of them the tied embedding.
    "qwen2.5-0.5b": Shape(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    # Same tensor shapes as Qwen/Qwen2.5-1.5B(-Instruct): 1.54B parameters, 233M of them the tied embedding.
    # bench/gpu.sh's default: a first GPU run that builds, loads three times and runs in minutes.
    "qwen2.5-1.5b": Shape(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    # Same tensor shapes as Qwen/Qwen2.5-7B(-Instruct): 7.6B parameters, untied embedding and lm_head.
    "qwen2.5-7b": Shape(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    # Qwen3: an explicit head_dim with heads x head_dim (128) != hidden (64), as in Qwen3-0.6B (16 x 128, 1024).
    "tiny-qwen3": Shape(**_TINY, num_hidden_layers=4, tie_word_embeddings=False, family="qwen3",
                        config=dict(head_dim=32)),
    # Qwen3-MoE: 8 experts, top-2, normalised; layer 1 dense through mlp_only_layers.
    "tiny-qwen3-moe": Shape(**_TINY, num_hidden_layers=4, tie_word_embeddings=False, family="qwen3_moe",
                            config=dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    # Qwen3.5: 3 linear-attention layers then one full-attention layer, twice (layer_types is the default).
    "tiny-qwen3.5": Shape(**_TINY, num_hidden_layers=8, tie_word_embeddings=False, family="qwen3_5",
                          config=dict(head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                      linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    # Same tensor shapes as Qwen/Qwen3-0.6B: 596M parameters, tied, 28 layers, GQA 16/8, head_dim 128 (x 16 =
    # 2048, twice the hidden size): the Qwen3 that a CPU serves at a usable speed.
    "qwen3-0.6b": Shape(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                        max_position_embeddings=40960, family="qwen3", config=dict(head_dim=128)),
    # Same tensor shapes as Qwen/Qwen3-8B: 8.2B parameters, untied, 36 layers, GQA 32/8, head_dim 128.
    "qwen3-8b": Shape(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
                      max_position_embeddings=40960, family="qwen3", config=dict(head_dim=128)),
    # Qwen3-30B-A3B's layout: 128 experts, 8 per token, 48 layers (30.5B parameters, 3.3B active).
    "qwen3-30b-a3b": Shape(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False,
                           max_position_embeddings=40960, family="qwen3_moe",
                           config=dict(head_dim=128, num_experts=128, num_experts_per_tok=8,
                                       moe_intermediate_size=768, norm_topk_prob=True)),
    # Qwen3.5-9B-like (transformers' Qwen3_5TextConfig defaults): 32 layers, 3 of every 4 Gated DeltaNet.
    "qwen3.5-9b": Shape(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                        intermediate_size=12288, vocab_size=248320, tie_word_embeddings=False,
                        max_position_embeddings=32768, family="qwen3_5",
                        config=dict(head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                                    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)),
}

# Each family's config and model classes: (config, causal LM, published multimodal class or None).
_CLASSES: dict[str, tuple[type, type, type | None]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, None),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, None),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, None),
    "qwen3_5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration),
}
# A vision tower just big enough to be there: slices must never read it.
_TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                    spatial_merge_size=2, num_position_embeddings=16)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's ChatML template, without its tool-calling branches: a default system turn when the
# conversation has none, one "<|im_start|>role\ncontent<|im_end|>\n" block per message, and
# "<|im_start|>assistant\n" when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen3's template (Qwen3 and Qwen3-MoE checkpoints), without its tool-calling branches: no default system turn;
# an assistant turn after the last user turn gets a think block when it is the last message or has reasoning
# (from `reasoning_content`, or split off a `<think>...</think>` in its content), so the latest reply is rendered
# `<think>\n\n</think>\n\n` + reply when it has none; earlier replies lose their reasoning; `enable_thinking=False`
# puts the empty block into the generation prompt. A conversation's render is therefore not its prefixes' renders
# extended, which is what training has to cope with (train/data.py).
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not"
    " (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
# Each family's template as its published checkpoints carry it; ChatML for the others.
_CHAT_TEMPLATES = {"qwen3": QWEN3_CHAT_TEMPLATE, "qwen3_moe": QWEN3_CHAT_TEMPLATE}

# Qwen2's pre-tokenizer split pattern (the same regex as in Qwen's tokenizer.json).
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Target size of the trained tokenizer, special tokens included (the corpus is big enough to reach it).
_TOKENIZER_VOCAB = 1024
# A pair must occur twice in the corpus to be merged, so characters seen once (such as the 'İ' of
# "İstanbul") stay split into their UTF-8 bytes: streaming detokenisation must cope with that.
_MIN_PAIR_FREQUENCY = 2

_CORPUS_EN = [
    "Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Please write a short poem about the sea and the wind.",
    "What is the capital of France? The capital of France is Paris.",
    "I would like to book a table for two people at eight o'clock.",
    "Machine learning models are trained on large amounts of text.",
    "The weather is nice today, so we are going for a walk in the park.",
    "Can you explain how a transformer model generates text one token at a time?",
    "Each layer of the network reads the hidden state and writes a new one.",
    "She said that she'd be late, but she wasn't; we're all surprised.",
    "They've finished the report and I'll send it to you tomorrow morning.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The meeting starts at 10:30 and ends at 12:15.",
    "Thank you very much for your help, have a great day!",
    "Once upon a time there was a small village near a big forest.",
    "The server streams tokens back to the client as soon as they are ready.",
    "Summarize the following text in three sentences.",
    "Translate this sentence into Turkish, please.",
]

_CORPUS_TR = [
    "Merhaba! Nasıl yardımcı olabilirim?",
    "Merhaba, bugün size nasıl yardımcı olabilirim?",
    "İstanbul, Türkiye'nin en kalabalık şehridir.",
    "Bugün hava çok güzel, parkta yürüyüşe çıkalım mı?",
    "Çay mı istersiniz, yoksa kahve mi?",
    "Öğretmen öğrencilere yeni bir ödev verdi.",
    "Şu an çok meşgulüm, daha sonra konuşabilir miyiz?",
    "Ağaçların yaprakları sonbaharda sarıya döner.",
    "Güneş doğudan doğar ve batıdan batar.",
    "Kitabı okudum ama sonunu hiç beğenmedim.",
    "Yarın sabah erkenden yola çıkacağız.",
    "Türkçe öğrenmek zor değil, sadece pratik gerekiyor.",
    "Lütfen bu metni üç cümleyle özetleyin.",
    "Küçük kız, büyük köpeği görünce çok korktu.",
    "Ankara, Türkiye'nin başkentidir; İzmir ise güzel bir sahil şehridir.",
    "Bu akşam yemekte balık ve pilav var.",
    "Çocuklar bahçede top oynuyorlar.",
    "Teşekkür ederim, iyi günler dilerim!",
    "Doğru cevabı bulmak için soruyu dikkatlice okuyun.",
    "Müzik dinlemeyi ve kitap okumayı çok seviyorum.",
    "Şehrin ışıkları gece uzaktan görünüyordu.",
    "Göl kenarında küçük bir ev aldılar.",
]

_CORPUS_CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import torch\nx = torch.zeros(2, 3)\nprint(x.shape)\n",
    'if __name__ == "__main__":\n    main()\n',
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "SELECT name, age FROM users WHERE age > 18 ORDER BY name;",
    '{"id": 42, "name": "relay", "tags": ["qwen", "ray", "grpc"]}',
    "const sum = (xs) => xs.reduce((a, b) => a + b, 0);",
    "3.14159 2.71828 1.41421 42 1024 65536 2026-11-05 +90 555 123 45 67",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 4 = 2.5, 7 - 9 = -2",
]


def _corpus() -> list[str]:
    """The tokenizer's training text: fixed sentences plus generated lines, so the result is stable."""
    lines = _CORPUS_EN + _CORPUS_TR + _CORPUS_CODE
    # Numbers and short arithmetic, so digit tokens and punctuation runs get merged too.
    lines += [f"{i} + {i * 7 % 13} = {i + i * 7 % 13}; x[{i}] = {i * i}" for i in range(40)]
    # Repeat the prose a few times so frequent pairs clearly beat rare ones.
    return lines + _CORPUS_EN + _CORPUS_TR


def _train_tokenizer() -> Tokenizer:
    """Train a Qwen-style byte-level BPE (same normaliser, split regex and decoder) on the corpus."""
    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [ENDOFTEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB - len(specials),
        min_frequency=_MIN_PAIR_FREQUENCY,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Added after training so they take the last ids, as in Qwen (151643, 151644, 151645).
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def build_tokenizer(out_dir: str | Path | None = None, chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train the synthetic tokenizer and, when ``out_dir`` is given, save it there.

    Qwen's own tokenizer cannot be downloaded here; this one has the same kind of model (byte-level BPE,
    so multi-byte UTF-8 characters can be split across tokens), the same special tokens and the same
    chat template (``chat_template``: ChatML by default), which is what the serving code depends on.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        chat_template=chat_template,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _resolve_shape(shape: Shape | str) -> Shape:
    if isinstance(shape, Shape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}") from None


def _make_config(shape: Shape, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype, extra: dict[str, Any],
                 multimodal: bool = False) -> PretrainedConfig:
    vocab_size = shape.vocab_size
    if vocab_size is None:
        vocab_size = 64 * math.ceil(len(tokenizer) / 64)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    kwargs: dict[str, Any] = dict(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=shape.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
    )
    if shape.family == "qwen3_5":
        # A quarter of each head rotated; the multimodal rotary's sections cover those frequencies.
        half = int(shape.config.get("head_dim", 256) * 0.25) // 2
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    else:
        kwargs.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.num_hidden_layers)
    kwargs.update(shape.config)
    kwargs.update(extra)
    config_class, model_class, multimodal_class = _CLASSES[shape.family]
    config = config_class(**kwargs)
    config.architectures = [model_class.__name__]
    if multimodal:
        if multimodal_class is None:
            raise ValueError(f"the {shape.family} family has no multimodal published layout")
        config = Qwen3_5Config(text_config=config.to_dict(), vision_config={**_TINY_VISION,
                               "out_hidden_size": shape.hidden_size}, tie_word_embeddings=shape.tie_word_embeddings,
                               bos_token_id=endoftext, eos_token_id=im_end)
        config.architectures = [multimodal_class.__name__]
    config.dtype = dtype
    return config


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _published(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """A parameter as the published checkpoint stores it: fused MoE experts become one tensor per expert and
    projection (``experts.E.gate_proj.weight`` [I, H], ``up_proj``, ``down_proj`` [H, I]), as
    ``save_pretrained`` writes them."""
    m = _FUSED_EXPERTS.match(name)
    if not m:
        return [(name, shape)]
    prefix, fused = m.groups()
    experts, rows, cols = shape
    if fused == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", (rows, cols)) for e in range(experts)]
    return [(f"{prefix}.{e}.{proj}.weight", (rows // 2, cols)) for e in range(experts)
            for proj in ("gate_proj", "up_proj")]


def _mtp_tensors(config: PretrainedConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Multi-token-prediction weights as a published Qwen3.5 checkpoint has them beside the model (transformers
    skips them when loading; the relay must never read them): a fusion projection, its norms, one layer."""
    hidden = config.text_config.hidden_size
    inter = config.text_config.intermediate_size
    return [("mtp.fc.weight", (hidden, 2 * hidden)), ("mtp.pre_fc_norm_embedding.weight", (hidden,)),
            ("mtp.pre_fc_norm_hidden.weight", (hidden,)), ("mtp.layers.0.mlp.up_proj.weight", (inter, hidden)),
            ("mtp.norm.weight", (hidden,))]


def _checkpoint_tensors(config: PretrainedConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Key names and shapes exactly as ``save_pretrained`` would write them (tied lm_head left out).

    The model is built on the ``meta`` device, so this costs no memory and no initialisation time.
    ``named_parameters`` drops duplicates, so a tied ``lm_head.weight`` is not listed.
    """
    multimodal = isinstance(config, Qwen3_5Config)
    model_class = Qwen3_5ForConditionalGeneration if multimodal else _CLASSES[_family(config)][1]
    with torch.device("meta"):
        model = model_class(config)
    persistent_buffers = [k for k, _ in model.named_buffers() if k in model.state_dict()]
    if persistent_buffers:
        raise RuntimeError(f"unexpected persistent buffers, no init rule for them: {persistent_buffers}")
    tensors = [t for name, p in model.named_parameters() for t in _published(name, tuple(p.shape))]
    return tensors + (_mtp_tensors(config) if multimodal else [])


def _family(config: PretrainedConfig) -> str:
    return "qwen3_5" if config.model_type in ("qwen3_5", "qwen3_5_text") else config.model_type


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Random numbers are drawn and written in chunks of about this many elements (64 MB in fp32).
_CHUNK_ELEMENTS = 1 << 24
_WEIGHT_STD = 0.02
_BIAS_STD = 0.02


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _tensor_chunks(
    seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero_centred_norms: bool = False
) -> Iterator[torch.Tensor]:
    """The values of one tensor, as contiguous chunks of whole rows in row-major order.

    Norm weights are ones (as Qwen2RMSNorm initialises them), or zeros for Qwen3.5's zero-centred norms
    (``1 + weight``; its gated DeltaNet norm is a plain one); a DeltaNet's ``dt_bias`` is ones and ``A_log`` the
    log of a uniform draw in [1, 16], as the model initialises them; everything else is normal(0, 0.02), drawn
    in fp32 and then cast, so builds in different dtypes hold the same numbers up to rounding.
    """
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows = shape[0] if shape else 1
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    if name.endswith("norm.weight") or name.endswith(".dt_bias"):
        zero = zero_centred_norms and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")
        yield (torch.zeros if zero else torch.ones)(numel, dtype=dtype)
        return
    if name.endswith(".A_log"):
        yield torch.empty(numel).uniform_(1.0, 16.0, generator=generator).log_().to(dtype)
        return
    std = _BIAS_STD if name.endswith(".bias") else _WEIGHT_STD
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row)
    for start in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - start) * row
        yield torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)


def _parse_size(size: int | str) -> int:
    """'2GB' -> 2e9, '500KiB' -> 512000: the units ``save_pretrained``'s ``max_shard_size`` accepts."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}: use e.g. '2GB', '500MB' or '64KiB'")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * factor)


def _plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in key order, like huggingface_hub's; a tensor over the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    current: list[tuple[str, tuple[int, ...]]] = []
    current_bytes = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if nbytes > max_bytes:
            shards.append([(name, shape)])
            continue
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def _write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int,
    zero_centred_norms: bool = False,
) -> None:
    """Write one safetensors file, header first, then each tensor's bytes as they are generated.

    Doing the format by hand (8-byte little-endian header length, JSON header padded with spaces to a
    multiple of 8, raw little-endian data) means no tensor, let alone a whole shard, is ever held in full.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, shape in tensors:
            for chunk in _tensor_chunks(seed, name, shape, dtype, zero_centred_norms):
                f.write(chunk.view(torch.uint8).numpy().data)
        if f.tell() != 8 + len(header_bytes) + offset:
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(header_bytes) + offset}")


def _remove_old_weights(out_dir: Path) -> None:
    """Drop weight files of an earlier build, so a re-build with other sharding is not mixed with it."""
    for old in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        old.unlink()


def build_checkpoint(
    out_dir: str | Path,
    shape: Shape | str = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    multimodal: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight Qwen checkpoint (config, generation config, weights, tokenizer) to ``out_dir``.

    ``overrides`` change the shape's fields (``num_hidden_layers=3``, ``tie_word_embeddings=False``, ...)
    or set any other field of the family's config. ``multimodal`` (Qwen3.5 only) writes the published
    layout: ``Qwen3_5ForConditionalGeneration`` with a tiny vision tower and MTP weights.
    ``max_shard_size`` (default "2GB") caps each safetensors file;
    when more than one file results, ``model.safetensors.index.json`` maps keys to files, as
    ``save_pretrained`` does. The same arguments always produce the same bytes. Returns the directory.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAFETENSORS_DTYPES)}, not {dtype}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _resolve_shape(shape)
    shape_fields = {f.name for f in dataclasses.fields(Shape)}
    base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if k in shape_fields})
    extra = {k: v for k, v in overrides.items() if k not in shape_fields}

    tokenizer = build_tokenizer(out, _CHAT_TEMPLATES.get(base.family, CHAT_TEMPLATE))
    config = _make_config(base, tokenizer, dtype, extra, multimodal)
    config.save_pretrained(str(out))
    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=False,
    ).save_pretrained(str(out))

    tensors = _checkpoint_tensors(config)
    zero_centred = base.family == "qwen3_5"
    itemsize = torch.empty((), dtype=dtype).element_size()
    max_bytes = _parse_size(max_shard_size if max_shard_size is not None else "2GB")
    shards = _plan_shards(tensors, itemsize, max_bytes)
    _remove_old_weights(out)
    total_params = sum(math.prod(s) for _, s in tensors)
    log.info(
        "writing %s checkpoint to %s: %d layers, %.1fM parameters, %s, %d shard(s)",
        shape if isinstance(shape, str) else "custom",
        out,
        base.num_hidden_layers,
        total_params / 1e6,
        str(dtype).removeprefix("torch."),
        len(shards),
    )
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], dtype, seed, zero_centred)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / filename, shard, dtype, seed, zero_centred)
            weight_map.update((name, filename) for name, _ in shard)
            log.info("wrote %s (%d tensors)", filename, len(shard))
        index = {
            "metadata": {"total_parameters": total_params, "total_size": total_params * itemsize},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.info("checkpoint written to %s in %.1f s", out, time.perf_counter() - start)
    return out




def _run_build_checkpoint(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.untied:
        overrides["tie_word_embeddings"] = False
    out = build_checkpoint(
        args.out,
        args.shape,
        seed=args.seed,
        dtype=DTYPES[args.dtype],
        max_shard_size=args.max_shard_size,
        multimodal=args.multimodal,
        **overrides,
    )
    print(out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``build-checkpoint`` on a CLI's subparsers; its handler is ``args.func(args)``."""
    p = subparsers.add_parser(
        "build-checkpoint",
        help="write a random-weight Qwen checkpoint (with tokenizer) for tests, demos and benchmarks",
        description=build_checkpoint.__doc__,
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="architecture (default: tiny)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)"
    )
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--untied", action="store_true", help="write a separate lm_head.weight")
    p.add_argument("--multimodal", action="store_true",
                   help="Qwen3.5 shapes: the published multimodal layout (vision tower and MTP weights beside)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--max-shard-size", default=None, help="largest safetensors file, e.g. 500MB (default: 2GB)"
    )
    p.set_defaults(func=_run_build_checkpoint)


def _main() -> int:
    """``python -m qwen_relay.checkpoints.synthetic build-checkpoint ...``, until the main CLI carries it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="qwen_relay.checkpoints.synthetic")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(_main())
