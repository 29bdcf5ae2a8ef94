"""The bench's configuration and its seeded workloads, cut into the phases every system runs in turn.

Every system sees the same requests (exact prompt token ids, fixed output lengths): the same config and token
pool always give the same ids, so a ratio between two systems compares them on identical work.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# `generate()` on stock kernels (the user's baseline) and on the slices' prepacked ones (shards/packed.py): the
# second shows what the relay's design is worth apart from kernel choice.
BASELINES = ("hf", "hf-packed")


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run depends on; stored in bench.json so a result can be reproduced."""

    model: str
    out: str = "bench-out"
    shards: tuple[int, ...] = (1, 2)
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    threads: int = 0  # torch threads of hf and of each relay (split between its CPU slices); 0: all cores
    # Each slice one thread and one Ray CPU, emulating one device per slice (the baselines keep `threads`).
    threads_per_slice: bool = False
    baselines: tuple[str, ...] = BASELINES
    use_ray: bool = True
    prepack: bool = True  # the relay's CPU weights prepacked for oneDNN (hf always runs stock kernels)
    max_batch: int = 16
    max_context: int = 1024
    single_prompts: tuple[int, ...] = (16, 512)
    single_new_tokens: int = 32
    single_repeats: int = 1
    mixed_requests: int = 32
    mixed_prompt: tuple[int, int] = (16, 256)
    mixed_new: tuple[int, int] = (16, 128)
    concurrency: tuple[int, ...] = (1, 4, 16)
    # The highest concurrency runs all mixed_requests; a lower one, c, runs the first max(min_requests, c) of
    # them (one request per slot), to keep the default run short. --min-requests 32: all 32 at every c.
    min_requests: int = 2
    uniform_requests: int = 16
    uniform_prompt: int = 64
    uniform_new: int = 128
    uniform_concurrency: int = 16
    request_timeout: float = 3600.0

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def requests_at(self, concurrency: int) -> int:
        if concurrency >= max(self.concurrency):
            return self.mixed_requests
        return min(self.mixed_requests, max(self.min_requests, concurrency))


QUICK = dict(single_prompts=(16, 128), single_new_tokens=8, single_repeats=1, mixed_requests=8,
             mixed_prompt=(16, 64), mixed_new=(8, 16), concurrency=(1, 4), min_requests=2, uniform_requests=4,
             uniform_prompt=16, uniform_new=16, uniform_concurrency=4)


@dataclass(frozen=True)
class Request:
    """One generation request with exact lengths: the prompt as token ids, a fixed number of new tokens."""

    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class Workloads:
    single: dict[int, Request]  # prompt length -> request
    mixed: list[Request]
    uniform: list[Request]


def token_pool(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ids a prompt may use: the tokenizer's ordinary tokens (no special tokens), inside the model's vocab."""
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in range(min(len(tokenizer), vocab_size)) if i not in special and i not in added]


def _rng(seed: int, name: str) -> random.Random:
    # A str seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED.
    return random.Random(f"{seed}/{name}")


def make_requests(count: int, prompt: tuple[int, int], new: tuple[int, int], pool: Sequence[int],
                  rng: random.Random) -> list[Request]:
    """`count` requests with prompt lengths and new-token counts drawn uniformly from the inclusive ranges."""
    out = []
    for _ in range(count):
        length = rng.randint(*prompt)
        out.append(Request(tuple(rng.choice(pool) for _ in range(length)), rng.randint(*new)))
    return out


def make_workloads(cfg: BenchConfig, pool: Sequence[int]) -> Workloads:
    """The seeded workloads; the same config and pool always give the same token ids."""
    single = {n: make_requests(1, (n, n), (cfg.single_new_tokens,) * 2, pool, _rng(cfg.seed, f"single{n}"))[0]
              for n in cfg.single_prompts}
    mixed = make_requests(cfg.mixed_requests, cfg.mixed_prompt, cfg.mixed_new, pool, _rng(cfg.seed, "mixed"))
    uniform = make_requests(cfg.uniform_requests, (cfg.uniform_prompt,) * 2, (cfg.uniform_new,) * 2, pool,
                            _rng(cfg.seed, "uniform"))
    return Workloads(single=single, mixed=mixed, uniform=uniform)


@dataclass(frozen=True)
class Phase:
    """One measurement every system runs in turn, so slow drift in machine load hits all of them alike."""

    section: str  # "single", "mixed" or "uniform"
    key: str | None  # prompt length (single) or concurrency (mixed); None for uniform
    requests: tuple[Request, ...]
    concurrency: int

    def describe(self) -> str:
        if self.section == "single":
            return f"single stream, {self.key}-token prompt"
        return f"{self.section} c={self.concurrency} ({len(self.requests)} requests)"


def plan(cfg: BenchConfig, work: Workloads) -> list[Phase]:
    """The phases in run order: single stream per prompt, the mixed sweep, the uniform workload."""
    phases = [Phase("single", str(n), (r,), 1) for n, r in work.single.items()]
    phases += [Phase("mixed", str(c), tuple(work.mixed[:cfg.requests_at(c)]), c) for c in cfg.concurrency]
    phases.append(Phase("uniform", None, tuple(work.uniform), cfg.uniform_concurrency))
    return phases


def store(result: dict[str, Any], phase: Phase, value: dict[str, Any]) -> None:
    if phase.key is None:
        result[phase.section] = value
    else:
        result.setdefault(phase.section, {})[phase.key] = value


def summary(value: dict[str, Any]) -> str:
    if "tokens_per_s" in value:
        return f"{value['tokens_per_s']:.2f} tokens/s"
    return f"TTFT {value['ttft_ms']:.0f} ms, {value['ms_per_token_p50'] or 0:.1f} ms/token p50"
