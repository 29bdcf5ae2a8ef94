"""Where a decode step's time goes: linear layers, attention, KV cache, norms, rotary, activation, sampler.

One `SliceRunner` (the slices' own code and kernels) runs a few decode steps under `torch.profiler`, each
module and function of interest labelled with `record_function`, and prints every label's share of the step.
The profiler adds a few microseconds to every op it records, so many small ops (norms, rotary) read larger
than they are: confirm a share by timing the step with that part changed before acting on it.

    python -m qwen_relay.bench.profile_step --model /tmp/qwen2.5-0.5b-bfloat16 --rows 1 --threads 1
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from qwen_relay.shards import model as model_module
from qwen_relay.shards import packed
from qwen_relay.shards import runner as runner_module
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.hub import model_dir
from qwen_relay.shards.loader import load_config
from qwen_relay.shards.runner import SliceRunner, SliceSpec

STEP = "step"


def module_label(module: nn.Module) -> str | None:
    name = type(module).__name__
    if type(module) is nn.Linear:  # a dense one; packed linears are labelled where they call oneDNN (`main`)
        return "linear"
    if "RMSNorm" in name:
        return "norm"
    if name in ("SiLU", "SiLUActivation"):
        return "activation"
    return "embedding" if isinstance(module, nn.Embedding) else None


def label_modules(root: nn.Module) -> None:
    """Each module `module_label` names runs inside a `record_function` of that name."""
    for module in root.modules():
        if (label := module_label(module)) is None:
            continue
        scopes: list[Any] = []
        module.register_forward_pre_hook(lambda _m, _a, name=label, s=scopes: s.append(
            record_function(name).__enter__()))
        module.register_forward_hook(lambda _m, _a, _o, s=scopes: s.pop().__exit__(None, None, None))


def labelled(fn: Callable, label: str) -> Callable:
    """`fn`, run inside a `record_function(label)`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return run


def label_function(owner: object, attr: str, label: str) -> None:
    """`owner.attr` runs inside a `record_function(label)` (frozen dataclasses included)."""
    object.__setattr__(owner, attr, labelled(getattr(owner, attr), label))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, default=0, help="layers 0..N-1 and the head (0: all)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--decode", default="auto", help="the runner's decode step (auto, dynamic, static)")
    args = parser.parse_args(argv)
    layers = args.layers or load_config(model_dir(args.model)).num_hidden_layers
    max_len = args.prompt + 2 * args.steps + 8
    spec = SliceSpec(model=args.model, first=0, end=layers, dtype=args.dtype, device="cpu",
                     max_slots=max(4, args.rows), max_len=max_len, num_blocks=max(4, args.rows) * (max_len // 16 + 2),
                     threads=args.threads, decode=args.decode)
    runner = SliceRunner(spec)
    runner.reset()  # as the gateway does at start-up: the cache accepts steps
    label_modules(runner.slice)
    label_function(runner.slice, "attend", "attention")
    label_function(runner.slice, "rotary_emb", "rotary")
    label_function(runner.slice.family, "apply_rotary", "rotary")
    label_function(runner.cache, "write", "kv cache")
    label_function(runner.cache, "gather", "kv cache")
    label_function(runner_module, "sample", "sampler")
    slots, sampling = list(range(args.rows)), [SamplingParams()] * args.rows
    per_row = -(-spec.max_len // spec.block_size)  # each row its own run of blocks
    blocks = [list(range(row * per_row, (row + 1) * per_row)) for row in slots]

    def batch(position: int, token_ids: list[list[int]]) -> StepBatch:
        used = -(-(position + len(token_ids[0])) // spec.block_size)
        return StepBatch(slots, [position] * args.rows, token_ids, [b[:used] for b in blocks], sampling)

    tokens = runner.step(batch(0, [[5] * args.prompt for _ in slots]))
    position = args.prompt

    def step() -> None:
        nonlocal tokens, position
        with record_function(STEP):
            tokens = runner.step(batch(position, [[t] for t in tokens]))
        position += 1

    step()  # warm: oneDNN builds its kernels for the shapes
    # Every packed linear (a module, a q/k/v or gate/up group called at once, a head block) calls `_forward`.
    # One-token attention on a CPU reads the block cache through the paged kernel (shards/paged_attention.py).
    with patch.object(packed, "_forward", labelled(packed._forward, "linear")), \
            patch.object(model_module, "paged_decode_attention",
                         labelled(model_module.paged_decode_attention, "attention")), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    total = totals[STEP]
    labels = sorted({module_label(m) for m in runner.slice.modules()} - {None}
                    | {"linear", "attention", "rotary", "kv cache", "sampler"}, key=lambda k: -totals.get(k, 0))
    print(f"{runner.dtype} decode step ({runner.decode_mode}), {args.rows} row(s), layers 0-{layers - 1} and the "
          f"head, {torch.get_num_threads()} thread(s): {total / args.steps / 1000:.1f} ms under the profiler")
    for key in labels:
        print(f"  {key:<11}{totals.get(key, 0) / total:6.1%}")
    print(f"  {'other':<11}{1 - sum(totals.get(k, 0) for k in labels) / total:6.1%}")


if __name__ == "__main__":
    main()
