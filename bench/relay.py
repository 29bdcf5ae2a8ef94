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

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch

from qwen_relay.server.pipeline import SLICE_ENV
from qwen_relay.shards.runner import peak_rss_bytes

from .loadgen import parse_range, percentile

log = logging.getLogger(__name__)

MIB = 2**20
# Peak memory target: peak RSS <= MEMORY_FACTOR x (weights + KV cache + fixed runtime overhead).
MEMORY_FACTOR = 1.3
TARGETS = {"single_ms_per_token": 1.10, "mixed_tokens_per_s": 1.5, "uniform_tokens_per_s": 0.95}
# `generate()` on stock kernels (the user's baseline) and on the slices' prepacked ones (shards/packed.py): the
# second shows what the relay's design is worth apart from kernel choice.
BASELINES = ("hf", "hf-packed")
# Pipelining (--threads-per-slice): relay-2 against relay-1 and against hf-packed, each slice one thread.
PIPELINE_TARGETS = {"uniform_2_over_1": (">=", 1.7), "mixed_2_over_1": (">=", 1.6), "busy_fraction": (">=", 0.85),
                    "single_2_over_1": ("<=", 1.05), "slowest_over_mean": ("<=", 1.10),
                    "mixed_over_hf_packed": (">=", 1.5), "uniform_over_hf_packed": (">=", 1.0),
                    "single_over_hf_packed": ("<=", 1.05)}


# ------------------------------------------------------------------------------------------- configuration


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


# -------------------------------------------------------------------------------------------------- workload


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


# ---------------------------------------------------------------------------------------------- statistics


def single_stream_stats(runs: list[tuple[float, list[float]]], prompt_tokens: int) -> dict[str, Any]:
    """Summarise single-stream runs, each (start, arrival time of every new token).

    TTFT is first arrival - start; ms/token are the gaps between consecutive arrivals, pooled over runs
    (tokens that arrive in one chunk have a zero gap: that is what the caller sees); the mean is
    (last - first) / (n - 1) per run, averaged.
    """
    ttfts, gaps, means = [], [], []
    for start, times in runs:
        ttfts.append((times[0] - start) * 1000)
        gaps.extend((b - a) * 1000 for a, b in zip(times, times[1:], strict=False))
        if len(times) > 1:
            means.append((times[-1] - times[0]) * 1000 / (len(times) - 1))
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(runs[0][1]) if runs else 0,
        "runs": len(runs),
        "ttft_ms": percentile(ttfts, 50),
        "ttft_ms_all": ttfts,
        "ms_per_token_p50": percentile(gaps, 50),
        "ms_per_token_p95": percentile(gaps, 95),
        "ms_per_token_mean": sum(means) / len(means) if means else None,
    }


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0), so a later reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- device and bandwidth


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    from qwen_relay.shards.dtypes import resolve_dtype

    dev = torch.device("cuda:0" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                       else "cpu")
    return dev, resolve_dtype(dtype, dev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, threads: int, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes moved per second by a big tensor copy (read + write counted, as STREAM's copy does); best of N.

    Decode at small batch reads every weight once per token, so weight bytes / this is the floor.
    """
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 512 * MIB
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _copy_bandwidth(device, nbytes, repeats)
    finally:
        torch.set_num_threads(previous)


def _copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def weight_read_bytes(model: str, dtype: torch.dtype) -> tuple[int, int]:
    """(all weight bytes, bytes one decode step reads): an untied input embedding is read one row per token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    params = {id(p): p.numel() for p in meta.parameters()}  # tied weights counted once
    total = sum(params.values()) * itemsize
    embed = meta.get_input_embeddings().weight.numel() * itemsize
    return total, total if config.tie_word_embeddings else total - embed


# -------------------------------------------------------------------------------------------------- hf side


class _TokenClock:
    """A `generate()` streamer that only timestamps: the first `put` is the prompt, later ones new tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter()
        self.times.extend([now] * max(1, value.numel()))

    def end(self) -> None:
        pass


def _left_pad(batch: Sequence[Request], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[i, width - n:] = torch.tensor(r.prompt_token_ids)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model: Any, batch: Sequence[Request], pad_id: int, streamer: Any = None) -> torch.Tensor:
    """Greedy `generate()` of a static left-padded batch: every row runs to the batch's longest request.

    `min_new_tokens` = `max_new_tokens` keeps EOS from ending a row early, like the relay's `ignore_eos`.
    """
    ids, mask = _left_pad(batch, pad_id, model.device)
    n = max(r.max_new_tokens for r in batch)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad_id, streamer=streamer)
    _sync(model.device)
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens, expected {n}")
    return out


def hf_single(model: Any, request: Request, repeats: int, pad_id: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        clock = _TokenClock()
        start = time.perf_counter()
        hf_generate(model, [request], pad_id, streamer=clock)
        runs.append((start, clock.times))
    return single_stream_stats(runs, len(request.prompt_token_ids))


def hf_static_batches(model: Any, requests: Sequence[Request], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Consecutive requests in static batches of `batch_size`, one batch after another."""
    wall, generated, padded_prompt = 0.0, 0, 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        start = time.perf_counter()
        hf_generate(model, batch, pad_id)
        wall += time.perf_counter() - start
        generated += len(batch) * max(r.max_new_tokens for r in batch)
        padded_prompt += len(batch) * max(len(r.prompt_token_ids) for r in batch)
    output = sum(r.max_new_tokens for r in requests)
    return {"concurrency": batch_size, "requests": len(requests), "output_tokens": output,
            "generated_tokens": generated, "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "padded_prompt_tokens": padded_prompt, "wall_s": wall, "tokens_per_s": output / wall}


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


def prepack_model(model: Any) -> None:
    """Put a whole `transformers` model on the kernels the slices use: every linear layer and the LM head
    prepacked for oneDNN, as shards/loader.py packs a slice's (a tied head keeps the dense embedding)."""
    from torch import nn

    from qwen_relay.shards.packed import HEAD_BLOCK_ROWS, can_prepack, prepack_head, prepack_linear

    if not can_prepack(model.device, model.dtype):
        raise ValueError(f"hf-packed needs fp32 or bf16 on an x86-64 CPU with oneDNN, not {model.dtype} on "
                         f"{model.device}")
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            prepack_linear(model, name, module.weight.detach())
    prepack_head(model, model.lm_head.weight.detach().split(HEAD_BLOCK_ROWS))


class HfRunner:
    """`transformers` `generate()` on the whole model in this process: the baseline every ratio divides by.
    `packed`: the same on the slices' prepacked kernels (`hf-packed`)."""

    def __init__(self, cfg: BenchConfig, packed: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.name = "hf-packed" if packed else "hf"
        self.device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        torch.set_num_threads(cfg.num_threads)
        a = torch.ones(256, 256)
        (a @ a).sum().item()
        self.overhead = peak_rss_bytes()  # this process before any weight: its fixed runtime overhead
        start = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device.type == "cuda":
            kwargs["device_map"] = str(self.device)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs).eval()
        if packed:
            prepack_model(self.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        log.info("%s: loaded %s (%s, %s, %d threads) in %.1f s", self.name, cfg.model, self.device, self.dtype,
                 torch.get_num_threads(), time.perf_counter() - start)
        hf_generate(self.model, [Request(tuple(range(1, 9)), 2)], self.pad_id)  # warm-up: lazy initialisation

    def info(self) -> dict[str, Any]:
        return {"system": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "openmp_env": {k: os.environ.get(k) for k in SLICE_ENV}}

    def run(self, phase: Phase) -> dict[str, Any]:
        if phase.section == "single":
            return hf_single(self.model, phase.requests[0], self.cfg.single_repeats, self.pad_id)
        return hf_static_batches(self.model, phase.requests, phase.concurrency, self.pad_id)

    def memory(self) -> dict[str, Any]:
        params = {id(p): p.nbytes for p in self.model.parameters()}  # tied weights once; packed ones have no data_ptr
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {"peak_rss_bytes": peak_rss_bytes(), "weight_bytes": sum(params.values()),
                "overhead_bytes": self.overhead, "gpu_peak_bytes": gpu}


def run_hf(cfg: BenchConfig, work: Workloads, packed: bool = False) -> dict[str, Any]:
    """The whole hf side in this process, phase after phase (the bench runs it in `HfProcess` instead)."""
    runner = HfRunner(cfg, packed)
    result = runner.info()
    for phase in plan(cfg, work):
        store(result, phase, value := runner.run(phase))
        log.info("%s %s: %s", runner.name, phase.describe(), summary(value))
    result["memory"] = runner.memory()
    return result


_WORKER: HfRunner | None = None  # the HfRunner of an HfProcess, in that process


def _worker_init(cfg: BenchConfig, packed: bool, level: int) -> None:
    global _WORKER
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _WORKER = HfRunner(cfg, packed)


def _worker_call(method: str, *args: Any) -> Any:
    return getattr(_WORKER, method)(*args)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started inside the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class HfProcess:
    """An `HfRunner` in a fresh (spawned) process that lives through the whole run.

    Its own process, so its peak memory is its own and no CUDA state is shared; long-lived, so its phases
    can alternate with the relays'. Construction blocks until the model is loaded and warm.
    """

    def __init__(self, cfg: BenchConfig, name: str = "hf") -> None:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}: one of {', '.join(BASELINES)}")
        self.name = name
        with _environ(SLICE_ENV):  # hf's process waits as the slices' do
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_worker_init,
                                            initargs=(cfg, name == "hf-packed",
                                                      logging.getLogger().getEffectiveLevel()))
            self.header = self.pool.submit(_worker_call, "info").result()  # starts it inside the block

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self.pool.submit(_worker_call, method, *args))

    async def run(self, phase: Phase) -> dict[str, Any]:
        return await self.call("run", phase)

    async def snapshot(self) -> dict[str, Any]:
        """What the report needs besides phase figures: its memory so far."""
        return {"memory": await self.call("memory")}

    def close(self) -> None:
        self.pool.shutdown()


# ----------------------------------------------------------------------------------------------- relay side


async def relay_single(client: Any, request: Request, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        times: list[float] = []
        start = time.perf_counter()
        async for chunk in client.stream(prompt_token_ids=list(request.prompt_token_ids),
                                         max_new_tokens=request.max_new_tokens, ignore_eos=True):
            now = time.perf_counter()
            times.extend([now] * len(chunk.token_ids))
        if len(times) != request.max_new_tokens:
            raise RuntimeError(f"relay returned {len(times)} tokens, expected {request.max_new_tokens}")
        runs.append((start, times))
    return single_stream_stats(runs, len(request.prompt_token_ids))


async def relay_load(client: Any, requests: Sequence[Request], concurrency: int) -> dict[str, Any]:
    """All requests through the client with at most `concurrency` in flight; tokens/s over the whole wall time."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []

    async def one(request: Request) -> int:
        async with gate:
            start = time.perf_counter()
            count = 0
            async for chunk in client.stream(prompt_token_ids=list(request.prompt_token_ids),
                                             max_new_tokens=request.max_new_tokens, ignore_eos=True):
                if count == 0 and chunk.token_ids:
                    ttfts.append((time.perf_counter() - start) * 1000)
                count += len(chunk.token_ids)
            if count != request.max_new_tokens:
                raise RuntimeError(f"relay returned {count} tokens, expected {request.max_new_tokens}")
            return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - start
    output = sum(counts)
    return {"concurrency": concurrency, "requests": len(requests), "output_tokens": output,
            "generated_tokens": output, "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "wall_s": wall, "tokens_per_s": output / wall, "ttft_ms_p50": percentile(ttfts, 50),
            "ttft_ms_p95": percentile(ttfts, 95)}


def relay_options(cfg: BenchConfig, shards: int) -> Any:
    from qwen_relay.server.app import ServeOptions

    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    # CPU slices share the machine's cores as `serve` shares them by default (server/app.py): every slice all
    # the threads, one step in flight. --threads-per-slice: one thread each, a step per slice in flight.
    cpu = device.type == "cpu"
    threads = (1 if cfg.threads_per_slice else cfg.num_threads) if cpu else 0
    in_flight = 1 if cpu and not cfg.threads_per_slice else 0
    # A relay idles while the other systems run their phase; a compiled graph torn down meanwhile would be
    # rebuilt inside its next measured phase, so the bench keeps it.
    return ServeOptions(model=cfg.model, shards=shards, port=0, max_batch=cfg.max_batch,
                        max_context=cfg.max_context, use_ray=cfg.use_ray, device=device.type,
                        dtype=str(dtype).removeprefix("torch."), threads=threads, max_in_flight=in_flight,
                        cpus_per_slice=1.0,
                        prepack=cfg.prepack, grace_seconds=0, graph_idle_teardown=0)


class RelayUnderTest:
    """A relay with `shards` slices in this process, driven over loopback gRPC through `AsyncRelayClient`."""

    def __init__(self, cfg: BenchConfig, shards: int, relay: Any, client: Any, startup_s: float) -> None:
        self.cfg = cfg
        self.name = f"relay-{shards}"
        self.relay = relay
        self.client = client
        self.header = {"system": self.name, "shards": shards, "layout": relay.describe_layout(),
                       "startup_s": startup_s}

    @classmethod
    async def start(cls, cfg: BenchConfig, shards: int) -> RelayUnderTest:
        from qwen_relay.client.aio import AsyncRelayClient
        from qwen_relay.server.app import Relay

        start = time.perf_counter()
        relay = await Relay.start(relay_options(cfg, shards))
        try:
            client = AsyncRelayClient(f"127.0.0.1:{relay.port}", timeout=cfg.request_timeout)
            await relay_load(client, [Request(tuple(range(1, 9)), 2)], 1)  # warm-up through the whole path
        except BaseException:
            await relay.stop(grace=0)
            raise
        startup = time.perf_counter() - start
        log.info("relay-%d: up in %.1f s: %s", shards, startup, relay.describe_layout())
        return cls(cfg, shards, relay, client, startup)

    async def run(self, phase: Phase) -> dict[str, Any]:
        """The phase's figures, plus each slice's time in forwards during it (for the busy fraction)."""
        before = [s.forward_seconds for s in await self.relay.pipeline.stats()]
        if phase.section == "single":
            value = await relay_single(self.client, phase.requests[0], self.cfg.single_repeats)
        else:
            value = await relay_load(self.client, phase.requests, phase.concurrency)
        after = [s.forward_seconds for s in await self.relay.pipeline.stats()]
        value["slice_forward_s"] = [b - a for a, b in zip(before, after, strict=True)]
        return value

    async def snapshot(self) -> dict[str, Any]:
        return await self.slices()

    async def slices(self) -> dict[str, Any]:
        """Where the slices ran and their memory: peak RSS per slice process, weights, preallocated KV cache."""
        info = await self.client.model_info()
        stats = await self.relay.pipeline.stats()
        return {"dtype": info.dtype, "slices": [
            {"index": i, "layers": f"{s.first}-{s.end - 1}", "device": s.device,
             "has_embeddings": s.has_embeddings, "has_lm_head": s.has_lm_head,
             "weight_bytes": s.weight_bytes, "cache_bytes": s.cache_bytes,
             "peak_rss_bytes": s.peak_rss_bytes, "forward_seconds": s.forward_seconds, "steps": s.steps}
            for i, s in enumerate(stats)]}

    async def stop(self) -> None:
        await self.client.close()
        await self.relay.stop(grace=0)


class System(Protocol):
    """One system under test, as the phase loop drives it: an hf baseline or a relay."""

    name: str
    header: dict[str, Any]

    async def run(self, phase: Phase) -> dict[str, Any]: ...

    async def snapshot(self) -> dict[str, Any]: ...


async def run_phases(cfg: BenchConfig, phases: Sequence[Phase], systems: Sequence[System], result: dict[str, Any],
                     extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Each phase on every system in turn, so slow drift in machine load hits all of them alike.

    After every phase, bench.json and table.md are rewritten with everything finished so far (figures, each
    system's memory so far, `extra()`), and after a failure with the phase it failed in: a run cut short by a
    timeout or an error still leaves a table of the phases that finished.
    """
    result["systems"] = {s.name: dict(s.header) for s in systems}
    out = Path(cfg.out)
    for i, phase in enumerate(phases, 1):
        started = time.perf_counter()
        try:
            for system in systems:
                store(result["systems"][system.name], phase, value := await system.run(phase))
                log.info("%s | %s: %s", phase.describe(), system.name, summary(value))
            for system in systems:
                result["systems"][system.name].update(await system.snapshot())
            result.update(extra() if extra else {})
        except BaseException as e:
            result["meta"]["status"] = f"failed in phase {i} of {len(phases)} ({phase.describe()}): {e!r}"
            write_tables(result, out)
            raise
        result["meta"]["status"] = ("complete" if i == len(phases) else
                                    f"partial: {i} of {len(phases)} phases done; next: {phases[i].describe()}")
        write_tables(result, out)
        log.info("phase %d/%d done in %.1f s: %s", i, len(phases), time.perf_counter() - started, phase.describe())


async def run_systems(cfg: BenchConfig, work: Workloads, result: dict[str, Any]) -> None:
    """hf and every relay loaded at once, then `run_phases` over them; fills `result["systems"]`.

    Without Ray, where every slice of every relay lives in this process and only their sum can be measured,
    also `result["gateway_process"]`.
    """
    device = resolve_device_dtype(cfg.device, cfg.dtype)[0]
    if not cfg.use_ray:
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    baselines: list[HfProcess] = []
    relays: list[RelayUnderTest] = []

    def gateway() -> dict[str, Any]:
        if cfg.use_ray:
            return {}
        return {"gateway_process": {
            "relays": [r.name for r in relays], "peak_rss_bytes": peak_rss_bytes(),
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}}

    try:
        for name in cfg.baselines:
            started = time.perf_counter()
            log.info("%s: loading in a subprocess", name)
            baselines.append(await asyncio.to_thread(HfProcess, cfg, name))
            log.info("%s: loaded in %.1f s", name, time.perf_counter() - started)
        for shards in cfg.shards:
            relays.append(await RelayUnderTest.start(cfg, shards))
        await run_phases(cfg, plan(cfg, work), [*baselines, *relays], result, gateway)
    finally:
        for r in relays:
            await r.stop()
        for baseline in baselines:
            baseline.close()


def _overhead_probe(threads: int) -> int:
    """Peak RSS of a process that imports what a slice imports and runs a small matmul, but loads no model."""
    import qwen_relay.shards.runner  # noqa: F401 - the import cost is the point

    torch.set_num_threads(threads)
    a = torch.ones(256, 256)
    (a @ a).sum().item()
    return peak_rss_bytes()


def runtime_overhead(cfg: BenchConfig) -> int:
    """The fixed memory a slice process costs before any weight or cache: measured, so the table can state it.

    With Ray it is an actor like a slice actor (Ray worker + torch + transformers); without Ray a fresh process.
    """
    if cfg.use_ray:
        import ray

        probe = ray.remote(num_cpus=0, runtime_env={"env_vars": SLICE_ENV})(_overhead_probe)
        return int(ray.get(probe.remote(cfg.num_threads), timeout=300))
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_overhead_probe, cfg.num_threads).result()


# ---------------------------------------------------------------------------------------------- the report


def relay_names(result: dict[str, Any]) -> list[str]:
    return [n for n in result["systems"] if n not in BASELINES]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """relay / hf for every figure both sides have (so far), per system."""
    hf = result["systems"].get("hf", {})
    ratios: dict[str, Any] = {}
    for name, sysres in result["systems"].items():
        if name == "hf":
            continue
        r: dict[str, Any] = {"single": {}, "mixed": {}, "uniform": None}
        for length, s in sysres.get("single", {}).items():
            if (h := hf.get("single", {}).get(length)) is not None:
                r["single"][length] = {
                    "ttft": _ratio(s["ttft_ms"], h["ttft_ms"]),
                    "ms_per_token_p50": _ratio(s["ms_per_token_p50"], h["ms_per_token_p50"]),
                    "ms_per_token_p95": _ratio(s["ms_per_token_p95"], h["ms_per_token_p95"]),
                    "ms_per_token_mean": _ratio(s["ms_per_token_mean"], h["ms_per_token_mean"]),
                }
        for c, m in sysres.get("mixed", {}).items():
            if (h := hf.get("mixed", {}).get(c)) is not None:
                r["mixed"][c] = _ratio(m["tokens_per_s"], h["tokens_per_s"])
        if "uniform" in sysres and "uniform" in hf:
            r["uniform"] = _ratio(sysres["uniform"]["tokens_per_s"], hf["uniform"]["tokens_per_s"])
        ratios[name] = r
    return ratios


def memory_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per process: peak, what it must hold, and peak / (weights + cache + overhead)."""
    overhead = result["runtime_overhead_bytes"]
    rows = []
    for name in BASELINES:
        if "memory" in result["systems"].get(name, {}):
            hf = result["systems"][name]["memory"]
            rows.append({"process": name, "peak": hf["peak_rss_bytes"], "weights": hf["weight_bytes"], "cache": None,
                         "overhead": hf.get("overhead_bytes", overhead), "gpu_peak": hf.get("gpu_peak_bytes") or None})
    gateway = result.get("gateway_process")
    if gateway:  # --no-ray: every slice of every relay in this process
        names = gateway["relays"]
        slices = [s for n in names for s in result["systems"][n].get("slices", [])]
        rows.append({"process": f"gateway process (slices of {', '.join(names)})", "peak": gateway["peak_rss_bytes"],
                     "weights": sum(s["weight_bytes"] for s in slices),
                     "cache": sum(s["cache_bytes"] for s in slices), "overhead": overhead,
                     "gpu_peak": gateway.get("gpu_peak_bytes") or None})
        return _with_budget(rows)
    for name in relay_names(result):
        for s in result["systems"][name].get("slices", []):
            rows.append({"process": f"{name} slice {s['index']} (layers {s['layers']})", "peak": s["peak_rss_bytes"],
                         "weights": s["weight_bytes"], "cache": s["cache_bytes"], "overhead": overhead,
                         "gpu_peak": None})
    return _with_budget(rows)


def _with_budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["budget"] = (row["weights"] + (row["cache"] or 0) + row["overhead"])
        row["ratio"] = row["peak"] / row["budget"] if row["budget"] else None
    return rows


def target_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated for the largest relay that ran (2 slices by default)."""
    relays = relay_names(result)
    if not relays:
        return []
    name = max(relays, key=lambda n: result["systems"][n]["shards"])
    ratios = result["ratios"][name]
    cfg = result["config"]
    rows = []
    for length, r in ratios["single"].items():
        value = r["ms_per_token_p50"]
        rows.append({"target": f"{name} single-stream ms/token p50, {length}-token prompt", "value": value,
                     "goal": f"<= {TARGETS['single_ms_per_token']:.2f} x hf",
                     "met": value is not None and value <= TARGETS["single_ms_per_token"]})
    top = str(max(cfg["concurrency"]))
    value = ratios["mixed"].get(top)
    rows.append({"target": f"{name} mixed tokens/s at concurrency {top}", "value": value,
                 "goal": f">= {TARGETS['mixed_tokens_per_s']:.2f} x hf static batching",
                 "met": value is not None and value >= TARGETS["mixed_tokens_per_s"]})
    value = ratios["uniform"]
    rows.append({"target": f"{name} uniform tokens/s at concurrency {cfg['uniform_concurrency']}", "value": value,
                 "goal": f">= {TARGETS['uniform_tokens_per_s']:.2f} x hf batch {cfg['uniform_concurrency']}",
                 "met": value is not None and value >= TARGETS["uniform_tokens_per_s"]})
    for row in memory_rows(result):
        if row["process"].startswith(name + " "):
            rows.append({"target": f"{row['process']} peak memory", "value": row["ratio"],
                         "goal": f"<= {MEMORY_FACTOR} x (weights + KV cache + overhead)",
                         "met": row["ratio"] is not None and row["ratio"] <= MEMORY_FACTOR})
    return rows


def pipeline_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What pipelining is worth: the largest relay against relay-1 and hf-packed, its slices' busy fraction
    on the uniform workload (forward time summed over slices / (slices x wall)) and its slowest slice's
    forward time against the mean. Meant for `--threads-per-slice`, where each slice stands for one device."""
    systems, cfg = result["systems"], result["config"]
    relays = relay_names(result)
    if "relay-1" not in systems or len(relays) < 2:
        return []
    name = max(relays, key=lambda n: systems[n]["shards"])
    one, many, n = systems["relay-1"], systems[name], systems[name]["shards"]
    top, short, uc = str(max(cfg["concurrency"])), str(min(cfg["single_prompts"])), cfg["uniform_concurrency"]
    forward = many.get("uniform", {}).get("slice_forward_s") or []

    def mixed(sysres: dict[str, Any]) -> float | None:
        return sysres.get("mixed", {}).get(top, {}).get("tokens_per_s")

    def uniform(sysres: dict[str, Any]) -> float | None:
        return sysres.get("uniform", {}).get("tokens_per_s")

    def single(sysres: dict[str, Any]) -> float | None:
        return sysres.get("single", {}).get(short, {}).get("ms_per_token_mean")

    values = {
        "uniform_2_over_1": (f"{name} / relay-1 uniform tokens/s (c={uc})", _ratio(uniform(many), uniform(one))),
        "mixed_2_over_1": (f"{name} / relay-1 mixed tokens/s (c={top})", _ratio(mixed(many), mixed(one))),
        "busy_fraction": (f"{name} slice busy fraction, uniform workload",
                          _ratio(sum(forward), n * many["uniform"]["wall_s"]) if forward else None),
        "single_2_over_1": (f"{name} / relay-1 single-stream ms/token (mean, {short}-token prompt)",
                            _ratio(single(many), single(one))),
        "slowest_over_mean": (f"{name} slowest slice's forward time / mean, uniform workload",
                              _ratio(max(forward), sum(forward) / len(forward)) if forward else None),
    }
    packed = systems.get("hf-packed")
    if packed:
        values["mixed_over_hf_packed"] = (f"{name} / hf-packed mixed tokens/s (c={top})",
                                          _ratio(mixed(many), mixed(packed)))
        values["uniform_over_hf_packed"] = (f"{name} / hf-packed uniform tokens/s (c={uc})",
                                            _ratio(uniform(many), uniform(packed)))
        values["single_over_hf_packed"] = (f"{name} / hf-packed single-stream ms/token (mean, {short}-token prompt)",
                                           _ratio(single(many), single(packed)))
    rows = []
    for key, (label, value) in values.items():
        op, goal = PIPELINE_TARGETS[key]
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        rows.append({"key": key, "target": label, "value": value, "goal": f"{op} {goal:.2f}", "met": met})
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def render_table(result: dict[str, Any]) -> str:
    """The Markdown report: single stream, throughput, memory, bandwidth floor, targets. A partial result (a
    run cut short) gives the same tables with only the phases that finished, under a status line."""
    systems = result["systems"]
    ratios = result["ratios"]
    cfg = result["config"]
    meta = result["meta"]
    out = [f"Model `{meta['model_name']}` ({meta['parameters'] / 1e6:.0f}M parameters, {meta['dtype']}, "
           f"{meta['device']}), {cfg['num_threads']} torch threads per process; every ratio is relay / hf "
           "from this run.", ""]
    status = meta.get("status", "complete")
    if status != "complete":
        out += [f"**Not a complete run** ({status}): only the phases that finished are below.", ""]

    lengths = [str(n) for n in cfg["single_prompts"]]
    rows = [(length, name, sysres["single"][length]) for length in lengths for name, sysres in systems.items()
            if length in sysres.get("single", {})]
    if rows:
        out += ["**Single stream** (greedy, `ignore_eos`, "
                f"{cfg['single_new_tokens']} new tokens, {cfg['single_repeats']} runs; ms/token = gaps between "
                "token arrivals)", "",
                "| system | prompt tokens | TTFT ms | ms/token p50 | ms/token p95 | ms/token mean | TTFT ratio "
                "| p50 ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for length, name, s in rows:
        r = ratios.get(name, {}).get("single", {}).get(length, {})
        out.append(f"| {name} | {length} | {_f(s['ttft_ms'], 0)} | {_f(s['ms_per_token_p50'])} | "
                   f"{_f(s['ms_per_token_p95'])} | {_f(s['ms_per_token_mean'])} | {_f(r.get('ttft'), 2)} | "
                   f"{_f(r.get('ms_per_token_p50'), 2)} |")

    conc = [str(c) for c in cfg["concurrency"] if any(str(c) in s.get("mixed", {}) for s in systems.values())]
    if conc:
        requests = {c: next(s["mixed"][c]["requests"] for s in systems.values() if c in s.get("mixed", {}))
                    for c in conc}
        out += ["", f"**Mixed workload, aggregate output tokens/s** (prompts {cfg['mixed_prompt'][0]}-"
                f"{cfg['mixed_prompt'][1]}, new tokens {cfg['mixed_new'][0]}-{cfg['mixed_new'][1]}; hf: static "
                "left-padded batches of size c; counted: each request's own new tokens)", "",
                "| system | " + " | ".join(f"c={c} ({requests[c]} req)" for c in conc)
                + " | " + " | ".join(f"ratio c={c}" for c in conc) + " |",
                "|---|" + "---:|" * (2 * len(conc))]
        for name, sysres in systems.items():
            vals = " | ".join(_f(sysres.get("mixed", {}).get(c, {}).get("tokens_per_s"), 2) for c in conc)
            rats = " | ".join(_f(ratios.get(name, {}).get("mixed", {}).get(c), 2) for c in conc)
            out.append(f"| {name} | {vals} | {rats} |")
        hf_mixed = systems.get("hf", {}).get("mixed", {})
        waste = [f"c={c}: {hf_mixed[c]['generated_tokens'] - hf_mixed[c]['output_tokens']}"
                 for c in conc if c in hf_mixed]
        if waste:
            out += ["", f"hf tokens generated past a request's own length (waste, not counted): {', '.join(waste)}."]

    uc = cfg["uniform_concurrency"]
    if any("uniform" in s for s in systems.values()):
        out += ["", f"**Uniform workload** ({cfg['uniform_requests']} requests, {cfg['uniform_prompt']}-token "
                f"prompts, {cfg['uniform_new']} new tokens; relay concurrency {uc}, hf batch {uc})", "",
                "| system | tokens/s | wall s | ratio |", "|---|---:|---:|---:|"]
        for name, sysres in systems.items():
            u = sysres.get("uniform", {})
            out.append(f"| {name} | {_f(u.get('tokens_per_s'), 2)} | {_f(u.get('wall_s'))} | "
                       f"{_f(ratios.get(name, {}).get('uniform'), 2)} |")

    gpu = meta["device"].startswith("cuda")
    memory = memory_rows(result) if "runtime_overhead_bytes" in result else []
    if memory:
        out += ["", f"**Peak memory** (resident; fixed runtime overhead of a slice = "
                f"{_mib(result['runtime_overhead_bytes'])} MiB, measured as the peak of a "
                f"{'Ray actor' if cfg['use_ray'] else 'process'} that imports what a slice imports and loads no "
                "weights; hf's is its own process's peak before loading; "
                f"target: peak <= {MEMORY_FACTOR} x (weights + KV cache + overhead); KV cache is preallocated: "
                f"{cfg['max_batch']} slots x {cfg['max_context']} tokens)", "",
                "| process | peak MiB | weights MiB | KV cache MiB | overhead MiB | sum MiB | peak / sum |"
                + (" GPU peak MiB |" if gpu else ""), "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for row in memory:
        line = (f"| {row['process']} | {_mib(row['peak'])} | {_mib(row['weights'])} | {_mib(row['cache'])} | "
                f"{_mib(row['overhead'])} | {_mib(row['budget'])} | {_f(row['ratio'], 2)} |")
        out.append(line + (f" {_mib(row['gpu_peak'])} |" if gpu else ""))

    bw = result["bandwidth"]
    out += ["", f"**Memory-bandwidth floor**: copy bandwidth {bw['copy_gb_per_s']:.1f} GB/s (read + write), "
            f"{bw['read_bytes_per_token'] / 1e9:.2f} GB of weights read per decode step -> floor "
            f"{bw['floor_ms_per_token']:.1f} ms/token, ceiling {bw['ceiling_tokens_per_s']:.1f} tokens/s per "
            "stream (a batch of B shares one weight read: B x that).", ""]
    short = str(min(cfg["single_prompts"]))
    if systems:
        out += [f"| system | single-stream tokens/s ({short}-token prompt) | % of ceiling | "
                f"uniform tokens/s (c={uc}) | % of {uc} x ceiling |", "|---|---:|---:|---:|---:|"]
    for name, sysres in systems.items():
        mean = sysres.get("single", {}).get(short, {}).get("ms_per_token_mean")
        tps = 1000 / mean if mean else None
        uniform = sysres.get("uniform", {}).get("tokens_per_s")
        out.append(f"| {name} | {_f(tps, 2)} | {_f(100 * tps / bw['ceiling_tokens_per_s'] if tps else None, 0)} | "
                   f"{_f(uniform, 2)} | "
                   f"{_f(100 * uniform / (uc * bw['ceiling_tokens_per_s']) if uniform else None, 0)} |")

    rows = target_rows(result)
    if rows:
        out += ["", "**Targets**", "", "| target | value | goal | met |", "|---|---:|---|---|"]
        out += [f"| {r['target']} | {_f(r['value'], 2)} | {r['goal']} | {'yes' if r['met'] else 'NO'} |"
                for r in rows]
    rows = result.get("pipeline") or []
    if rows:
        mode = ("each slice one thread and one Ray CPU (`--threads-per-slice`); baselines "
                f"{cfg['num_threads']} threads" if cfg.get("threads_per_slice") else
                f"every slice {cfg['num_threads']} threads")
        out += ["", f"**Pipelining** ({mode})", "", "| figure | value | goal | met |", "|---|---:|---|---|"]
        out += [f"| {r['target']} | {_f(r['value'], 2)} | {r['goal']} | {'yes' if r['met'] else 'NO'} |"
                for r in rows]
    return "\n".join(out) + "\n"


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png (tokens/s by concurrency), latency.png (ms/token and TTFT), memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    cfg = result["config"]
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, sysres in systems.items():
        cs = sorted(int(c) for c in sysres["mixed"])
        ax1.plot(cs, [sysres["mixed"][str(c)]["tokens_per_s"] for c in cs], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(cfg["concurrency"], [str(c) for c in cfg["concurrency"]])
    ax1.set_xlabel("concurrency (hf: static batch size)")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("mixed workload")
    ax1.legend()
    names = list(systems)
    ax2.bar(names, [systems[n]["uniform"]["tokens_per_s"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax2.set_ylabel("output tokens/s")
    ax2.set_title(f"uniform workload, concurrency {cfg['uniform_concurrency']}")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = [str(n) for n in cfg["single_prompts"]]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(lengths))]
        p50 = [systems[name]["single"][n]["ms_per_token_p50"] or 0 for n in lengths]
        p95 = [systems[name]["single"][n]["ms_per_token_p95"] or 0 for n in lengths]
        ax1.bar(xs, p50, width, label=name, color=f"C{i}",
                yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]], capsize=3)
        ax2.bar(xs, [systems[name]["single"][n]["ttft_ms"] or 0 for n in lengths], width, label=name, color=f"C{i}")
    for ax, title in ((ax1, "ms per output token (p50, whisker p95)"), (ax2, "time to first token, ms")):
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(lengths))],
                      [f"{n}-token prompt" for n in lengths])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = memory_rows(result)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["peak"] / MIB for r in rows], 0.4, label="peak RSS")
    ax.bar([x + 0.4 for x in xs], [r["budget"] / MIB for r in rows], 0.4, label="weights + KV + overhead")
    ax.set_xticks([x + 0.2 for x in xs], [r["process"].replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_tables(result: dict[str, Any], out: Path) -> str:
    """bench.json and table.md into `out`, from a whole result or a partial one; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    result["ratios"] = compute_ratios(result)
    result["targets"] = target_rows(result)
    result["pipeline"] = pipeline_rows(result)
    table = render_table(result)
    _write_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(out / "table.md", table)
    return table


def _write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: a run killed while writing leaves the previous phase's file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(result: dict[str, Any], out: Path) -> str:
    """bench.json, table.md and the plots into `out` (a whole result); returns the table."""
    table = write_tables(result, out)
    write_plots(result, out)
    return table


# -------------------------------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = {"cpu": cpu, "nproc": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_benchmark(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Bandwidth, then hf (subprocess) and every relay phase by phase; writes the report into `cfg.out`."""
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model_config = AutoConfig.from_pretrained(cfg.model)
    work = make_workloads(cfg, token_pool(tokenizer, model_config.vocab_size))
    total_bytes, read_bytes = weight_read_bytes(cfg.model, dtype)
    bandwidth = copy_bandwidth(device, cfg.num_threads)
    log.info("copy bandwidth %.1f GB/s; %.2f GB of weights read per token", bandwidth / 1e9, read_bytes / 1e9)
    result: dict[str, Any] = {
        "meta": {"command": command, "machine": machine(), "model": cfg.model, "model_name": Path(cfg.model).name,
                 "parameters": total_bytes // torch.empty((), dtype=dtype).element_size(),
                 "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "config": {**dataclasses.asdict(cfg), "num_threads": cfg.num_threads},
        "bandwidth": {"copy_gb_per_s": bandwidth / 1e9, "weight_bytes": total_bytes,
                      "read_bytes_per_token": read_bytes, "floor_ms_per_token": read_bytes / bandwidth * 1000,
                      "ceiling_tokens_per_s": bandwidth / read_bytes},
        "systems": {},
    }
    started_ray = False
    if cfg.use_ray:
        import ray

        if not ray.is_initialized():
            # Every relay is up at once: one logical CPU per slice (each slice still uses all cores).
            ray.init(num_cpus=max(os.cpu_count() or 1, sum(cfg.shards)), include_dashboard=False,
                     log_to_driver=False)
            started_ray = True
    try:
        result["runtime_overhead_bytes"] = runtime_overhead(cfg)
        asyncio.run(run_systems(cfg, work, result))
    except BaseException as e:
        if "status" not in result["meta"]:  # failed before the first phase: say so where the table would be
            result["meta"]["status"] = f"failed before the first phase: {e!r}"
            write_tables(result, Path(cfg.out))
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        gc.collect()  # in-process slices (--no-ray) hold their weights until collected
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["meta"]["duration_s"] = time.perf_counter() - started
    write_report(result, Path(cfg.out))
    log.info("bench done in %.0f s; report in %s", result["meta"]["duration_s"], cfg.out)
    return result


# ------------------------------------------------------------------------------------------------------ CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Defaults, then `--quick`'s smaller workload, then any knob given explicitly on the command line."""
    values: dict[str, Any] = {}
    if args.quick:
        values.update(QUICK)
    knobs = {"single_prompts": _ints, "single_new_tokens": int, "single_repeats": int, "mixed_requests": int,
             "mixed_prompt": parse_range, "mixed_new": parse_range, "concurrency": _ints, "min_requests": int,
             "uniform_requests": int, "uniform_prompt": int, "uniform_new": int, "uniform_concurrency": int}
    for key, parse in knobs.items():
        if getattr(args, key) is not None:
            values[key] = parse(getattr(args, key))
    shards = tuple(dict.fromkeys(_ints(args.shards)))  # each relay once
    if args.baselines is None:  # hf-packed is generate() on oneDNN-prepacked CPU kernels: where they exist
        from qwen_relay.shards.packed import can_prepack

        args.baselines = ",".join(BASELINES) if can_prepack(*resolve_device_dtype(args.device, args.dtype)) else "hf"
    baselines = tuple(dict.fromkeys(b.strip() for b in args.baselines.split(",") if b.strip()))
    if not baselines or not set(baselines) <= set(BASELINES) or baselines[0] != "hf":
        raise SystemExit(f"--baselines: hf first, then any of {', '.join(BASELINES)}; got {args.baselines!r}")
    return BenchConfig(model=args.model, out=str(args.out), shards=shards, device=args.device,
                       dtype=args.dtype, seed=args.seed, threads=args.threads, use_ray=not args.no_ray,
                       threads_per_slice=args.threads_per_slice, baselines=baselines,
                       prepack=not args.no_prepack,
                       max_batch=args.max_batch, max_context=args.max_context, **values)


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
    # One INFO line per request from the servicer would drown the progress lines.
    logging.getLogger("qwen_relay.server.servicer").setLevel(logging.WARNING)
    command = "qwen-relay " + shlex.join(sys.argv[1:])
    result = run_benchmark(cfg, command)
    print((Path(cfg.out) / "table.md").read_text())
    print(f"wrote {cfg.out}/bench.json, table.md, throughput.png, latency.png, memory.png "
          f"in {result['meta']['duration_s']:.0f} s")
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
    p.add_argument("--baselines", help="generate() baselines: hf (stock kernels) and hf-packed (the slices' "
                   "prepacked kernels; CPU fp32 only); default: both on CPU in fp32, else hf")
    p.add_argument("--no-ray", action="store_true", help="relay slices in this process (LocalPipeline)")
    p.add_argument("--no-prepack", action="store_true",
                   help="relay CPU weights dense, run by stock PyTorch kernels as hf's are (the ablation)")
    p.add_argument("--max-batch", type=int, default=16, help="relay cache slots")
    p.add_argument("--max-context", type=int, default=1024, help="relay prompt + new tokens per sequence")
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


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so spawned children unpickle functions by name.
    from qwen_relay.bench.relay import main as _main

    sys.exit(_main())
