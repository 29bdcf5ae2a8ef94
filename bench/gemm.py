"""Stock `nn.Linear` (MKL sgemm on x86 CPUs) against oneDNN with a prepacked weight, at Qwen model shapes.

The measurement behind shards/packed.py: one decoder layer's seven projections and the LM head, fp32, at the
row counts a decode step (1, 16) and a prefill (128, 512) present, median of repeated calls, side by side in
one process. Run it on the machine you deploy to: the gap depends on the CPU (MKL is slow on AMD).

    python bench/gemm.py                    # Qwen2.5-0.5B shapes, all cores
    python bench/gemm.py --shape qwen2.5-7b --threads 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwen_relay.checkpoints.synthetic import SHAPES
from qwen_relay.shards.packed import PackedHead, PackedLinear


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first call: oneDNN builds its kernel for the shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def time_rows(rows: int, layer: list[torch.nn.Linear], packed: list[PackedLinear], head: torch.nn.Linear,
              packed_head: PackedHead, repeats: int) -> tuple[float, float, float, float]:
    """Median ms of the layer's projections and of the head, stock then packed, for `rows` input rows."""
    inputs = {n: torch.randn(rows, n) for n in {m.in_features for m in layer}}
    x = inputs[head.in_features]
    return (median_ms(lambda: [F.linear(inputs[m.in_features], m.weight, m.bias) for m in layer], repeats),
            median_ms(lambda: [m(inputs[m.in_features]) for m in packed], repeats),
            median_ms(lambda: head(x), max(3, repeats // 4)),
            median_ms(lambda: packed_head(x), max(3, repeats // 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--rows", default="1,16,128,512", help="rows (tokens) per call")
    parser.add_argument("--repeats", type=int, default=20)
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
    packed = [PackedLinear(m, m.weight) for m in layer]
    head = torch.nn.Linear(hidden, vocab, bias=False)
    packed_head = PackedHead(head, head.weight.split(16384))

    print(f"{args.shape}: hidden {hidden}, intermediate {inter}, vocab {vocab}; fp32, "
          f"{torch.get_num_threads()} threads; median ms per call")
    print("| rows | layer: nn.Linear | layer: oneDNN packed | speed-up | head: nn.Linear | head: oneDNN packed "
          "| speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            stock, fast, head_stock, head_fast = time_rows(rows, layer, packed, head, packed_head, args.repeats)
            print(f"| {rows} | {stock:.2f} | {fast:.2f} | {stock / fast:.1f}x | {head_stock:.1f} | {head_fast:.1f} "
                  f"| {head_stock / head_fast:.1f}x |")

if __name__ == "__main__":
    main()
