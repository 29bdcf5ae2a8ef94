"""Load one slice of a Hugging Face Qwen checkpoint, reading only that slice's tensors.

The slice is built on the meta device (accelerate's `init_empty_weights`), then each tensor it owns is read
with `safetensors.safe_open` from the one file the index names for it and placed with accelerate's
`set_module_tensor_to_device`. Nothing else of the checkpoint is read, so a slice's peak memory is its own
share of the weights, not the whole model's. On a CPU, linear weights are prepacked for oneDNN as they are
read (shards/packed.py), one at a time, so packing does not raise that peak.

A multimodal checkpoint as Qwen publishes Qwen3.5 keeps the text model under `model.language_model.`, beside
the vision tower (`model.visual.`) and the multi-token-prediction head (`mtp.`); a slice's `model.` names map
into the language model, and nothing else of it is ever read.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from .family import text_config
from .hub import model_dir, weight_file
from .model import ModelSlice
from .packed import (
    HEAD_BLOCK_ROWS,
    bind_group_biases,
    can_prepack,
    is_linear_weight,
    packing_groups,
    prepack_group,
    prepack_head,
    prepack_linear,
)
from .tensor_parallel import WHOLE, Shard, check_shardable, rank_config, read_shard, split_head

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(folder: Path) -> PretrainedConfig:
    """The config of the decoder the slices serve (a multimodal checkpoint's text model), refused at once,
    with the supported model types named, when the relay cannot serve it."""
    try:
        return text_config(AutoConfig.from_pretrained(folder))
    except ValueError as e:
        raise type(e)(f"{folder}: {e}") from e


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index of a sharded checkpoint or the header of a single file."""
    index = folder / INDEX_FILE
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = folder / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


LANGUAGE_MODEL = "model.language_model."  # the text model's prefix in a multimodal checkpoint


def checkpoint_key(name: str, config: PretrainedConfig, wmap: dict[str, str]) -> str:
    """Where a slice parameter lives in the checkpoint: a tied LM head reads the embedding; a multimodal
    checkpoint holds the decoder under its language model."""
    if name == "lm_head.weight" and "lm_head.weight" not in wmap and config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    if name.startswith("model.") and name not in wmap and LANGUAGE_MODEL + name.removeprefix("model.") in wmap:
        return LANGUAGE_MODEL + name.removeprefix("model.")
    return name


def row_blocks(path: Path, key: str, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """Tensor `key` in blocks of `HEAD_BLOCK_ROWS` rows, each read through a file handle of its own, so each
    block's memory goes as soon as it is packed, instead of a whole dense head piling up."""
    with safe_open(path, framework="pt", device=str(device)) as f:
        rows = f.get_slice(key).get_shape()[0]
    for start in range(0, rows, HEAD_BLOCK_ROWS):
        with safe_open(path, framework="pt", device=str(device)) as f:
            yield f.get_slice(key)[start:start + HEAD_BLOCK_ROWS].to(dtype)


def load_slice(model: str, first: int, end: int, dtype: torch.dtype, device: torch.device,
               prepack: bool = False, shard: Shard = WHOLE) -> ModelSlice:
    """Build layers [first, end) of `model` on `device`, reading only the tensors they own.

    `prepack`: on a CPU in fp32 or bf16, store linear weights in oneDNN's layout (shards/packed.py). `shard`: a
    tensor-parallel rank's share of every layer (shards/tensor_parallel.py), read as slices of the tensors.
    """
    folder = model_dir(model)
    config = load_config(folder)
    check_shardable(config, shard.world)
    with init_empty_weights():
        if shard.world == 1:
            part = ModelSlice(config, first, end)
        else:
            part = ModelSlice(rank_config(config, shard.world), first, end)
            if part.is_last:
                split_head(part, config, shard.world)
    wmap = weight_map(folder)
    names = [n for n, _ in part.named_parameters(remove_duplicate=False)]
    tied = part.is_first and part.is_last and config.tie_word_embeddings and shard.world == 1
    if tied:
        names.remove("lm_head.weight")  # one tensor serves both, tied below
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in names:
        key = checkpoint_key(name, config, wmap)
        if key not in wmap:
            raise KeyError(f"{model}: tensor {key} is missing from the checkpoint")
        by_file[wmap[key]].append((name, key))

    pack = prepack and can_prepack(device, dtype)
    packed = 0

    def dense(f: Any, name: str, key: str) -> torch.Tensor:  # a linear weight (this rank's share), to be packed
        return read_shard(f.get_slice(key), name, config, shard).to(dtype)

    for filename, pairs in sorted(by_file.items()):
        path = weight_file(model, folder, filename)
        to_pack = {name: key for name, key in pairs if pack and is_linear_weight(part, name)}
        groups = packing_groups(part, to_pack)
        for names in groups:  # read together, packed as one weight (shards/packed.py, GROUPS)
            with safe_open(path, framework="pt", device=str(device)) as f:
                weights = [dense(f, name, to_pack[name]) for name in names]
                prepack_group(part, names, weights)
            del weights
        grouped_names = {name for names in groups for name in names}
        for name, key in to_pack.items():
            if name in grouped_names:
                continue
            if name == "lm_head.weight" and shard.world == 1:
                prepack_head(part, row_blocks(path, key, dtype, device))
                continue
            # A file handle of its own: safetensors memory-maps the file and a mapping stays resident while
            # its handle is open, so the dense pages go as soon as the packed copy exists.
            with safe_open(path, framework="pt", device=str(device)) as f:
                weight = dense(f, name, key)
                if name == "lm_head.weight":
                    prepack_head(part, weight.split(HEAD_BLOCK_ROWS))
                else:
                    prepack_linear(part, name.removesuffix(".weight"), weight)
        packed += len(to_pack)
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name, key in pairs:
                if name not in to_pack:
                    value = f.get_tensor(key) if shard.world == 1 else read_shard(f.get_slice(key), name, config,
                                                                                  shard)
                    set_module_tensor_to_device(part, name, device, value=value, dtype=dtype)
    if tied:
        part.lm_head.weight = part.model.embed_tokens.weight
        if pack:  # a packed copy for the head; the embedding's lookups need the dense rows
            prepack_head(part, part.lm_head.weight.split(HEAD_BLOCK_ROWS))
            packed += 1
    if pack:
        bind_group_biases(part)
    part.attach_device(device, dtype)
    part.eval().requires_grad_(False)
    log.info("loaded layers %d-%d of %s%s from %d file(s) onto %s%s", first, end - 1, model,
             f" (tensor-parallel rank {shard.rank} of {shard.world})" if shard.world > 1 else "", len(by_file),
             device, f" ({packed} linear weights prepacked for oneDNN)" if packed else "")
    return part
