"""One slice and its KV cache: what a Ray actor hosts, and what runs in-process without Ray.

Like nano-vllm's ModelRunner, this is the only place a forward happens. It checks every step against what
its cache holds, so a step meant for a cache that was lost (the actor restarted) fails loudly with
`CacheMismatch` instead of silently attending to zeros.

Decode steps (every row one token) of a dense slice with no LoRA adapter injected take the static path
(`DecodeInputs` in shards/step_inputs.py, `ModelSlice.decode`); prefills, mixed batches, adapters, MoE and
Qwen3.5 slices take the dynamic one (`StepMetadata`). Both return logits on the last slice, which the runner
samples with the one sampler (shards/sampler.py). `SliceSpec.decode` picks how the static step runs:
"compiled" wraps it in `torch.compile` (on CUDA `mode="reduce-overhead"`: CUDA graphs, captured per bucket
after warm-up), "static" runs it eagerly, "dynamic" never uses it, "auto" compiles on CUDA, and on a CPU
compiles a slice of at least `COMPILE_MIN_BYTES` of weights (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .adapters import SliceAdapters
from .batch import SamplingParams, StepBatch
from .collectives import Collectives, traceable
from .dtypes import resolve_dtype, stored_dtype
from .fused import WARMUP_TOKENS
from .hub import model_dir
from .kv_cache import CacheShape, KVCache
from .loader import load_config, load_slice
from .packed import PackedHead, PackedLinear, load_native
from .sampler import sample
from .stats import SliceStats
from .step_inputs import DecodeInputs, StepMetadata, is_decode
from .tensor_parallel import WHOLE, Shard, gather_vocab, shard_lora

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "dynamic", "static", "compiled")
# What "auto" means on a CPU: the compiled step for a slice whose weights weigh at least COMPILE_MIN_BYTES (measured
# in docs/benchmarks.md, "The decode step"), else the eager static step. Compiling costs seconds to a minute
# per slice at start-up; a slice smaller than this (the tests' tiny checkpoints) steps in a millisecond or two,
# and would wait longer for its compile than it could ever win back.
COMPILE_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class SliceSpec:
    """Everything needed to (re)build a slice anywhere: a restarted actor rebuilds from this alone."""

    model: str
    first: int  # first layer, inclusive
    end: int  # last layer + 1
    dtype: str = "auto"  # auto: bf16 on a GPU, the checkpoint's own dtype on a CPU (shards/dtypes.py)
    device: str = "auto"  # "auto": the first visible GPU if any, else CPU
    max_slots: int = 16  # sequences running at once (recurrent state, static decode rows)
    max_len: int = 2048  # the longest context a request may have (the static step's largest context bucket)
    num_blocks: int = 2048  # KV blocks (server/block_manager.py sizes the pool; every slice holds as many)
    block_size: int = 16  # positions per block
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    prepack: bool = True  # CPU fp32 or bf16: linear weights in oneDNN's layout (shards/packed.py)
    decode: str = "auto"  # the decode step: auto, dynamic, static or compiled (module docstring)
    tensor_parallel: int = 1  # ranks sharing each layer (shards/tensor_parallel.py, shards/group.py)
    # How those ranks meet: auto (shared memory on a CPU, torch.distributed NCCL on GPUs), shm, or torch (gloo on
    # a CPU: how the tests run the GPU ranks' code path). Not a serve flag (shards/collectives.py).
    collective: str = "auto"


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec (ru_maxrss can carry a
    parent's peak across fork and exec); elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class SliceRunner:
    """`shard` and `collectives`: this runner is one rank of a tensor-parallel group (shards/group.py)."""

    def __init__(self, spec: SliceSpec, shard: Shard = WHOLE, collectives: Collectives | None = None) -> None:
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        if spec.device == "auto":
            device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(spec.device)
        self.spec = spec
        self.device = device
        self.dtype = resolve_dtype(spec.dtype, device, stored_dtype(load_config(model_dir(spec.model))))
        # A compiled step calls packed linears as opaque custom operators (shards/packed.py).
        self.slice = load_slice(spec.model, spec.first, spec.end, self.dtype, device, spec.prepack, shard)
        self.shard, self.collectives = shard, collectives
        self.decode_mode = self._decode_mode(spec.decode)
        # A slice that compiles its decode step on a CPU fuses its prompt steps' elementwise work too: in fp32,
        # where it measured 10% faster; bf16 (its roundings kept as eager mode's) measured no faster.
        self.slice.fuse_prompts = (self.decode_mode == "compiled" and device.type == "cpu"
                                   and self.dtype == torch.float32)
        if collectives is not None:
            # A compiled step calls them as custom operators, which it traces whole (shards/collectives.py).
            reduce, gather = (traceable(collectives) if self.decode_mode == "compiled"
                              else (collectives.all_reduce, collectives.all_gather))
            self.slice.all_reduce = reduce
            self.slice.gather_vocab = gather_vocab(gather, self.slice.config.vocab_size)
        config = self.slice.config
        self.cache = KVCache(
            num_layers=self.slice.num_attention_layers,
            shape=CacheShape(spec.num_blocks, spec.block_size, spec.max_slots),
            num_kv_heads=config.num_key_value_heads,
            head_dim=self.slice.head_dim,
            dtype=self.dtype,
            device=device,
            recurrent=self.slice.recurrent_shape,
        )
        self.forward_seconds = 0.0
        self.steps = 0
        self.adapters = SliceAdapters(self.slice, None if shard.world == 1 else partial(
            shard_lora, config=load_config(model_dir(spec.model)), shard=shard))
        self._lock = threading.Lock()  # adapters change between steps, never during one (LocalPipeline threads)
        self._decode = self._decode_step()

    @torch.inference_mode()
    def step(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int]:
        """One forward of this slice: hidden states out, or token ids (a plain list) from the last slice: what
        the transports pass on (server/transport.py, server/pipeline.py).

        The last slice samples here, next to its logits (both paths, one sampler: shards/sampler.py), so only
        token ids (never vocab-sized logits) leave it.
        """
        self.cache.check(batch.slots, batch.blocks, batch.ends())
        return self._forward(batch, hidden)

    def _forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor | list[int]:
        start = time.perf_counter()
        if hidden is not None:
            hidden = hidden.to(self.device, self.dtype)
            if self.decode_mode == "compiled" and not hidden.is_inference():
                # Compiled graphs (the decode step, the fused prompt kernels) are guarded on whether their input
                # is an inference tensor. Hidden states that came through Ray are not (those made in this process
                # are): one kind always, or each graph compiles twice.
                hidden = hidden.clone()
        with self._lock:
            out = self._run_static(batch, hidden) if self._static(batch) else self._run_dynamic(batch, hidden)
            if self.slice.is_last:  # before the next step may replay the graph that wrote these logits
                out = sample(out, batch.sampling, batch.ends()).tolist()
        if not self.slice.is_last and self.device.type != "cpu":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - start
        self.steps += 1
        return out

    def _decode_mode(self, asked: str) -> str:
        if asked not in DECODE_MODES:
            raise ValueError(f"decode {asked!r}: choose one of {', '.join(DECODE_MODES)}")
        mode = asked
        if asked == "auto":
            mode = "compiled" if self.device.type == "cuda" or self.weight_bytes() >= COMPILE_MIN_BYTES else "static"
        if mode != "dynamic" and not self.slice.static_decode:
            log.info("layers %d-%d (%s): decode steps take the dynamic path (no static step for this family "
                     "or layer kind)", self.spec.first, self.spec.end - 1, self.slice.family.name)
            return "dynamic"
        log.info("layers %d-%d: %s decode step", self.spec.first, self.spec.end - 1, mode)
        return mode

    def _decode_step(self) -> Callable:
        """`ModelSlice.decode`, compiled for "compiled", traced whole (`fullgraph`). On CUDA: one graph per
        (rows, context) bucket, each captured as CUDA graphs, with the cache at a static address. On a CPU: one
        graph for one row and one for more, whatever the context (`_mark_dynamic`), both compiled at warm-up,
        so no request waits for a compile that its bucket's first step would otherwise start."""
        if self.decode_mode != "compiled":
            return self.slice.decode
        # Every slice in this process shares ModelSlice.decode's compile cache: room for all their buckets.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 256)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
        if self.device.type == "cuda":
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)
            return torch.compile(self.slice.decode, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # Packed linears stay opaque oneDNN calls, inductor fuses what lies between them; dense weights (a CPU
        # without packed kernels for the dtype) become graph constants that inductor packs itself (freezing).
        # With packed linears the step's wrapper is C++ too (`cpp_wrapper`): its ~250 kernel and operator calls
        # a step cost ~1.5 ms less than from Python (bf16 0.5B, 2 cores: one row 50-51 against 52-53 ms).
        dense = not any(isinstance(m, (PackedLinear, PackedHead)) for m in self.slice.modules())
        if not dense:
            load_native()  # before tracing: the graph calls the native operator where it loads
        step = torch.compile(self.slice.decode, fullgraph=True, dynamic=None,
                             options={"freezing": dense, "cpp_wrapper": not dense})

        def decode(ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, hidden: torch.Tensor | None,
                   cache: KVCache) -> torch.Tensor:
            _mark_dynamic(ids, positions, tables, hidden)
            return step(ids, positions, tables, hidden, cache)

        return decode

    def _static(self, batch: StepBatch) -> bool:
        return (self.decode_mode != "dynamic" and is_decode(batch) and not self.adapters.injected
                and not (batch.adapters and any(batch.adapters)))

    def _run_dynamic(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        meta = StepMetadata.build(batch, self.device, self.cache.block_size, self.cache.scratch)
        # The forward is packed (one real token per row): each token goes through its row's adapter.
        per_token = batch.adapters and [a for a, tokens in zip(batch.adapters, batch.token_ids, strict=True)
                                        for _ in tokens]
        with self.adapters.routed(per_token):
            return self.slice(meta, hidden, self.cache)

    def _run_static(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        """The static step on the batch padded to its bucket: the real rows' hidden states or logits."""
        inputs = DecodeInputs.build(batch, self.device, self.spec.max_slots, self.spec.max_len,
                                    self.cache.block_size, self.cache.scratch)
        if hidden is not None:
            hidden = inputs.pad(hidden)
        graphs = self.decode_mode == "compiled" and self.device.type == "cuda"
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        args = (inputs.ids, inputs.positions, inputs.tables, hidden, self.cache)
        try:
            out = self._decode(*args)
        except Exception:
            if self.decode_mode != "compiled":
                raise
            # A step that compiles nowhere else must not cost the relay its slice: the eager step is the same.
            log.exception("layers %d-%d: the compiled decode step failed; decoding with the eager static step",
                          self.spec.first, self.spec.end - 1)
            self.decode_mode, self._decode = "static", self.slice.decode
            return self._run_static(batch, hidden[: inputs.rows] if hidden is not None else None)
        out = out[: inputs.rows]
        # A CUDA graph's output buffer is overwritten by its next replay, maybe before the next slice reads it;
        # the last slice's logits are sampled under the lock, before any replay.
        return out.clone() if graphs and not self.slice.is_last else out

    def load_adapter(self, name: str, path: str, fingerprint: str = "") -> dict:
        """This slice's share of a PEFT LoRA adapter (none if it holds none of its layers); idempotent."""
        with self._lock:
            return self.adapters.load(name, path, fingerprint)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter's weights from this slice; a no-op for one it does not hold."""
        with self._lock:
            self.adapters.unload(name)

    def reset(self) -> None:
        """The gateway forgot every sequence (start-up, or a recovery after a fault, which rebuilds every
        sequence's blocks by replaying token histories): accept steps from now on."""
        self.cache.reset()

    @torch.inference_mode()
    def warmup(self) -> None:
        """One throwaway prefill and decode so the first real request does not pay for lazy initialisation.
        They write only the scratch block (every position of the table names it), whatever the pool's size;
        the cache stays closed to steps until the gateway resets it (a restarted actor warms up too, and must
        refuse steps)."""
        table = [[self.cache.scratch] * 3]
        batch = StepBatch(slots=[0], starts=[0], token_ids=[[0, 0]], blocks=table, sampling=[SamplingParams()])
        hidden = None
        if not self.slice.is_first:
            hidden = torch.zeros(2, 1, self.slice.config.hidden_size, dtype=self.dtype, device=self.device)
        self._forward(batch, hidden)  # hidden states travel packed: one real token per row
        if self.slice.fuse_prompts:  # a step long enough to compile the fused prompt kernels (shards/fused.py)
            n = WARMUP_TOKENS
            long = StepBatch(slots=[0], starts=[0], token_ids=[[0] * n], sampling=[SamplingParams()],
                             blocks=[[self.cache.scratch] * -(-n // self.cache.block_size)])
            self._forward(long, None if hidden is None else hidden.new_zeros(n, *hidden.shape[1:]))
        if self.decode_mode == "dynamic":
            return
        # The first decode bucket, compiled (and captured) here; on a CPU also the graph for several rows.
        rows = 2 if self.decode_mode == "compiled" and self.device.type == "cpu" and self.spec.max_slots > 1 else 1
        for n in range(1, rows + 1):
            decode = StepBatch(slots=list(range(n)), starts=[2] * n, token_ids=[[0]] * n, blocks=table * n,
                               sampling=[SamplingParams()] * n)
            self._forward(decode, None if hidden is None else hidden[:n])  # contiguous, as real steps bring

    def weight_bytes(self) -> int:
        """Bytes of this slice's parameters; a tied weight counts once."""
        return sum(p.nbytes for p in self.slice.parameters())

    def stats(self) -> SliceStats:
        return SliceStats(
            first=self.spec.first,
            end=self.spec.end,
            has_embeddings=self.slice.is_first,
            has_lm_head=self.slice.is_last,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            cache_bytes=self.cache.nbytes,
            weight_bytes=self.weight_bytes(),
            peak_rss_bytes=peak_rss_bytes(),
            forward_seconds=self.forward_seconds,
            steps=self.steps,
        )


def _mark_dynamic(ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                  hidden: torch.Tensor | None) -> None:
    """Rows and context width as symbols, so one compiled CPU step serves every bucket. A size of 1 stays a
    constant (torch specialises 0 and 1), hence a graph of its own for one row."""
    for tensor in (ids, positions, tables, hidden):
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    torch._dynamo.maybe_mark_dynamic(tables, 1)
