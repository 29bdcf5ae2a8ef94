"""Does the static decode step help, eager or compiled? `python -m qwen_relay.bench.decode_step`.

One whole-model slice (no Ray, no gateway), its decode steps timed side by side in one run, per model and
batch size: the dynamic path (`decode="dynamic"`), the static step run eagerly ("static") and compiled by
`torch.compile(fullgraph=True)` ("compiled": the prepacked oneDNN linears as opaque custom operators, inductor
fusing the rest; shards/packed.py), the eager ones on prepacked oneDNN weights too, "dynamic-dense" on stock
kernels; "static-folded" is the static step with the attention layout CUDA uses (shards/attention.py).
Each variant prefills `rows` sequences of `--prompt` tokens, runs a few warm-up decode steps (the first one
compiles: its time is reported), then times `--steps` steps; the figure is the median ms per step. One torch
thread by default, as a slice sharing a machine runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwen_relay.bench.relay import default_model
from qwen_relay.shards.attention import folded
from qwen_relay.shards.runner import SliceRunner, SliceSpec

from .steps import time_decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    decode: str
    prepack: bool
    folded: bool = False  # attention in the folded layout (shards/attention.py) instead of the device's choice


VARIANTS = [
    Variant("dynamic", "dynamic", True),
    Variant("static", "static", True),
    Variant("static-folded", "static", True, folded=True),
    Variant("dynamic-dense", "dynamic", False),
    Variant("compiled", "compiled", True),  # packed linears kept opaque (shards/packed.py, shards/runner.py)
]


@dataclass
class Result:
    model: str
    variant: str
    rows: int
    ms_per_step: float | None
    first_step_s: float | None  # the first decode step: the compile, for a compiled variant
    error: str = ""


def time_variant(model: str, num_layers: int, variant: Variant, rows_list: list[int], prompt: int, steps: int,
                 warmup: int, threads: int) -> list[Result]:
    torch._dynamo.reset()
    spec = SliceSpec(model=model, first=0, end=num_layers, device="cpu", max_slots=max(rows_list),
                     max_len=prompt + warmup + steps + 1, threads=threads, prepack=variant.prepack,
                     decode=variant.decode)
    runner = SliceRunner(spec)
    if variant.folded:
        runner.slice.attend = folded
    results = []
    for rows in rows_list:
        try:
            timed = time_decode(runner, rows, steps, prompt, warmup)
            results.append(Result(Path(model).name, variant.name, rows, timed.ms, timed.first_s))
        except Exception as e:  # a variant that cannot compile is a finding, not a crash of the bench
            log.warning("%s at %d rows failed: %s", variant.name, rows, e)
            results.append(Result(Path(model).name, variant.name, rows, None, None, f"{type(e).__name__}: {e}"[:200]))
    del runner
    gc.collect()
    return results


def render(results: list[Result]) -> str:
    lines = ["| model | variant | rows | ms / step | first step (s) | vs dynamic |", "|---|---|---:|---:|---:|---:|"]
    base = {(r.model, r.rows): r.ms_per_step for r in results if r.variant == "dynamic"}
    for r in results:
        if r.ms_per_step is None:
            lines.append(f"| {r.model} | {r.variant} | {r.rows} | failed | | {r.error} |")
            continue
        dynamic = base.get((r.model, r.rows))
        ratio = f"{r.ms_per_step / dynamic:.2f}x" if dynamic else ""
        lines.append(f"| {r.model} | {r.variant} | {r.rows} | {r.ms_per_step:.2f} | {r.first_step_s:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.decode_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "qwen2.5-0.5b"],
                        help="random-weight checkpoints to build (checkpoints/synthetic.py shapes)")
    parser.add_argument("--model", action="append", default=[], help="a checkpoint folder (instead of --shapes)")
    parser.add_argument("--model-cache", default="~/.cache/qwen-relay/bench")
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS],
                        choices=[v.name for v in VARIANTS])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row (the context decoded on)")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per variant and batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qwen_relay.shards.loader import load_config

    models = args.model or [default_model(s, "float32", "cpu", Path(args.model_cache).expanduser())
                            for s in args.shapes]
    results = []
    for model in models:
        layers = load_config(model).num_hidden_layers
        for variant in (v for v in VARIANTS if v.name in args.variants):
            results += time_variant(model, layers, variant, args.rows, args.prompt, args.steps, args.warmup,
                                    args.threads)
            print(render(results).splitlines()[-1], flush=True)
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), prompt {args.prompt}, median of {args.steps} "
          f"steps after {args.warmup} warm-up\n")
    print(render(results))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    from qwen_relay.bench.decode_step import main as _main

    raise SystemExit(_main())
