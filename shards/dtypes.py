"""The weight dtypes the CLIs take by name, and the one rule for `auto`, for serving and training alike.

Apart from the slice loader, so that what needs only a dtype (the training job's driver, the checkpoint
builder) does not import the model code with it.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_bf16_fast() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX): without them a CPU bf16 matmul is
    emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def stored_dtype(config: object) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are stored in, if it says one."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPES.get(stored) if isinstance(stored, str) else stored


def resolve_dtype(name: str, device: torch.device | str, stored: torch.dtype | None = None) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it (half the memory, full speed). On a CPU it is the checkpoint's
    own dtype, `stored`, where the CPU runs it fast: a bf16 checkpoint stays bf16 (half the bytes each token
    streams, shards/packed.py) and an fp32 one fp32, so neither is converted. fp16 (slow CPU kernels), bf16
    without native kernels, or no stored dtype given (training: fp32 gradients on a CPU) mean fp32."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if stored == torch.bfloat16 and cpu_bf16_fast() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {name!r}") from None
