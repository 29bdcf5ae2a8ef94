"""Fold a LoRA adapter into its base model, so the result serves as a plain checkpoint, no PEFT."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

__all__ = ["merge_adapter"]

from qwen_relay.shards.dtypes import DTYPES

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype | str] = {"auto": "auto", **DTYPES}  # auto: keep the checkpoint's own
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def merge_adapter(model: str | Path, adapter: str | Path, output: str | Path, dtype: str = "auto") -> Path:
    """Write ``base + B @ A * alpha / r`` for every adapted layer as a full safetensors checkpoint.

    ``dtype="auto"`` keeps the base checkpoint's dtype (PEFT computes the delta in fp32 on CPU before
    adding it). The tokenizer comes from the adapter folder when it has one (training saves it there),
    else from the base model; the generation config is the base model's. The output folder loads with
    ``AutoModelForCausalLM`` and serves like the base model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    out = Path(output).resolve()
    if Path(str(model)).exists() and Path(str(model)).resolve() == out:
        raise ValueError("--output must differ from --model: merging would overwrite the base checkpoint")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} exists and is not a checkpoint folder; choose an empty or new --output")
    out.mkdir(parents=True, exist_ok=True)

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=_DTYPES[dtype])
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    for stale in out.glob("adapter_*"):  # never leave an adapter next to merged weights
        stale.unlink()
    tokenizer_source = adapter if all((adapter / f).is_file() for f in _TOKENIZER_FILES) else model
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out))
    gen = Path(str(model)) / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").is_file():
        shutil.copy2(gen, out / "generation_config.json")
    log.info("merged %s into %s -> %s", adapter, model, out)
    return out
