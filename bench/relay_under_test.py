"""The relay under test: a relay with N slices, each maybe a tensor-parallel group (slices as Ray actors or,
with `--no-ray`, in this process), driven over loopback gRPC through the real asyncio client, as a user's
program would."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .measure import resolve_device_dtype
from .streaming import run_phase, stream_load
from .workloads import BenchConfig, Phase, Request

log = logging.getLogger(__name__)


def relay_name(shards: int, tensor_parallel: int = 1) -> str:
    """relay-S for S slices, relay-S-tpN when each slice is a group of N ranks."""
    return f"relay-{shards}" + (f"-tp{tensor_parallel}" if tensor_parallel > 1 else "")


def relay_options(cfg: BenchConfig, shards: int, tensor_parallel: int = 1) -> Any:
    from qwen_relay.server.app import ServeOptions

    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    # CPU slices share the machine's cores as `serve` shares them by default (server/app.py): every slice all
    # the threads, one step in flight; a tensor-parallel slice's ranks run at once, so they split them.
    # --threads-per-slice: one thread each (each rank), a step per slice in flight.
    cpu = device.type == "cpu"
    threads = (1 if cfg.threads_per_slice else max(1, cfg.num_threads // tensor_parallel)) if cpu else 0
    in_flight = 1 if cpu and not cfg.threads_per_slice else 0
    # A relay idles while the other systems run their phase; a compiled graph torn down meanwhile would be
    # rebuilt inside its next measured phase, so the bench keeps it.
    return ServeOptions(model=cfg.model, shards=shards, tensor_parallel=tensor_parallel, port=0,
                        max_batch=cfg.max_batch,
                        max_context=cfg.max_context, use_ray=cfg.use_ray, device=device.type,
                        dtype=str(dtype).removeprefix("torch."), threads=threads, max_in_flight=in_flight,
                        cpus_per_slice=1.0,
                        prepack=cfg.prepack, prefix_cache=cfg.prefix_cache, max_step_tokens=cfg.max_step_tokens,
                        decode_step=cfg.decode_step,
                        grace_seconds=0, graph_idle_teardown=0)


class RelayUnderTest:
    """A relay with `shards` slices (each a group of `tensor_parallel` ranks) in this process, driven over
    loopback gRPC through `AsyncRelayClient`."""

    def __init__(self, cfg: BenchConfig, shards: int, relay: Any, client: Any, startup_s: float,
                 tensor_parallel: int = 1) -> None:
        self.cfg = cfg
        self.name = relay_name(shards, tensor_parallel)
        self.relay = relay
        self.client = client
        self.header = {"system": self.name, "shards": shards, "tensor_parallel": tensor_parallel,
                       "layout": relay.describe_layout(), "startup_s": startup_s}

    @classmethod
    async def start(cls, cfg: BenchConfig, shards: int, tensor_parallel: int = 1) -> RelayUnderTest:
        from qwen_relay.client.aio import AsyncRelayClient
        from qwen_relay.server.app import Relay

        start = time.perf_counter()
        relay = await Relay.start(relay_options(cfg, shards, tensor_parallel))
        try:
            client = AsyncRelayClient(f"127.0.0.1:{relay.port}", timeout=cfg.request_timeout)
            await stream_load(lambda r: _stream(client, r), [Request(tuple(range(1, 9)), 2)], 1)  # warm-up
        except BaseException:
            await relay.stop(grace=0)
            raise
        startup = time.perf_counter() - start
        log.info("%s: up in %.1f s: %s", relay_name(shards, tensor_parallel), startup, relay.describe_layout())
        return cls(cfg, shards, relay, client, startup, tensor_parallel)

    async def run(self, phase: Phase) -> dict[str, Any]:
        """The phase's figures, plus each slice's time in forwards during it (for the busy fraction) and the steps
        the first slice took (every step passes through it)."""
        before = await self.relay.pipeline.stats()
        value = await run_phase(lambda r: _stream(self.client, r), phase, self.cfg.single_repeats)
        after = await self.relay.pipeline.stats()
        value["slice_forward_s"] = [b.forward_seconds - a.forward_seconds for a, b in zip(before, after, strict=True)]
        value["engine_steps"] = after[0].steps - before[0].steps
        return value

    async def snapshot(self) -> dict[str, Any]:
        return await self.slices()

    async def slices(self) -> dict[str, Any]:
        """Where the slices ran and their memory: peak RSS per slice process, weights, the KV block pool."""
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


async def _stream(client: Any, request: Request) -> AsyncIterator[Sequence[int]]:
    """The request over gRPC, greedy with `ignore_eos`: each chunk's new token ids (a `TokenStream`)."""
    async for chunk in client.stream(prompt_token_ids=list(request.prompt_token_ids),
                                     max_new_tokens=request.max_new_tokens, ignore_eos=True):
        yield chunk.token_ids
