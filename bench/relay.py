"""`qwen-relay bench`: the relay against plain `transformers` `generate()`, side by side in one run.

Both sides see the same checkpoint, the same seeded requests (exact prompt token ids, fixed output lengths)
and the same CPU threads, one after the other on the same machine, so every relay / hf ratio comes from
one run. The `hf` side runs in a subprocess so its peak resident memory is its own; the relay runs
in-process (gRPC server + engine, slices as Ray actors or, with `--no-ray`, in this process) and is driven
through the real asyncio client over loopback.

Figures (see docs/benchmarks.md):
- single stream: time to first token and per-token gaps (p50/p95) from token arrival times;
- aggregate output tokens/s for a mixed workload at several concurrencies (hf: static padded batches of the
  same size) and for a uniform workload; each request counts only its own requested tokens, so tokens a
  static batch generates past a request's length are waste, not output;
- peak resident memory of every slice process and of the hf process, against weights + KV cache + a
  measured fixed runtime overhead;
- the memory-bandwidth floor: bytes of weights read per decode step / measured copy bandwidth.
"""

# This module is the command line; the bench itself is in workloads.py (config, requests, phases), baselines.py
# (hf generate()), relay_under_test.py, measure.py, run.py (the phase loop) and report.py (tables, plots).

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from qwen_relay.shards.runner import DECODE_MODES

from .loadgen import parse_range
from .measure import resolve_device_dtype
from .run import run_benchmark
from .workloads import BASELINES, DEFAULT_WORKLOADS, HF_BASELINES, QUICK, WORKLOADS, BenchConfig

log = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Defaults, then `--quick`'s smaller workload, then any knob given explicitly on the command line."""
    values: dict[str, Any] = {}
    if args.quick:
        values.update(QUICK)
    knobs = {"single_prompts": _ints, "single_new_tokens": int, "single_repeats": int, "mixed_requests": int,
             "mixed_prompt": parse_range, "mixed_new": parse_range, "concurrency": _ints, "min_requests": int,
             "uniform_requests": int, "uniform_prompt": int, "uniform_new": int, "uniform_concurrency": int,
             "chat_system": int, "chat_turns": int, "chat_user": int, "chat_reply": int, "shared_system": int,
             "shared_users": int, "shared_user": int, "shared_new": int, "shared_concurrency": int}
    for key, parse in knobs.items():
        if getattr(args, key) is not None:
            values[key] = parse(getattr(args, key))
    shards = tuple(dict.fromkeys(_ints(args.shards)))  # each relay once
    tensor_parallel = tuple(dict.fromkeys(_ints(args.tensor_parallel)))
    if not tensor_parallel or min(tensor_parallel) < 1:
        raise SystemExit(f"--tensor-parallel: sizes of 1 or more, e.g. 1,2; got {args.tensor_parallel!r}")
    if args.baselines is None:  # hf-packed is generate() on oneDNN-prepacked CPU kernels: where they exist
        from qwen_relay.shards.packed import can_prepack

        args.baselines = ",".join(HF_BASELINES) if can_prepack(*resolve_device_dtype(args.device, args.dtype)) \
            else "hf"
    baselines = _names(args.baselines)
    if not set(baselines) <= set(BASELINES):
        raise SystemExit(f"--baselines: any of {', '.join(BASELINES)}; got {args.baselines!r}")
    workloads = _names(args.workloads)
    if not workloads or not set(workloads) <= set(WORKLOADS):
        raise SystemExit(f"--workloads: one or more of {', '.join(WORKLOADS)}; got {args.workloads!r}")
    cfg = BenchConfig(model=args.model, out=str(args.out), shards=shards, tensor_parallel=tensor_parallel,
                      device=args.device,
                      dtype=args.dtype, seed=args.seed, threads=args.threads, use_ray=not args.no_ray,
                      threads_per_slice=args.threads_per_slice, baselines=baselines, vllm_python=args.vllm_python,
                      vllm_args=tuple(args.vllm_arg), workloads=workloads, prepack=not args.no_prepack,
                      prefix_cache=not args.no_prefix_cache, max_step_tokens=args.max_step_tokens,
                      decode_step=args.decode_step, max_batch=args.max_batch, settle_s=args.settle, **values)
    # The context every system is given: 1,024 tokens, or what the longest request of the workloads needs.
    need = cfg.longest_sequence()
    if args.max_context is None:
        return dataclasses.replace(cfg, max_context=max(cfg.max_context, need))
    if args.max_context < need:
        raise SystemExit(f"--max-context {args.max_context}: the workloads chosen send up to {need} tokens")
    return dataclasses.replace(cfg, max_context=args.max_context)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list, each name once, in order."""
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def default_model(shape: str, dtype: str, device: str, cache: Path) -> str:
    """A random-weight checkpoint of `shape`, built once into `cache` (no model hub is reachable here)."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    dev, torch_dtype = resolve_device_dtype(device, dtype)
    # Build in the dtype that will be served on GPU (half the bytes to write); fp32 otherwise.
    build_dtype = torch_dtype if torch_dtype in (torch.bfloat16, torch.float16) else torch.float32
    folder = cache / f"{shape}-{str(build_dtype).removeprefix('torch.')}"
    if not (folder / "config.json").exists():
        log.info("building a random-weight %s checkpoint in %s", shape, folder)
        build_checkpoint(folder, shape, dtype=build_dtype)
    return str(folder)


def run_bench(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = default_model(args.shape, args.dtype, args.device, Path(args.model_cache).expanduser())
    cfg = config_from_args(args)
    # One INFO line per request from the front end would drown the progress lines.
    logging.getLogger("qwen_relay.server.frontend").setLevel(logging.WARNING)
    command = "qwen-relay " + shlex.join(sys.argv[1:])
    result = run_benchmark(cfg, command)
    print((Path(cfg.out) / "table.md").read_text())
    ran = set(cfg.workloads)
    plots = [name for name, show in (("throughput.png", ran & {"mixed", "uniform"}), ("latency.png", "single" in ran),
                                     ("chat.png", "chat" in ran), ("memory.png", True)) if show]
    print(f"wrote {cfg.out}/bench.json, table.md, {', '.join(plots)} in {result['meta']['duration_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m qwen_relay.bench.relay ...`: the bench alone, without the rest of the CLI's imports."""
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_bench(args)


def add_parser(subparsers: Any) -> None:
    """Register `bench`; its handler is `args.func(args)`."""
    p = subparsers.add_parser("bench", help="relay vs transformers generate(): latency, throughput, memory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_bench)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags, shared by the `qwen-relay bench` subcommand and `python -m qwen_relay.bench.relay`."""
    from qwen_relay.checkpoints.synthetic import SHAPES

    p.add_argument("--model", help="checkpoint folder or hub id (default: build a random-weight --shape)")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES), help="shape built when no --model")
    p.add_argument("--model-cache", default="~/.cache/qwen-relay/bench",
                   help="where the default checkpoint is built, once (reused by later runs)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, table.md and the plots")
    p.add_argument("--shards", default="1,2", help="relay slice counts to run, e.g. 1,2")
    p.add_argument("--tensor-parallel", default="1", metavar="N[,N...]",
                   help="ranks per slice (serve's --tensor-parallel) of the relays to run, e.g. 1,2: a relay for "
                   "every slice count and size, named relay-S (size 1) and relay-S-tpN; on GPUs rank r takes GPU r")
    p.add_argument("--quick", action="store_true", help="a short smoke run (small workloads)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--seed", type=int, default=0, help="seeds the workload's prompts and lengths")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the hf process and of each relay, split between its CPU slices as serve "
                        "splits cores (0: all cores)")
    p.add_argument("--threads-per-slice", action="store_true",
                   help="each relay slice one torch thread and one Ray CPU, emulating one device per slice; "
                   "reports relay-2 against relay-1 and hf-packed (the baselines keep --threads)")
    p.add_argument("--baselines", help="baselines: hf (generate() on stock kernels), hf-packed (generate() on the "
                   "slices' prepacked kernels; CPU fp32 only), vllm (vLLM's server, from --vllm-python); "
                   "default: hf,hf-packed on CPU in fp32, else hf")
    p.add_argument("--vllm-python", default="",
                   help="the Python of an environment with vLLM, for --baselines vllm (its CPU build on a CPU; "
                   "docs/benchmarks.md says how to build one); without it the vllm baseline is skipped")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for vLLM's server, e.g. --vllm-arg=--no-enable-prefix-caching (repeat it)")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"what to run, in this order: any of {', '.join(WORKLOADS)} (default "
                   f"{','.join(DEFAULT_WORKLOADS)}); chat and shared-prefix measure what a prefix cache is worth")
    p.add_argument("--no-ray", action="store_true", help="relay slices in this process (LocalPipeline)")
    p.add_argument("--no-prepack", action="store_true",
                   help="relay CPU weights dense, run by stock PyTorch kernels as hf's are (the ablation)")
    p.add_argument("--max-batch", type=int, default=16, help="relay sequences running at once")
    p.add_argument("--decode-step", default="auto", choices=DECODE_MODES,
                   help="the relay's decode step (serve's flag; a compiled step compiles at the relay's start)")
    p.add_argument("--settle", type=float, default=BenchConfig.settle_s, metavar="S",
                   help="before each system's turn in a phase, wait up to S seconds for the cores to go quiet: a "
                   "system that just finished may keep one busy (vLLM's CPU engine, about a second); 0: no wait")
    p.add_argument("--no-prefix-cache", action="store_true", help="the relay without its prefix cache (serve's flag)")
    p.add_argument("--max-step-tokens", type=int, default=512, help="the relay's step token budget (serve's flag)")
    p.add_argument("--max-context", type=int,
                   help="prompt + new tokens per sequence, of the relay and vLLM (default 1024, or what the "
                   "workloads' longest request needs)")
    w = p.add_argument_group("workload (defaults: the issue's; --quick shrinks them)")
    w.add_argument("--single-prompts", help="single-stream prompt lengths (default 16,512)")
    w.add_argument("--single-new-tokens", help="single-stream new tokens (default 32)")
    w.add_argument("--single-repeats", help="single-stream runs per prompt, after a warm-up (default 1)")
    w.add_argument("--mixed-requests", help="mixed workload size (default 32)")
    w.add_argument("--mixed-prompt", help="mixed prompt length range (default 16-256)")
    w.add_argument("--mixed-new", help="mixed max_new_tokens range (default 16-128)")
    w.add_argument("--concurrency", help="mixed concurrencies / hf batch sizes (default 1,4,16)")
    w.add_argument("--min-requests", help="below the top concurrency c, run the first max(this, c) mixed requests "
                   "(default 2; 32 runs all of them everywhere)")
    w.add_argument("--uniform-requests", help="uniform workload size (default 16)")
    w.add_argument("--uniform-prompt", help="uniform prompt length (default 64)")
    w.add_argument("--uniform-new", help="uniform new tokens (default 128)")
    w.add_argument("--uniform-concurrency", help="uniform concurrency / hf batch size (default 16)")
    w.add_argument("--chat-system", help="chat: system prompt tokens (default 256)")
    w.add_argument("--chat-turns", help="chat: turns (default 8)")
    w.add_argument("--chat-user", help="chat: new user tokens per turn (default 64)")
    w.add_argument("--chat-reply", help="chat: reply tokens per turn (default 48)")
    w.add_argument("--shared-system", help="shared-prefix: the system prompt all users share (default 1024)")
    w.add_argument("--shared-users", help="shared-prefix: users (default 16)")
    w.add_argument("--shared-user", help="shared-prefix: each user's own tokens after it (default 64)")
    w.add_argument("--shared-new", help="shared-prefix: new tokens per user (default 8)")
    w.add_argument("--shared-concurrency", help="shared-prefix: users at a time (default 1: one after another, "
                   "so each finds the prefix the first one left; hf: its static batch size)")


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so spawned children unpickle functions by name.
    from qwen_relay.bench.relay import main as _main

    sys.exit(_main())
