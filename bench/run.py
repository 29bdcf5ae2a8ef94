"""One bench run: bandwidth, then the baselines and every relay loaded at once and driven phase by phase, each
phase on every system in turn; the report rewritten after every phase."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from qwen_relay.shards.runner import peak_rss_bytes

from .baselines import HfProcess
from .measure import (
    copy_bandwidth,
    machine,
    reset_peak_rss,
    resolve_device_dtype,
    runtime_overhead,
    wait_until_quiet,
    weight_read_bytes,
)
from .relay_under_test import RelayUnderTest
from .report import write_report, write_tables
from .vllm_peer import VllmServer, vllm_version
from .workloads import BenchConfig, Phase, Workloads, make_workloads, plan, store, summary, token_pool

log = logging.getLogger(__name__)


class System(Protocol):
    """One system under test, as the phase loop drives it: a baseline (hf, vLLM) or a relay."""

    name: str
    header: dict[str, Any]

    async def run(self, phase: Phase) -> dict[str, Any]: ...

    async def snapshot(self) -> dict[str, Any]: ...


async def run_phases(cfg: BenchConfig, phases: Sequence[Phase], systems: Sequence[System], result: dict[str, Any],
                     extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Each phase on every system in turn, so slow drift in machine load hits all of them alike; before each
    system, the machine is let settle (`wait_until_quiet`), so no system is measured beside the last one's
    leftover work.

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
                if cfg.settle_s > 0:
                    await asyncio.to_thread(wait_until_quiet, f"{phase.describe()} on {system.name}",
                                            timeout=cfg.settle_s)
                store(result["systems"][system.name], phase, value := await system.run(phase))
                log.info("%s | %s: %s", phase.describe(), system.name, summary(phase, value))
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


async def start_vllm(cfg: BenchConfig) -> VllmServer | None:
    """vLLM's server, or None (said in one line) where `--vllm-python` is missing or has no vLLM."""
    try:
        version = await asyncio.to_thread(vllm_version, cfg.vllm_python)
    except RuntimeError as e:
        log.warning("vllm: skipped: %s", e)
        return None
    log.info("vllm %s: starting its server from %s", version, cfg.vllm_python)
    return await VllmServer.start(cfg, version)


async def run_systems(cfg: BenchConfig, work: Workloads, result: dict[str, Any]) -> None:
    """The baselines and every relay loaded at once, then `run_phases` over them; fills `result["systems"]`.

    Without Ray, where every slice of every relay lives in this process and only their sum can be measured,
    also `result["gateway_process"]`.
    """
    device = resolve_device_dtype(cfg.device, cfg.dtype)[0]
    if not cfg.use_ray:
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    baselines: list[HfProcess | VllmServer] = []
    relays: list[RelayUnderTest] = []

    def gateway() -> dict[str, Any]:
        if cfg.use_ray:
            return {}
        return {"gateway_process": {
            "relays": [r.name for r in relays], "peak_rss_bytes": peak_rss_bytes(),
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}}

    try:
        for name in cfg.baselines:
            if name == "vllm":
                if (peer := await start_vllm(cfg)) is not None:
                    baselines.append(peer)
                continue
            started = time.perf_counter()
            log.info("%s: loading in a subprocess", name)
            baselines.append(await asyncio.to_thread(HfProcess, cfg, name))
            log.info("%s: loaded in %.1f s", name, time.perf_counter() - started)
        for shards in cfg.shards:
            for tensor_parallel in cfg.tensor_parallel:
                relays.append(await RelayUnderTest.start(cfg, shards, tensor_parallel))
        await run_phases(cfg, plan(cfg, work), [*baselines, *relays], result, gateway)
    finally:
        for r in relays:
            await r.stop()
        for baseline in baselines:
            baseline.close()


def run_benchmark(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Bandwidth, then the baselines (hf in a subprocess, vLLM as a server) and every relay phase by phase; writes
    the report into `cfg.out`."""
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
            ray.init(num_cpus=max(os.cpu_count() or 1, sum(cfg.shards) * len(cfg.tensor_parallel)),
                     include_dashboard=False,
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
