"""What the bench measures apart from the systems' phases: single-stream statistics, the device and dtype,
the copy bandwidth and weight bytes behind the memory-bandwidth floor, a slice process's fixed memory, and the
machine itself."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from qwen_relay.server.pipeline import SLICE_ENV
from qwen_relay.shards.runner import peak_rss_bytes

from .loadgen import percentile
from .workloads import BenchConfig

log = logging.getLogger(__name__)

MIB = 2**20


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


QUIET_BUSY = 0.2  # a machine whose cores are busier than this over a window is still settling
QUIET_WINDOW_S = 0.1


def cpu_busy_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def wait_until_quiet(what: str, timeout: float, busy: float = QUIET_BUSY, window: float = QUIET_WINDOW_S,
                     read: Callable[[], tuple[int, int] | None] = cpu_busy_ticks) -> float:
    """Wait until the machine's cores are less than `busy` busy over one `window`, at most `timeout` seconds;
    returns the seconds waited. A system that has just finished may keep a core spinning after its last
    response (vLLM's CPU engine polls one for about a second), and the next system measured would share it.
    Says what it waited for when it gives up."""
    start = time.perf_counter()
    before = read()
    if before is None:
        return 0.0
    while True:
        time.sleep(window)
        after = read()
        spent = time.perf_counter() - start
        share = (after[0] - before[0]) / max(1, after[1] - before[1])
        if share < busy:
            return spent
        if spent >= timeout:
            log.warning("before %s: the cores were still %.0f%% busy after %.0f s; measuring anyway", what,
                        100 * share, spent)
            return spent
        before = after


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0), so a later reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    from qwen_relay.shards.dtypes import resolve_dtype

    dev = torch.device("cuda:0" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                       else "cpu")
    return dev, resolve_dtype(dtype, dev)


def sync_device(device: torch.device) -> None:
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
    sync_device(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync_device(device)
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
