"""What a second rank buys a single stream: `python -m qwen_relay.bench.tensor_parallel`.

Two parts, both on the CPU, one torch thread per rank (each rank stands for a device):

- the collective alone: an all-reduce of [rows, hidden] fp32 between 2 processes, through the shared-memory
  buffer the ranks use (shards/allreduce.py) and through gloo (torch.distributed), median microseconds per call;
- one whole-model slice decoding one sequence, TP 1 (a `SliceRunner`) against TP N (a `GroupRunner`, rank 0 in
  this process), in alternating rounds so both see the same machine load: median ms per token of each round,
  their ratio, and what rank 0 spent in collectives per token (2 all-reduces a layer and the logits' gather).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qwen_relay.shards.allreduce import ShmCollectives, channel_path
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.group import GroupRunner
from qwen_relay.shards.runner import SliceRunner, SliceSpec

log = logging.getLogger(__name__)

BENCH_MODEL = Path.home() / ".cache/qwen-relay/bench/qwen2.5-0.5b-float32"
BLOCK = 16


def _reduce_rank(backend: str, rank: int, world: int, where: str, rows: int, hidden: int, calls: int,
                 out: mp.Queue) -> None:
    torch.set_num_threads(1)
    x = torch.randn(rows, hidden)
    if backend == "shm":
        comm = ShmCollectives(where, rank, world)
        reduce = comm.all_reduce
    else:
        dist.init_process_group("gloo", init_method=f"file://{where}", rank=rank, world_size=world)

        def reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        reduce(x)
        times.append(time.perf_counter() - start)
    if backend == "gloo":
        dist.destroy_process_group()
    if rank == 0:
        out.put(1e6 * statistics.median(times[calls // 10:]))


def time_all_reduce(backend: str, rows: int, hidden: int, world: int = 2, calls: int = 2000) -> float:
    """Median microseconds per all-reduce of [rows, hidden] fp32 between `world` processes."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        where = channel_path() if backend == "shm" else str(Path(tmp) / "rendezvous")
        if backend == "shm":
            creator = ShmCollectives(where, 0, world, create=True)
        out = ctx.Queue()
        procs = [ctx.Process(target=_reduce_rank, args=(backend, r, world, where, rows, hidden, calls, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = out.get(timeout=300)
        for p in procs:
            p.join()
        if backend == "shm":
            creator.unlink()
    return result


@dataclass(frozen=True)
class Round:
    wall_ms: float  # median per decode step
    cpu_ms: float  # median CPU time of this process's thread per step: rank 0's work, whatever the load
    comm_ms: float = 0.0  # mean per step in collectives (waiting for the peer included)
    calls: float = 0.0  # collectives per step


def decode(runner: SliceRunner | GroupRunner, prompt: int, tokens: int, comm: ShmCollectives | None = None) -> Round:
    """Decode steps of one sequence after a `prompt`-token prefill (the runner's torch thread is this one)."""
    tables = [list(range(-(-(prompt + tokens) // BLOCK)))]
    greedy = [SamplingParams()]
    runner.reset()
    out = runner.step(StepBatch([0], [0], [[7] * prompt], tables, greedy))
    seconds, count = (comm.seconds, comm.count) if comm else (0.0, 0)
    wall, cpu = [], []
    for n in range(tokens):
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = runner.step(StepBatch([0], [prompt + n], [out], tables, greedy))
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    ms = Round(1000 * statistics.median(wall), 1000 * statistics.median(cpu))
    if comm is None:
        return ms
    return dataclasses.replace(ms, comm_ms=1000 * (comm.seconds - seconds) / tokens,
                               calls=(comm.count - count) / tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.tensor_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BENCH_MODEL), help="checkpoint (default: the bench's 0.5B shape)")
    parser.add_argument("--tp", type=int, default=2, help="ranks of the tensor-parallel slice (default 2)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating TP 1 / TP N rounds")
    parser.add_argument("--skip-collectives", action="store_true", help="only the decode comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if not args.skip_collectives:
        print("| all-reduce, 2 processes, fp32 | shared memory (us) | gloo (us) |")
        print("|---|---:|---:|")
        for rows in (1, 16):
            shm, gloo = time_all_reduce("shm", rows, 896), time_all_reduce("gloo", rows, 896)
            print(f"| [{rows}, 896] | {shm:.1f} | {gloo:.1f} |")

    torch.set_num_threads(1)
    spec = SliceSpec(model=args.model, first=0, end=_layers(args.model), device="cpu", max_slots=1,
                     max_len=args.prompt + args.tokens, num_blocks=64, block_size=BLOCK, threads=1)
    whole = SliceRunner(spec)
    whole.warmup()
    group = GroupRunner(SliceSpec(**{**spec.__dict__, "tensor_parallel": args.tp}))
    group.warmup()
    rounds = []
    for _ in range(args.rounds):
        rounds.append((decode(whole, args.prompt, args.tokens),
                       decode(group, args.prompt, args.tokens, group.collectives)))
    group.close()
    print(f"\n{args.model}, decode of 1 sequence, 1 torch thread per rank, {args.rounds} alternating rounds "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"| round | TP 1 ms/token | TP {args.tp} ms/token | ratio | TP 1 CPU ms | TP {args.tp} rank-0 CPU ms | "
          f"CPU ratio | collectives ms/token (calls) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(rounds):
        print(f"| {i + 1} | {a.wall_ms:.1f} | {b.wall_ms:.1f} | {b.wall_ms / a.wall_ms:.2f} | {a.cpu_ms:.1f} | "
              f"{b.cpu_ms:.1f} | {b.cpu_ms / a.cpu_ms:.2f} | {b.comm_ms:.2f} ({b.calls:.0f}) |")
    wall = statistics.median(b.wall_ms / a.wall_ms for a, b in rounds)
    cpu = statistics.median(b.cpu_ms / a.cpu_ms for a, b in rounds)
    print(f"median ratios TP {args.tp} / TP 1: wall {wall:.2f}, CPU per rank {cpu:.2f}")
    return 0


def _layers(model: str) -> int:
    from qwen_relay.shards.loader import load_config

    return load_config(Path(model)).num_hidden_layers


if __name__ == "__main__":
    raise SystemExit(main())
