"""One decoding step through every slice, in order (docs/design.md: Ray is the transport, not the engine).

`Pipeline` is what the engine drives. `LocalPipeline` runs the slices' `SliceRunner`s in this process, for
tests and for machines without Ray (this module does not import Ray); `RayPipeline` (server/ray_pipeline.py)
runs each in its own Ray actor.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from qwen_relay.shards.allreduce import GroupBroken
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.group import GroupRunner
from qwen_relay.shards.kv_cache import CacheMismatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec
from qwen_relay.shards.stats import SliceStats

# The environment of every slice process. Slices run one after another on the same cores, so OpenMP threads
# must not spin for long after a forward (libgomp's default: 300000 spins) or they steal the next slice's
# cores; but a forward is ~200 back-to-back parallel regions, and sleeping between them (OMP_WAIT_POLICY=
# PASSIVE) cost 25-35 ms per token on the 0.5B shape. A short spin serves both (docs/benchmarks.md).
SLICE_ENV = {"GOMP_SPINCOUNT": "10000"}

log = logging.getLogger(__name__)


class SliceLost(RuntimeError):
    """A slice died or restarted (its cache is gone): the step did not happen and must not be retried as is;
    the engine waits for the slice and rebuilds every cache by replay."""


@dataclass(frozen=True)
class AdapterSource:
    """Where a loaded adapter is read from, and the fingerprint of its files: a restarted slice loads it again
    from `path` only if the files there still have that fingerprint (the same adapter the others hold)."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class Recovery:
    """What `Pipeline.recover` could not bring back. Adapter name -> why: such an adapter is unloaded from every
    slice and forgotten, so the engine fails its requests instead of replaying them forever."""

    lost_adapters: dict[str, str] = field(default_factory=dict)


class Pipeline(Protocol):
    """What the engine drives. `step` may be awaited up to `depth` times concurrently: the pipeline runs the
    batches through every slice in the order they were submitted (slice k sees batch A before batch B), so
    slice 1 can run A while slice 0 runs B, and each call returns its batch's token ids. When a slice is lost,
    every outstanding step raises `SliceLost`; `recover` is called only once they have all settled."""

    depth: int

    async def step(self, batch: StepBatch) -> list[int]: ...

    async def recover(self) -> Recovery:
        """One attempt: every slice answers, restarted ones get their adapters back, every cache is cleared.
        Raises (`SliceLost`) while a slice is still down; the engine retries with backoff."""
        ...

    async def stats(self) -> list[SliceStats]: ...

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> list[dict]: ...

    async def unload_adapter(self, name: str) -> list[int]:
        """Forget the adapter, then drop it from every slice; returns the slices that failed to drop it."""
        ...

    async def close(self) -> None: ...


class LocalPipeline:
    """All slices in this process, each stage on a thread of its own so the event loop keeps serving and,
    with several steps in flight, slice 0 runs the next batch while slice 1 runs this one. A single-thread
    executor per slice runs its forwards in submission order, which is the order `Pipeline` promises."""

    def __init__(self, specs: list[SliceSpec]) -> None:
        self.specs = specs
        self.runners = [_runner(spec) for spec in specs]
        for runner in self.runners:
            runner.warmup()
            runner.reset()  # open the cache; a runner rebuilt later (a restarted slice) stays shut until recovery
        self.depth = len(self.runners)
        self._stages = [ThreadPoolExecutor(1, thread_name_prefix=f"slice-{i}") for i in range(len(specs))]
        self.adapters: dict[str, AdapterSource] = {}  # re-sent to every runner on recovery
        self._lost: dict[str, str] = {}  # adapters dropped by a recovery attempt, reported by the next success

    async def step(self, batch: StepBatch) -> list[int]:
        loop = asyncio.get_running_loop()
        out = None
        try:
            for runner, stage in zip(self.runners, self._stages, strict=True):
                out = await loop.run_in_executor(stage, runner.step, batch, out if len(batch) else None)
        except CacheMismatch as e:  # a runner was rebuilt (tests do that to stand in for a restarted actor)
            raise SliceLost(f"a slice lost its cache: {e}") from e
        except GroupBroken as e:  # a tensor-parallel rank died: the recovery forms the group again
            raise SliceLost(f"a tensor-parallel group broke: {e}") from e
        return out

    def _recover(self) -> Recovery:
        for i, runner in enumerate(self.runners):
            if isinstance(runner, GroupRunner) and runner.broken:
                log.warning("slice %d: forming its tensor-parallel group again", i)
                runner = self.runners[i] = GroupRunner(self.specs[i])
                runner.warmup()
        for name, source in list(self.adapters.items()):
            try:
                for runner in self.runners:
                    runner.load_adapter(name, source.path, source.fingerprint)  # a no-op where it is held
            except Exception as e:  # noqa: BLE001 - reported in the Recovery, and the adapter dropped
                log.error("adapter %r cannot be restored on a rebuilt slice, unloading it: %s", name, e)
                self._lost[name] = str(e)
                self._unload(name)
        for runner in self.runners:
            runner.reset()
        recovery, self._lost = Recovery(dict(self._lost)), {}
        return recovery

    async def recover(self) -> Recovery:
        return await asyncio.to_thread(self._recover)

    async def stats(self) -> list[SliceStats]:
        return [r.stats() for r in self.runners]

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> list[dict]:
        """Every slice takes its own layers' share of the adapter; all slices or none."""
        try:
            infos = await asyncio.to_thread(lambda: [r.load_adapter(name, path, fingerprint) for r in self.runners])
        except Exception:
            await self.unload_adapter(name)
            raise
        self.adapters[name] = AdapterSource(path, fingerprint)
        return infos

    def _unload(self, name: str) -> list[int]:
        self.adapters.pop(name, None)
        failed = []
        for i, runner in enumerate(self.runners):
            try:
                runner.unload_adapter(name)
            except Exception as e:  # noqa: BLE001 - the next load under this name replaces the leftover
                log.warning("slice %d could not unload adapter %r: %s", i, name, e)
                failed.append(i)
        return failed

    async def unload_adapter(self, name: str) -> list[int]:
        self.adapters.pop(name, None)  # forgotten before any runner is asked: a recovery never restores it
        return await asyncio.to_thread(self._unload, name)

    async def close(self) -> None:
        for stage in self._stages:
            stage.shutdown(wait=True, cancel_futures=True)
        for runner in self.runners:
            if isinstance(runner, GroupRunner):
                runner.close()
        self.runners = []


def _runner(spec: SliceSpec) -> SliceRunner | GroupRunner:
    """A slice's runner: one rank, or a tensor-parallel group of them (shards/group.py)."""
    return GroupRunner(spec) if spec.tensor_parallel > 1 else SliceRunner(spec)
