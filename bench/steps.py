"""What a decode step costs by batch size, and so what pipelining can win: `python -m qwen_relay.bench.steps`.

Pipelining N slices at concurrency c runs N micro-batches of c/N rows, each slice holding 1/N of the layers.
In steady state every slice is busy, so relay-N makes c tokens per C(c/N) / N x N = C(c/N) seconds against
relay-1's C(c): the most relay-2 can reach over relay-1 is C(c) / C(c/2), the cost of a step of c rows over one
of c/2. Where a step is bound by reading the weights (decode at small batches), C barely grows with the rows
and pipelining gains little; where it grows in proportion, relay-2 nears 2x.

This times one slice's decode step (a `SliceRunner`, the slices' own code and kernels) at several batch sizes
after a prefill of each row, median of `--steps` steps, and prints that bound for every c = 2b.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec


@dataclass(frozen=True)
class StepTime:
    ms: float  # median decode step after the warm-up steps
    first_s: float  # the first decode step (for a compiled step: its compile)


def time_decode(runner: SliceRunner, rows: int, steps: int, prompt: int = 32, warmup: int = 0) -> StepTime:
    """Decode steps of `rows` rows, each row after a `prompt`-token prefill, each step fed the last one's
    tokens (on a last slice) or fresh hidden states (on a later slice). Each row writes blocks of its own; what
    they hold is garbage once timed, and nothing reads it again."""
    hidden_size = runner.slice.config.hidden_size

    def hidden(width: int) -> torch.Tensor | None:
        return None if runner.slice.is_first else torch.randn(rows * width, 1, hidden_size)  # packed tokens

    slots, greedy = list(range(rows)), [SamplingParams()] * rows
    width = -(-(prompt + warmup + steps) // runner.cache.block_size)  # blocks per row: a run of its own
    blocks = [list(range(r * width, (r + 1) * width)) for r in slots]
    times = []
    runner.reset()  # open the cache: this timer is the gateway here
    with torch.inference_mode():
        out = runner.step(StepBatch(slots, [0] * rows, [[7 + r] * prompt for r in slots], blocks, greedy),
                          hidden(prompt))
        for n in range(warmup + steps):
            tokens = out if isinstance(out, list) else [1] * rows
            batch = StepBatch(slots, [prompt + n] * rows, [[t] for t in tokens], blocks, greedy)
            start = time.perf_counter()
            out = runner.step(batch, hidden(1))
            times.append(time.perf_counter() - start)
    return StepTime(ms=1000 * statistics.median(times[warmup:]), first_s=times[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. the bench's cached 0.5B shape)")
    parser.add_argument("--layers", default="0-11", help="the slice's layers, inclusive (default 0-11)")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="rows per step")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one slice, one device)")
    args = parser.parse_args(argv)
    first, last = map(int, args.layers.split("-"))
    batches = sorted(int(b) for b in args.batches.split(","))
    runner = SliceRunner(SliceSpec(model=args.model, first=first, end=last + 1, device="cpu",
                                   max_slots=max(batches), max_len=64 + args.steps, threads=args.threads))
    runner.warmup()
    cost = {b: time_decode(runner, b, args.steps).ms for b in batches}
    print(f"layers {args.layers}, {args.threads} thread(s): decode step ms by rows")
    print("| rows | ms/step | ms/row | relay-2 / relay-1 bound at c = 2 x rows |")
    print("|---:|---:|---:|---:|")
    for b in batches:
        bound = f"{cost[2 * b] / cost[b]:.2f}" if 2 * b in cost else ""
        print(f"| {b} | {cost[b]:.1f} | {cost[b] / b:.2f} | {bound} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
