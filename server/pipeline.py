"""One decoding step through every slice, in order (DESIGN.md: Ray is the transport, not the engine).

`Pipeline` is what the engine drives. `LocalPipeline` runs the slices' `SliceRunner`s in this process, for
tests and for machines without Ray (this module does not import Ray); `RayPipeline` (server/ray_pipeline.py)
runs each in its own Ray actor.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec
from qwen_relay.shards.stats import SliceStats

# The environment of every slice process. Slices run one after another on the same cores, so OpenMP threads
# must not spin for long after a forward (libgomp's default: 300000 spins) or they steal the next slice's
# cores; but a forward is ~200 back-to-back parallel regions, and sleeping between them (OMP_WAIT_POLICY=
# PASSIVE) cost 25-35 ms per token on the 0.5B shape. A short spin serves both (docs/benchmarks.md).
SLICE_ENV = {"GOMP_SPINCOUNT": "10000"}


class SliceLost(RuntimeError):
    """A slice died or restarted (its cache is gone): the step did not happen and must not be retried as is;
    the engine waits for the slice and rebuilds every cache by replay."""


class Pipeline(Protocol):
    """`step` may be called concurrently, up to `depth` calls outstanding (one per slice): every slice runs the
    batches in call order, so while slice 1 runs one batch slice 0 runs the next. `recover` only once every
    outstanding step has settled."""

    depth: int

    async def step(self, batch: StepBatch) -> list[int]: ...

    async def recover(self, timeout: float) -> bool: ...

    async def stats(self) -> list[SliceStats]: ...

    async def load_adapter(self, name: str, path: str) -> list[dict]: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def close(self) -> None: ...


class LocalPipeline:
    """All slices in this process, each forwarding on its own worker thread (torch releases the GIL), so the
    event loop keeps serving and concurrent steps overlap slice by slice. One thread per slice runs its
    calls first come, first served, and a step reaches slice i+1 only after slice i: the order holds."""

    def __init__(self, specs: list[SliceSpec]) -> None:
        self.runners = [SliceRunner(spec) for spec in specs]
        for runner in self.runners:
            runner.warmup()
        self.depth = len(self.runners)
        self.threads = [ThreadPoolExecutor(1, thread_name_prefix=f"slice-{i}") for i in range(self.depth)]

    async def step(self, batch: StepBatch) -> list[int]:
        loop = asyncio.get_running_loop()
        out = None
        for runner, thread in zip(self.runners, self.threads, strict=True):
            out = await loop.run_in_executor(thread, runner.step, batch, out if len(batch) else None)
        return out

    async def recover(self, timeout: float) -> bool:
        """In-process slices cannot die on their own; just forget the caches so they can be replayed."""
        for runner in self.runners:
            runner.reset()
        return True

    async def stats(self) -> list[SliceStats]:
        return [r.stats() for r in self.runners]

    async def load_adapter(self, name: str, path: str) -> list[dict]:
        """Every slice takes its own layers' share of the adapter; all slices or none."""
        try:
            return await asyncio.to_thread(lambda: [r.load_adapter(name, path) for r in self.runners])
        except Exception:
            await self.unload_adapter(name)
            raise

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(lambda: [r.unload_adapter(name) for r in self.runners])

    async def close(self) -> None:
        for thread in self.threads:
            thread.shutdown(wait=True)
        self.runners = []
