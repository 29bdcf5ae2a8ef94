"""CPU linear layers with weights prepacked once into oneDNN's blocked layout: the relay's CPU speed lever.

Stock PyTorch runs an fp32 `nn.Linear` on the CPU through MKL's sgemm. On the AMD EPYC (Zen 5) machines this
project is measured on, MKL takes a slow generic path: a Qwen2.5-0.5B layer's seven projections at 16 rows
took 6.3 ms there, and 2.0 ms through oneDNN's matmul with the weight reordered once, at load, into the
layout its kernels read (what IPEX and inductor's freezing pass do); the 151936-row LM head took 69 ms and
16 ms; one row, 32 ms and 13 ms (docs/benchmarks.md). The packed weight replaces the dense one, so memory
does not grow, except for a tied LM head that shares a slice with the embedding, whose lookups need the
dense rows.

bf16 weights (a bf16 checkpoint, which `--dtype auto` keeps bf16 on a CPU with native bf16 kernels) pack the
same way, onto oneDNN's AVX-512 BF16 / AMX kernels; stock PyTorch runs them slower. One thread on that machine,
CPU time: the layer's projections at 1, 4 and 16 rows took 3.8, 4.1 and 5.8 ms stock bf16, 2.4, 2.0 and 3.5 ms
packed bf16 (4.4, 3.8 and 6.8 packed fp32); the head 31, 33 and 49 ms stock bf16, 18, 16 and 31 packed bf16.

The packed layout is chosen for a batch-size hint; measured at 1 to 512 rows, a hint of 16 was as fast as
the best hint for every size. Fewer than `MIN_ROWS` rows are padded with zero rows: inside a model, where each
weight streams from memory, oneDNN's 1- and 2-row kernels took longer than its 4-row one (one thread, Qwen2.5-
0.5B's layers 0-11: a decode step of 1, 2 and 4 rows took 56, 68 and 46 ms unpadded, 47, 49 and 47 padded).
LoRA adapters still apply: PEFT wraps a `PackedLinear` like any `nn.Linear` and adds its low-rank update on
top of this forward.

A compiled decode step (`--decode-step compiled`) cannot take the packed weights: they are opaque oneDNN
tensors, which dynamo cannot trace and inductor lowers only as constants. So under `torch.compile` each packed
linear is the custom operator `qwen_relay::packed_linear`, which names its weight by a handle (as vLLM's CPU
build names its oneDNN matmuls): inductor fuses the norms, rotary, residuals and attention around opaque
oneDNN calls (docs/benchmarks.md, "The decode step").
"""

from __future__ import annotations

import itertools
import platform
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .dtypes import cpu_bf16_fast

BATCH_HINT = 16
MIN_ROWS = 4  # fewer rows are padded up to this: oneDNN's 1- and 2-row kernels stream the weight slower
HEAD_BLOCK_ROWS = 16384  # LM-head rows packed at a time (a 151936 x 896 fp32 head: 56 MiB blocks, not 519)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32, or bf16 where oneDNN has native bf16 kernels, on an x86-64 CPU: the cases measured."""
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if dtype == torch.bfloat16:
        return cpu_bf16_fast()
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


# Packed weights by handle, for the custom operator; held weakly, so a dropped slice frees its weights.
_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def _pack(weight: torch.Tensor) -> tuple[nn.Parameter, int]:
    packed = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT), requires_grad=False)
    handle = next(_HANDLES)
    _PACKED[handle] = packed
    return packed, handle


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    padded = torch.cat([x.reshape(rows, -1), x.new_zeros(MIN_ROWS - rows, x.shape[-1])])
    out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")
    return out[:rows].reshape(*x.shape[:-1], -1)


@torch.library.custom_op("qwen_relay::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """`_linear` with the packed weight registered as `handle`: what a compiled step calls."""
    return _linear(x, _PACKED[handle], bias)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _forward(x: torch.Tensor, weight: torch.Tensor, handle: int, bias: torch.Tensor | None,
             out_features: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return packed_linear(x, handle, bias, out_features)
    return _linear(x, weight, bias)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose weight is an opaque oneDNN tensor; bias, shapes and names are unchanged."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.handle = _pack(weight)
        self.bias = linear.bias  # may still be on `meta`: the loader fills it in afterwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(x, self.weight, self.handle, self.bias, self.out_features)


class PackedHead(nn.Module):
    """The bias-free LM head, packed in blocks of rows: built from one block at a time, so loading it never
    holds a dense copy of the whole head beside the packed one (an extra 519 MiB on Qwen2.5-0.5B)."""

    def __init__(self, linear: nn.Linear, row_blocks: Iterable[torch.Tensor]) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("a packed LM head has no bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = [(*_pack(rows), rows.shape[0]) for rows in row_blocks]  # (weight, handle, rows) per block
        self.blocks = nn.ParameterList(weight for weight, _, _ in packed)
        self.handles = [(handle, rows) for _, handle, rows in packed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_forward(x, block, handle, None, rows)
                          for block, (handle, rows) in zip(self.blocks, self.handles, strict=True)], dim=-1)


def is_linear_weight(root: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of a plain `nn.Linear` (one that can be packed)."""
    module, _, attr = name.rpartition(".")
    return attr == "weight" and type(root.get_submodule(module)) is nn.Linear


def prepack_linear(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace the `nn.Linear` at `name` with a `PackedLinear` holding `weight`, packed."""
    root.set_submodule(name, PackedLinear(root.get_submodule(name), weight))


def prepack_head(root: nn.Module, row_blocks: Iterable[torch.Tensor]) -> None:
    """Replace `root.lm_head` with a `PackedHead` read from consecutive blocks of the weight's rows."""
    root.lm_head = PackedHead(root.lm_head, row_blocks)
