"""The bench's configuration and its seeded workloads, cut into the phases every system runs in turn.

Every system sees the same requests (exact prompt token ids, fixed output lengths): the same config and token
pool always give the same ids, so a ratio between two systems compares them on identical work.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# `generate()` on stock kernels (the user's baseline) and on the slices' prepacked ones (shards/packed.py): the
# second shows what the relay's design is worth apart from kernel choice.
HF_BASELINES = ("hf", "hf-packed")
# vLLM's OpenAI server (its CPU build on a CPU), started from a Python the user names (--vllm-python): the peer.
BASELINES = (*HF_BASELINES, "vllm")
# What a run measures, in run order. chat and shared-prefix measure what a prefix cache is worth; they are long
# on a CPU (every turn re-prefills up to 1,104 tokens without one), so they run only when asked for.
WORKLOADS = ("single", "mixed", "uniform", "chat", "shared-prefix")
DEFAULT_WORKLOADS = ("single", "mixed", "uniform")


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run depends on; stored in bench.json so a result can be reproduced."""

    model: str
    out: str = "bench-out"
    shards: tuple[int, ...] = (1, 2)
    tensor_parallel: tuple[int, ...] = (1,)  # a relay for every (shards, tensor_parallel) pair
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    threads: int = 0  # torch threads of hf and of each relay (split between its CPU slices); 0: all cores
    # Each slice one thread and one Ray CPU, emulating one device per slice (the baselines keep `threads`).
    threads_per_slice: bool = False
    baselines: tuple[str, ...] = HF_BASELINES
    vllm_python: str = ""  # the Python whose environment has vLLM; "" skips the vllm baseline
    vllm_args: tuple[str, ...] = ()  # more arguments for vLLM's server (e.g. --no-enable-prefix-caching)
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    use_ray: bool = True
    prepack: bool = True  # the relay's CPU weights prepacked for oneDNN (hf always runs stock kernels)
    prefix_cache: bool = True  # the relay reuses cached prompt prefixes (serve's default)
    max_step_tokens: int = 512  # the relay's step token budget (serve's --max-step-tokens)
    decode_step: str = "auto"  # the relay's decode step (serve's --decode-step; shards/runner.py)
    settle_s: float = 10.0  # before each system's turn, wait up to this long for quiet cores (0: no wait)
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
    # chat: one conversation; turn 1 sends the system prompt + a user message, each later turn the last prompt +
    # the reply the server gave + a new user message (320 -> 1,104 prompt tokens); run cold, then again warm.
    chat_system: int = 256
    chat_turns: int = 8
    chat_user: int = 64
    chat_reply: int = 48
    # shared-prefix: users sending one system prompt + their own tokens, `shared_concurrency` at a time.
    shared_system: int = 1024
    shared_users: int = 16
    shared_user: int = 64
    shared_new: int = 8
    shared_concurrency: int = 1
    request_timeout: float = 3600.0

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def requests_at(self, concurrency: int) -> int:
        if concurrency >= max(self.concurrency):
            return self.mixed_requests
        return min(self.mixed_requests, max(self.min_requests, concurrency))

    def longest_sequence(self) -> int:
        """Prompt + new tokens of the longest request the chosen workloads send (the context they need)."""
        need = {"single": max(self.single_prompts, default=0) + self.single_new_tokens,
                "mixed": self.mixed_prompt[1] + self.mixed_new[1],
                "uniform": self.uniform_prompt + self.uniform_new,
                "chat": self.chat_system + self.chat_turns * (self.chat_user + self.chat_reply),
                "shared-prefix": self.shared_system + self.shared_user + self.shared_new}
        return max(need[w] for w in self.workloads)


QUICK = dict(single_prompts=(16, 128), single_new_tokens=8, single_repeats=1, mixed_requests=8,
             mixed_prompt=(16, 64), mixed_new=(8, 16), concurrency=(1, 4), min_requests=2, uniform_requests=4,
             uniform_prompt=16, uniform_new=16, uniform_concurrency=4, chat_system=32, chat_turns=3, chat_user=16,
             chat_reply=8, shared_system=128, shared_users=4, shared_user=16, shared_new=4)


@dataclass(frozen=True)
class Request:
    """One generation request with exact lengths: the prompt as token ids, a fixed number of new tokens."""

    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class Conversation:
    """A chat by token ids: what the client adds each turn; the replies are the server's own."""

    system: tuple[int, ...]
    users: tuple[tuple[int, ...], ...]
    reply: int  # new tokens per turn

    def turns(self) -> Iterator[tuple[int, ...]]:
        """What each turn appends to the history before the request: the first turn also the system prompt."""
        yield self.system + self.users[0]
        yield from self.users[1:]


@dataclass(frozen=True)
class Workloads:
    single: dict[int, Request]  # prompt length -> request
    mixed: list[Request]
    uniform: list[Request]
    chat: Conversation
    shared: list[Request]  # one system prompt, each user's own tokens after it


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
    rng = _rng(cfg.seed, "chat")
    chat = Conversation(system=_tokens(cfg.chat_system, pool, rng),
                        users=tuple(_tokens(cfg.chat_user, pool, rng) for _ in range(cfg.chat_turns)),
                        reply=cfg.chat_reply)
    rng = _rng(cfg.seed, "shared-prefix")
    system = _tokens(cfg.shared_system, pool, rng)
    shared = [Request(system + _tokens(cfg.shared_user, pool, rng), cfg.shared_new) for _ in range(cfg.shared_users)]
    return Workloads(single=single, mixed=mixed, uniform=uniform, chat=chat, shared=shared)


def _tokens(count: int, pool: Sequence[int], rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.choice(pool) for _ in range(count))


@dataclass(frozen=True)
class Phase:
    """One measurement every system runs in turn, so slow drift in machine load hits all of them alike."""

    section: str  # one of WORKLOADS
    key: str | None  # prompt length (single), concurrency (mixed), "cold" or "warm" (chat); else None
    requests: tuple[Request, ...]
    concurrency: int
    conversation: Conversation | None = None  # chat only

    def describe(self) -> str:
        if self.section == "single":
            return f"single stream, {self.key}-token prompt"
        if self.conversation is not None:
            return f"chat, {self.key} ({len(self.conversation.users)} turns)"
        return f"{self.section} c={self.concurrency} ({len(self.requests)} requests)"


def plan(cfg: BenchConfig, work: Workloads) -> list[Phase]:
    """The chosen workloads' phases in run order: single stream per prompt, the mixed sweep, the uniform
    workload, the chat cold then warm (the same conversation again), the shared prefix."""
    phases: list[Phase] = []
    if "single" in cfg.workloads:
        phases += [Phase("single", str(n), (r,), 1) for n, r in work.single.items()]
    if "mixed" in cfg.workloads:
        phases += [Phase("mixed", str(c), tuple(work.mixed[:cfg.requests_at(c)]), c) for c in cfg.concurrency]
    if "uniform" in cfg.workloads:
        phases.append(Phase("uniform", None, tuple(work.uniform), cfg.uniform_concurrency))
    if "chat" in cfg.workloads:
        phases += [Phase("chat", key, (), 1, work.chat) for key in ("cold", "warm")]
    if "shared-prefix" in cfg.workloads:
        phases.append(Phase("shared-prefix", None, tuple(work.shared), cfg.shared_concurrency))
    return phases


def store(result: dict[str, Any], phase: Phase, value: dict[str, Any]) -> None:
    if phase.key is None:
        result[phase.section] = value
    else:
        result.setdefault(phase.section, {})[phase.key] = value


def summary(phase: Phase, value: dict[str, Any]) -> str:
    """One log line for a phase's figures."""
    if phase.section == "chat":
        return "TTFT per turn " + ", ".join(f"{t / 1000:.2f}" for t in value["ttft_ms"]) + " s"
    if phase.section == "shared-prefix":
        return f"TTFT p50 {value['ttft_ms_p50']:.0f} ms, first user {value['ttft_ms_all'][0]:.0f} ms"
    if "tokens_per_s" in value:
        return f"{value['tokens_per_s']:.2f} tokens/s"
    return f"TTFT {value['ttft_ms']:.0f} ms, {value['ms_per_token_p50'] or 0:.1f} ms/token p50"
