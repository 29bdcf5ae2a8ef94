"""The weight dtypes the CLIs take by name, and the one rule for `auto`, for serving and training alike.

Apart from the slice loader, so that what needs only a dtype (the training job's driver, the checkpoint
builder) does not import the model code with it.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it (half the memory, full speed) and fp32 on a CPU (CPU bf16
    matmuls are slow and lose parity with the fp32 reference)."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {name!r}") from None
