"""Stock `nn.Linear` against oneDNN with a prepacked weight, at Qwen model shapes, in fp32 or bf16.

The measurement behind shards/packed.py: one decoder layer's seven projections and the LM head at the row
counts a decode step (1, 4, 16) and a prefill (128, 512) present, median of repeated calls, side by side in
one process. With `--dtype bfloat16` it times stock bf16, packed bf16 and packed fp32 (what a bf16 checkpoint
ran on before bf16 was packed). Run it on the machine you deploy to: the gap depends on the CPU (MKL is slow
on AMD; native bf16 needs AVX-512 BF16 or AMX). On a machine others share, `--clock cpu --threads 1` times
this process's CPU seconds, which other processes' load does not inflate as it does the wall clock.

    python -m qwen_relay.bench.gemm                    # Qwen2.5-0.5B shapes, fp32, all cores
    python -m qwen_relay.bench.gemm --dtype bfloat16 --rows 1,4,16 --threads 1 --clock cpu
    python -m qwen_relay.bench.gemm --shape qwen2.5-7b --threads 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qwen_relay.checkpoints.synthetic import SHAPES
from qwen_relay.shards.dtypes import DTYPES
from qwen_relay.shards.packed import PackedHead, PackedLinear

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    fn()  # first call: oneDNN builds its kernel for the shape
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1000


class Variant:
    """One way to run the layer and the head: stock or packed kernels, at one dtype."""

    def __init__(self, name: str, layer: list[torch.nn.Linear], head: torch.nn.Linear, dtype: torch.dtype,
                 packed: bool) -> None:
        self.name, self.dtype = name, dtype
        self.layer = [torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
                      for m in layer]
        for mine, theirs in zip(self.layer, layer, strict=True):
            mine.load_state_dict(theirs.state_dict())
        dense_head = torch.nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
        dense_head.load_state_dict(head.state_dict())
        if packed:
            self.layer = [PackedLinear(m, m.weight) for m in self.layer]
            self.head: torch.nn.Module = PackedHead(dense_head, dense_head.weight.split(16384))
        else:
            self.head = dense_head

    def time(self, rows: int, repeats: int, clock: Callable[[], float]) -> tuple[float, float]:
        """Median ms of the layer's projections and of the head for `rows` input rows."""
        inputs = {n: torch.randn(rows, n, dtype=self.dtype) for n in {m.in_features for m in self.layer}}
        x = inputs[self.head.in_features]
        return (median_ms(lambda: [m(inputs[m.in_features]) for m in self.layer], repeats, clock),
                median_ms(lambda: self.head(x), max(3, repeats // 4), clock))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--rows", default="1,4,16,128,512", help="rows (tokens) per call")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="cpu: this process's CPU time (with --threads 1, robust to other processes' load)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    hidden, vocab = shape.hidden_size, shape.vocab_size or 1024
    # A MoE layer's MLP GEMMs are one expert's; Qwen3.5's attention is its full-attention layers'.
    inter = shape.config.get("moe_intermediate_size", shape.intermediate_size)
    head_dim = shape.config.get("head_dim", hidden // shape.num_attention_heads)
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    q_out = 2 * q if shape.family == "qwen3_5" else q  # Qwen3.5's q_proj also yields the output gate
    bias = shape.family == "qwen2"  # only Qwen2 has q/k/v biases
    torch.manual_seed(0)
    # q, k, v, o, gate, up, down: one decoder layer's projections.
    layer = [torch.nn.Linear(i, o, bias=b) for i, o, b in
             [(hidden, q_out, bias), (hidden, kv, bias), (hidden, kv, bias), (q, hidden, False),
              (hidden, inter, False), (hidden, inter, False), (inter, hidden, False)]]
    head = torch.nn.Linear(hidden, vocab, bias=False)
    dtype = DTYPES[args.dtype]
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    variants = [Variant(f"stock {short[dtype]}", layer, head, dtype, packed=False),
                Variant(f"packed {short[dtype]}", layer, head, dtype, packed=True)]
    if dtype != torch.float32:  # what such a checkpoint ran on before its dtype was packed
        variants.append(Variant("packed fp32", layer, head, torch.float32, packed=True))

    print(f"{args.shape}: hidden {hidden}, intermediate {inter}, vocab {vocab}; {torch.get_num_threads()} "
          f"threads; median {args.clock} ms per call; speed-up: the first variant's time over each other's")
    names = [v.name for v in variants]
    print("| rows | " + " | ".join(f"layer: {n}" for n in names) + " | " + " | ".join(f"head: {n}" for n in names)
          + " |")
    print("|---:" * (1 + 2 * len(names)) + "|")
    clock = CLOCKS[args.clock]
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            layer_ms, head_ms = zip(*(v.time(rows, args.repeats, clock) for v in variants), strict=True)
            cells = [f"{ms:.2f}" + (f" ({layer_ms[0] / ms:.1f}x)" if i else "") for i, ms in enumerate(layer_ms)]
            cells += [f"{ms:.1f}" + (f" ({head_ms[0] / ms:.1f}x)" if i else "") for i, ms in enumerate(head_ms)]
            print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
