"""The LoRA model: a frozen base checkpoint with PEFT adapters on the chosen projections."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoraSettings", "build_lora_model", "load_base_model", "resolve_dtype", "trainable_parameters"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA knobs. The defaults (r=16, alpha=32 on q_proj and v_proj) are the usual Qwen LoRA recipe:
    small enough to train on a CPU, and the adapter stays a few MB even for 7B."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def peft_config(self) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def resolve_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it (half the memory, full speed) and fp32 on CPU, where
    bf16 matmuls are slow and fp32 keeps runs reproducible."""
    if name == "auto":
        if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, not {name!r}") from None


def load_base_model(model: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The base causal LM from a local folder or a hub id."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)


def build_lora_model(model: str | Path, settings: LoraSettings, dtype: torch.dtype = torch.float32) -> Any:
    """Load the base model and wrap it in a PEFT LoRA model; only the adapter weights require grad."""
    from peft import get_peft_model

    base = load_base_model(model, dtype)
    missing = [t for t in settings.target_modules if not any(n.endswith(t) for n, _ in base.named_modules())]
    if missing:
        raise ValueError(
            f"target modules {missing} are not in the model (e.g. q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj)"
        )
    peft_model = get_peft_model(base, settings.peft_config())
    trainable, total = trainable_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%.3f%%)",
        settings.r,
        settings.alpha,
        ",".join(settings.target_modules),
        trainable,
        total,
        100.0 * trainable / total,
    )
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters)."""
    params: Sequence[torch.nn.Parameter] = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
