"""One decoding step through every slice, in order (docs/design.md: Ray is the transport, not the engine).

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
    """What the engine drives. `step` may be awaited up to `depth` times concurrently: the pipeline runs the
    batches through every slice in the order they were submitted (slice k sees batch A before batch B), so
    slice 1 can run A while slice 0 runs B, and each call returns its batch's token ids. When a slice is lost,
    every outstanding step raises `SliceLost`; `recover` is called only once they have all settled."""

    depth: int

    async def step(self, batch: StepBatch) -> list[int]: ...

    async def recover(self, timeout: float) -> bool: ...

    async def stats(self) -> list[SliceStats]: ...

    async def load_adapter(self, name: str, path: str) -> list[dict]: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def close(self) -> None: ...


class LocalPipeline:
    """All slices in this process, each stage on a thread of its own so the event loop keeps serving and,
    with several steps in flight, slice 0 runs the next batch while slice 1 runs this one. A single-thread
    executor per slice runs its forwards in submission order, which is the order `Pipeline` promises."""

    def __init__(self, specs: list[SliceSpec]) -> None:
        self.runners = [SliceRunner(spec) for spec in specs]
        for runner in self.runners:
            runner.warmup()
        self.depth = len(self.runners)
        self._stages = [ThreadPoolExecutor(1, thread_name_prefix=f"slice-{i}") for i in range(len(specs))]

    async def step(self, batch: StepBatch) -> list[int]:
        loop = asyncio.get_running_loop()
        out = None
        for runner, stage in zip(self.runners, self._stages, strict=True):
            out = await loop.run_in_executor(stage, runner.step, batch, out if len(batch) else None)
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
        for stage in self._stages:
            stage.shutdown(wait=True, cancel_futures=True)
        self.runners = []
