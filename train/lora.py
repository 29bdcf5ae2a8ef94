"""The LoRA model: a frozen base checkpoint with PEFT adapters on the chosen projections."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LINEAR_ATTENTION_TARGETS",
    "LoraSettings",
    "build_lora_model",
    "check_targets",
    "load_base_model",
    "trainable_parameters",
]

log = logging.getLogger(__name__)



# What LoRA can target, per family (config.json's model_type), and what the default q_proj/v_proj means there:
# - qwen2, qwen3: every attention and MLP projection; the default is each layer's query and value projections.
# - qwen3_moe: attention projections (the default) and the dense MLPs of `mlp_only_layers`. Not the experts:
#   transformers holds them as fused 3-D parameters, not linear modules, and not the router.
# - qwen3_5: q_proj/v_proj exist only in the full-attention layers (one in four), so the default adapts those;
#   the Gated DeltaNet layers' linear projections can take LoRA too: LINEAR_ATTENTION_TARGETS. Their short
#   convolution (`conv1d`) and the per-head A_log / dt_bias parameters cannot.
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")


def check_targets(model_type: str, targets: tuple[str, ...]) -> None:
    """Refuse a target an adapter could be trained on but the relay could not serve exactly: Qwen3.5's
    `conv1d`, which the served slices run from its weight (shards/deltanet.py)."""
    if model_type.startswith("qwen3_5") and "conv1d" in targets:
        raise ValueError(f"target module 'conv1d' cannot take LoRA in a served Qwen3.5 model; its linear-attention "
                         f"layers take LoRA on {', '.join(LINEAR_ATTENTION_TARGETS)}")


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA knobs. The defaults (r=16, alpha=32 on q_proj and v_proj) are the usual Qwen LoRA recipe:
    small enough to train on a CPU, and the adapter stays a few MB even for 7B. q_proj/v_proj are attention
    projections in every family (in Qwen3.5, of its full-attention layers only; see above)."""

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


def load_base_model(model: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The base causal LM from a local folder or a hub id."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)


def build_lora_model(model: str | Path, settings: LoraSettings, dtype: torch.dtype = torch.float32) -> Any:
    """Load the base model and wrap it in a PEFT LoRA model; only the adapter weights require grad."""
    from peft import get_peft_model

    base = load_base_model(model, dtype)
    check_targets(base.config.model_type, settings.target_modules)
    missing = [t for t in settings.target_modules if not any(n.endswith(t) for n, _ in base.named_modules())]
    if missing:
        linear = ", " + ", ".join(LINEAR_ATTENTION_TARGETS) if base.config.model_type.startswith("qwen3_5") else ""
        raise ValueError(
            f"target modules {missing} are not in the model (e.g. q_proj, k_proj, v_proj, o_proj, "
            f"gate_proj, up_proj, down_proj{linear})"
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
