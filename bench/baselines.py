"""The baselines: `transformers` `generate()` on the whole model (`hf`, and `hf-packed` on the slices'
prepacked kernels), each in a spawned process of its own so its peak memory is its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from qwen_relay.server.pipeline import SLICE_ENV
from qwen_relay.shards.runner import peak_rss_bytes

from .loadgen import percentile
from .measure import resolve_device_dtype, single_stream_stats, sync_device
from .streaming import chat_stats
from .workloads import HF_BASELINES, BenchConfig, Conversation, Phase, Request, Workloads, plan, store, summary

log = logging.getLogger(__name__)


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
    sync_device(model.device)
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


def hf_chat(model: Any, conversation: Conversation, pad_id: int) -> dict[str, Any]:
    """The conversation as a chat client sends it (streaming.stream_chat), each turn a fresh `generate()`:
    nothing is kept between turns, so every turn prefills the whole history."""
    ttfts, prompts = [], []
    start = time.perf_counter()
    prompt: tuple[int, ...] = ()
    for user in conversation.turns():
        prompt = prompt + user
        clock = _TokenClock()
        began = time.perf_counter()
        out = hf_generate(model, [Request(prompt, conversation.reply)], pad_id, streamer=clock)
        ttfts.append((clock.times[0] - began) * 1000)
        prompts.append(len(prompt))
        prompt = prompt + tuple(out[0, len(prompt):].tolist())
    return chat_stats(ttfts, prompts, time.perf_counter() - start)


def hf_first_tokens(model: Any, requests: Sequence[Request], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Time to first token of each request, in static batches of `batch_size` one after another (a request's
    first token is its batch's)."""
    ttfts = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        clock = _TokenClock()
        began = time.perf_counter()
        hf_generate(model, batch, pad_id, streamer=clock)
        ttfts += [(clock.times[0] - began) * 1000] * len(batch)
    return {"concurrency": batch_size, "requests": len(requests), "wall_s": time.perf_counter() - start,
            "ttft_ms_p50": percentile(ttfts, 50), "ttft_ms_p95": percentile(ttfts, 95), "ttft_ms_all": ttfts}


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
        if phase.conversation is not None:
            return hf_chat(self.model, phase.conversation, self.pad_id)
        if phase.section == "shared-prefix":
            return hf_first_tokens(self.model, phase.requests, phase.concurrency, self.pad_id)
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
        log.info("%s %s: %s", runner.name, phase.describe(), summary(phase, value))
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
        if name not in HF_BASELINES:
            raise ValueError(f"unknown baseline {name!r}: one of {', '.join(HF_BASELINES)}")
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
