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

Sibling projections that read one input (q/k/v, gate/up: `GROUPS`) are packed as one weight, read by one call
(`PackedGroup`), as vLLM's CPU build merges them; each stays a module of its own for PEFT (`PackedPart`).

A compiled decode step (`--decode-step compiled`) cannot take the packed weights: they are opaque oneDNN
tensors, which dynamo cannot trace and inductor lowers only as constants. So under `torch.compile` each packed
linear is an operator that names its weight by a handle (as vLLM's CPU build names its oneDNN matmuls):
inductor fuses the norms, rotary, residuals and attention around opaque oneDNN calls (docs/benchmarks.md, "The
decode step"). The operator is C++ (`qwen_relay::packed_linear_native`, built at first use by
shards/native.py) where a compiler is found, else the Python custom operator `qwen_relay::packed_linear`; both
run the same oneDNN call on the same padded rows, so their outputs are equal bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import logging
import platform
import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .dtypes import cpu_bf16_fast
from .native import build, torch_flags

log = logging.getLogger(__name__)

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


# Packed weights by handle, for the operators a compiled step calls; held weakly, so a dropped slice frees its
# weights. Plain references, no callbacks: a WeakValueDictionary's removal callback runs as each weight dies,
# which at a slice process's exit is where a second SIGTERM (Ray's handler raising SystemExit) landed and printed
# "Exception ignored" tracebacks. Dead entries are dropped at the next packing instead.
_PACKED: dict[int, weakref.ref[torch.Tensor]] = {}
_HANDLES = itertools.count()

# A compiled step's packed linear, called without Python: the same oneDNN call and padding as `_linear`, reached
# from inductor's wrapper through the dispatcher alone. Through the Python operator below, each of a decode step's
# ~100 calls cost ~30 us more (bf16 Qwen2.5-0.5B on 2 cores: a one-row step 52 against 56 ms, docs/benchmarks.md).
# The table holds weak references, as `_PACKED` does.
NATIVE_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <torch/library.h>
#include <mutex>
#include <unordered_map>

namespace {
using Strong = c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
std::mutex mutex;
std::unordered_map<int64_t, Weak> weights;

void register_packed(int64_t handle, const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = weights.begin(); it != weights.end();) it = it->second.expired() ? weights.erase(it) : std::next(it);
  weights.insert_or_assign(handle, Weak(weight.getIntrusivePtr()));
}

at::Tensor weight_of(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = weights.find(handle);
  Strong impl = it == weights.end() ? Strong() : it->second.lock();
  TORCH_CHECK(impl, "packed weight ", handle, " is not registered or was freed");
  return at::Tensor(std::move(impl));
}

at::Tensor packed_linear(const at::Tensor& x, int64_t handle, const std::optional<at::Tensor>& bias,
                         int64_t out_features, int64_t min_rows) {
  static auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                 c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const at::Tensor weight = weight_of(handle);
  const c10::List<std::optional<at::Scalar>> none;
  const int64_t width = x.size(-1), rows = x.numel() / width;
  if (rows >= min_rows) return linear.call(x, weight, bias, "none", none, "");
  const at::Tensor padded = at::constant_pad_nd(x.reshape({rows, width}), {0, 0, 0, min_rows - rows});
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  return linear.call(padded, weight, bias, "none", none, "").narrow(0, 0, rows).reshape(shape);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_relay, m) {
  m.def("packed_linear_native(Tensor x, int handle, Tensor? bias, int out_features, int min_rows) -> Tensor");
  m.def("register_packed(int handle, Tensor weight) -> ()", &register_packed);
}
TORCH_LIBRARY_IMPL(qwen_relay, CPU, m) { m.impl("packed_linear_native", &packed_linear); }
"""
NATIVE_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++20")
_native_lock = threading.Lock()
_native_loaded = False  # set once the native operator is loaded and holds every packed weight


def _pack(weight: torch.Tensor) -> tuple[nn.Parameter, int]:
    packed = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT), requires_grad=False)
    with _native_lock:
        handle = next(_HANDLES)
        for dead in [h for h, ref in _PACKED.items() if ref() is None]:
            del _PACKED[dead]
        _PACKED[handle] = weakref.ref(packed)
        if _native_loaded:
            torch.ops.qwen_relay.register_packed(handle, packed)
    return packed, handle


@functools.cache
def load_native() -> bool:
    """Build and load the native operator and hand it every packed weight so far (later ones at packing); False
    where it cannot be built or loaded (the Python operator serves). Called before a step is compiled: tracing
    reads `_native_loaded`."""
    global _native_loaded
    path = build("packed_linear", NATIVE_SOURCE, (*NATIVE_FLAGS, *torch_flags()))
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("the native packed linear could not be loaded (%s); compiled steps call it through Python", e)
        return False
    torch.library.register_fake("qwen_relay::packed_linear_native")(_fake_native)
    with _native_lock:
        for handle, ref in _PACKED.items():
            if (weight := ref()) is not None:
                torch.ops.qwen_relay.register_packed(handle, weight)
        _native_loaded = True
    return True


def _fake_native(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int,
                 min_rows: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    padded = torch.cat([x.reshape(rows, -1), x.new_zeros(MIN_ROWS - rows, x.shape[-1])])
    out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")
    return out[:rows].reshape(*x.shape[:-1], -1)


@torch.library.custom_op("qwen_relay::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """`_linear` with the packed weight registered as `handle`: what a compiled step calls without the native
    operator."""
    weight = _PACKED[handle]()
    if weight is None:
        raise RuntimeError(f"packed weight {handle} was freed")
    return _linear(x, weight, bias)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _forward(x: torch.Tensor, weight: torch.Tensor, handle: int, bias: torch.Tensor | None,
             out_features: int) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced once per graph: the operator chosen here is what it calls
        if _native_loaded:
            return torch.ops.qwen_relay.packed_linear_native(x, handle, bias, out_features, MIN_ROWS)
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


# Sibling linears that read the same input, packed as one weight (as vLLM's CPU build merges them): one oneDNN call
# streams all of them. bf16 Qwen2.5-0.5B shapes, 2 threads, the 24 layers' linears in a chain: 44-48 ms at one row
# and 62-74 at 16 merged, against 55-70 and 75-78 as seven calls a layer (docs/benchmarks.md).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class PackedGroup:
    """One packed weight for sibling linears (`GROUPS`); `__call__` gives every member's output at once.

    Its members stay modules of their own (`PackedPart`), under their checkpoint names, so PEFT can wrap any of
    them. The model calls the group once where no member is wrapped (`ModelSlice`); a member called on its own
    (through an adapter's wrapper) computes the whole group and keeps the other members' outputs for the same
    input until they are asked for, so the group is still computed once per input."""

    def __init__(self, linears: list[nn.Linear], weight: torch.Tensor) -> None:
        self.weight, self.handle = _pack(weight)
        self.sizes = [linear.out_features for linear in linears]
        self.bias: torch.Tensor | None = None  # `bind_bias`, once the loader has filled the members' biases
        self.parts = [PackedPart(linear, self, index) for index, linear in enumerate(linears)]
        self._kept: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    def bind_bias(self) -> None:
        biases = [part.bias for part in self.parts]
        some = next((b for b in biases if b is not None), None)
        if some is not None:
            self.bias = torch.cat([b if b is not None else some.new_zeros(n)
                                   for b, n in zip(biases, self.sizes, strict=True)])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = _forward(x, self.weight, self.handle, self.bias, sum(self.sizes))
        return list(out.split(self.sizes, dim=-1))

    def member(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self(x)[index]
        if self._kept is None or self._kept[0] is not x:
            self._kept = (x, list(self(x)))
        outs = self._kept[1]
        out, outs[index] = outs[index], None
        if out is None:  # asked twice for one input: compute afresh rather than guess
            out = self(x)[index]
        if all(o is None for o in outs):
            self._kept = None  # every member served: hold no activations between steps
        return out


class PackedPart(PackedLinear):
    """One member of a `PackedGroup`: an `nn.Linear` by its shapes and names, its weight the group's."""

    def __init__(self, linear: nn.Linear, group: PackedGroup, index: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.handle = group.weight, group.handle  # shared: counted once by parameters()
        self.bias = linear.bias  # may still be on `meta`: the loader fills it in, then `bind_bias`
        self.group, self.index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member(x, self.index)


def grouped(module: nn.Module, names: tuple[str, ...]) -> PackedGroup | None:
    """The group that `module`'s children `names` form, if each is an unwrapped member of it, in that order."""
    parts = [getattr(module, name, None) for name in names]
    if type(parts[0]) is not PackedPart:
        return None
    group = parts[0].group
    return group if all(type(p) is PackedPart and p.group is group and p.index == i
                        for i, p in enumerate(parts)) else None


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


def packing_groups(root: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """The linear weights among `names` (from `is_linear_weight`) that pack together: each of `GROUPS` whose
    members are all in `names`, siblings reading inputs of one width, as lists of their weight names."""
    names = set(names)
    found = []
    for name in sorted(names):
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        for group in GROUPS:
            members = [f"{parent}.{g}.weight" if parent else f"{g}.weight" for g in group]
            if leaf == group[0] and all(m in names for m in members):
                widths = {root.get_submodule(m.removesuffix(".weight")).in_features for m in members}
                if len(widths) == 1:
                    found.append(members)
    return found


def prepack_group(root: nn.Module, names: list[str], weights: list[torch.Tensor]) -> None:
    """Replace the sibling `nn.Linear`s `names` (weight names) with the `PackedPart`s of one `PackedGroup`."""
    modules = [name.removesuffix(".weight") for name in names]
    group = PackedGroup([root.get_submodule(m) for m in modules], torch.cat(weights))
    for module, part in zip(modules, group.parts, strict=True):
        root.set_submodule(module, part)


def bind_group_biases(root: nn.Module) -> None:
    """Each group's bias from its members', once the loader has read them."""
    for module in root.modules():
        if isinstance(module, PackedPart) and module.index == 0:
            module.group.bind_bias()


def prepack_linear(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace the `nn.Linear` at `name` with a `PackedLinear` holding `weight`, packed."""
    root.set_submodule(name, PackedLinear(root.get_submodule(name), weight))


def prepack_head(root: nn.Module, row_blocks: Iterable[torch.Tensor]) -> None:
    """Replace `root.lm_head` with a `PackedHead` read from consecutive blocks of the weight's rows."""
    root.lm_head = PackedHead(root.lm_head, row_blocks)
