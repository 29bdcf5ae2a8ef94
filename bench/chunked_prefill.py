"""Chunked prefill: 8 streams decode, then a 1,500-token prompt arrives; prints the longest gap between two tokens
of a running stream over its median gap, and the long prompt's time to first token.

`python -m qwen_relay.bench.chunked_prefill --model CKPT --max-step-tokens N`: two in-process slices of the model
with serve's CPU policy (one step in flight, every core for the working slice)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

from transformers import AutoTokenizer

from qwen_relay.server.detokenizer import Detokenizer
from qwen_relay.server.engine import Engine, EngineConfig
from qwen_relay.server.layout import balanced_split, model_costs
from qwen_relay.server.pipeline import LocalPipeline
from qwen_relay.server.sequence import GenerationParams, Sequence
from qwen_relay.shards.loader import load_config
from qwen_relay.shards.runner import SliceSpec

STREAMS, STREAM_PROMPT, STREAM_NEW, LONG_PROMPT = 8, 32, 60, 1500


async def measure(model: str, budget: int) -> tuple[float, float]:
    """(worst stream's longest gap / its median gap, the long prompt's time to first token in s)."""
    tok = AutoTokenizer.from_pretrained(model)
    ranges = balanced_split(model_costs(load_config(model)), 2)
    specs = [SliceSpec(model=model, first=a, end=b, device="cpu", max_slots=16, max_len=2048,
                       threads=os.cpu_count() or 1) for a, b in ranges]
    pipe = LocalPipeline(specs, depth=1)
    eng = Engine(EngineConfig(max_batch=16, max_context=2048, eos_ids=frozenset(), max_step_tokens=budget))
    eng.start(pipe)
    rng = random.Random(0)

    def seq(name: str, n: int, new: int) -> Sequence:
        return Sequence(name, [rng.randrange(10, 1000) for _ in range(n)],
                        GenerationParams(max_new_tokens=new, ignore_eos=True), Detokenizer(tok, ()))
    arrivals: dict[str, list[float]] = {}

    async def run(s: Sequence) -> None:
        arrivals[s.request_id] = []
        async for d in eng.generate(s):
            if d.token_ids:
                arrivals[s.request_id].append(time.perf_counter())

    streams = [asyncio.create_task(run(seq(f"s{i}", STREAM_PROMPT, STREAM_NEW))) for i in range(STREAMS)]
    await asyncio.sleep(0)
    while min((len(v) for v in arrivals.values()), default=0) < 10:
        await asyncio.sleep(0.05)
    t_long = time.perf_counter()
    long = asyncio.create_task(run(seq("long", LONG_PROMPT, 4)))
    await asyncio.gather(*streams, long)
    worst = []
    for name, times in arrivals.items():
        if name == "long":
            continue
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        worst.append(max(gaps) / statistics.median(gaps))
    await eng.stop()
    await pipe.close()
    return max(worst), arrivals["long"][0] - t_long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.chunked_prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. the bench's cached 0.5B shape)")
    parser.add_argument("--max-step-tokens", type=int, default=512, help="the step token budget (serve's flag)")
    args = parser.parse_args(argv)
    gap, ttft = asyncio.run(measure(args.model, args.max_step_tokens))
    print(f"max-step-tokens {args.max_step_tokens}: longest gap / median gap of the worst stream {gap:.2f}; "
          f"the {LONG_PROMPT}-token prompt's first token after {ttft:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
