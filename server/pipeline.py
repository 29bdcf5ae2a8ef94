"""One decoding step through every slice, in order (docs/design.md: Ray is the transport, not the engine).

`Pipeline` is what the engine drives. `LocalPipeline` runs the slices' `SliceRunner`s in this process, for
tests and for machines without Ray (this module does not import Ray); `RayPipeline` (server/ray_pipeline.py)
runs each in its own Ray actor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from qwen_relay.shards.allreduce import GroupBroken
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.group import GroupRunner
from qwen_relay.shards.kv_cache import CacheMismatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec
from qwen_relay.shards.stats import SliceStats


def _huge_page_tunables(current: str | None) -> str:
    """glibc's tunables with its allocator asking for transparent huge pages (`madvise`) for what it maps."""
    if current and "glibc.malloc.hugetlb" in current:
        return current  # the operator chose already
    return ":".join(filter(None, (current, "glibc.malloc.hugetlb=1")))


# The environment of every slice process (set at its start, when OpenMP and glibc read it):
# - Slices run one after another on the same cores, so OpenMP threads must not spin for long after a forward
#   (libgomp's default: 300000 spins) or they steal the next slice's cores; but a forward is ~200 back-to-back
#   parallel regions, and sleeping between them (OMP_WAIT_POLICY=PASSIVE) cost 25-35 ms per token on the 0.5B
#   shape. A short spin serves both (docs/benchmarks.md).
# - A decode step streams every weight from memory. In 4 KiB pages that is ~300,000 TLB misses a step at the
#   0.5B shape (each a two-level walk under a hypervisor); glibc >= 2.35 backs its large allocations with 2 MiB
#   transparent huge pages when asked (a no-op where THP is off or glibc older). Measured on 2 cores, bf16:
#   a compiled step 62 against 67-77 ms at one row, 68 against 75-84 at 16 (docs/benchmarks.md).
SLICE_ENV = {"GOMP_SPINCOUNT": "10000", "GLIBC_TUNABLES": _huge_page_tunables(os.environ.get("GLIBC_TUNABLES"))}

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


class AdapterNotServed(RuntimeError):
    """A step names an adapter the pipeline no longer serves (unloaded, or dropped by a recovery). Refused
    before any slice runs, so no cache changed: it is the request's problem, never a lost slice."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(f"adapter(s) {', '.join(map(repr, sorted(names)))} not loaded")
        self.names = frozenset(names)


LoadAll = Callable[[str, AdapterSource], Awaitable[list[dict]]]  # every slice loads it; raises SliceLost if one died
UnloadAll = Callable[[str], Awaitable[list[int]]]  # every slice drops it; returns the slices that failed to


class PipelineAdapters:
    """The adapters every slice must hold: one owner for both pipelines, which only say how to load or drop an
    adapter on all their slices (`LoadAll`, `UnloadAll`).

    A step may name only these (`stepping`); a load is all slices or none; an unload forgets the adapter before
    any slice is asked, so no step, admission or recovery takes it up again, and drops its weights only once the
    steps naming it are back; a recovery loads each again on every slice (`restore`) and drops one a slice
    cannot load, reporting it in the next `Recovery`. A slice missing an adapter listed here lost it (Ray
    restarted it): that is a lost slice, and only then."""

    def __init__(self) -> None:
        self.sources: dict[str, AdapterSource] = {}
        self._lost: dict[str, str] = {}  # dropped by a restore, reported by the next successful recovery
        self._stepping: dict[str, int] = {}  # adapter -> steps in flight naming it
        self._settled = asyncio.Event()  # set whenever such a step comes back

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    @contextmanager
    def stepping(self, batch: StepBatch) -> Iterator[None]:
        """Around one step: refuse it if it names an adapter not served (`AdapterNotServed`, before any slice
        sees it), and hold the adapters it names until it is back, so no unload drops weights under it."""
        names = {a for a in batch.adapters or () if a}
        unknown = names - self.sources.keys()
        if unknown:
            raise AdapterNotServed(unknown)
        for name in names:
            self._stepping[name] = self._stepping.get(name, 0) + 1
        try:
            yield
        finally:
            for name in names:
                self._stepping[name] -= 1
                if not self._stepping[name]:
                    del self._stepping[name]
            self._settled.set()

    async def load(self, name: str, source: AdapterSource, load_all: LoadAll, unload_all: UnloadAll) -> list[dict]:
        try:
            infos = await load_all(name, source)
        except BaseException:
            await unload_all(name)  # the slices that did load it drop it again
            raise
        self.sources[name] = source
        return infos

    async def unload(self, name: str, unload_all: UnloadAll) -> list[int]:
        self.sources.pop(name, None)  # first, and before any await: from here on no step may name it
        while name in self._stepping:  # steps that named it before: their slices still use its weights
            self._settled.clear()
            await self._settled.wait()
        return await unload_all(name)

    async def restore(self, load_all: LoadAll, unload_all: UnloadAll) -> None:
        """Every adapter again on every slice (a no-op where held). One a slice cannot load (its folder moved,
        or now holds other files) is unloaded everywhere; `SliceLost` (a slice died meanwhile) propagates."""
        for name, source in list(self.sources.items()):
            if self.sources.get(name) != source:
                continue  # unloaded (or unloaded and loaded again) since this restore began
            try:
                await load_all(name, source)
            except SliceLost:
                raise
            except Exception as e:  # noqa: BLE001 - reported in the Recovery, and the adapter dropped
                log.error("adapter %r cannot be restored on a restarted slice, unloading it: %s", name, e)
                self._lost[name] = str(e)
                await self.unload(name, unload_all)
                continue
            current = self.sources.get(name)
            if current is None:  # unloaded while this load ran: drop what it put back
                await unload_all(name)
            elif current != source:  # and loaded again from other files: those, not the ones this load put back
                await load_all(name, current)

    def recovered(self) -> Recovery:
        """What the recovery that just succeeded could not bring back (and earlier failed attempts dropped)."""
        recovery, self._lost = Recovery(dict(self._lost)), {}
        return recovery


class Pipeline(Protocol):
    """What the engine drives. `step` may be awaited up to `depth` times concurrently: the pipeline runs the
    batches through every slice in the order they were submitted (slice k sees batch A before batch B), so
    slice 1 can run A while slice 0 runs B, and each call returns its batch's token ids. When a slice is lost,
    every outstanding step raises `SliceLost`; `recover` is called only once they have all settled."""

    depth: int
    adapters: PipelineAdapters  # what steps may name; the engine admits requests against it

    async def step(self, batch: StepBatch) -> list[int]:
        """Raises `AdapterNotServed` before any slice runs if the batch names an adapter not in `adapters`
        (`PipelineAdapters.stepping`)."""
        ...

    async def recover(self) -> Recovery:
        """One attempt: every slice answers, restarted ones get their adapters back, every cache is cleared.
        Raises (`SliceLost`) while a slice is still down; the engine retries with backoff."""
        ...

    async def stats(self) -> list[SliceStats]: ...

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> list[dict]: ...

    async def unload_adapter(self, name: str) -> list[int]:
        """Forget the adapter (before its first await), then drop it from every slice; returns the slices that
        failed to drop it."""
        ...

    async def close(self) -> None: ...


class LocalPipeline:
    """All slices in this process, each stage on a thread of its own so the event loop keeps serving and,
    with several steps in flight, slice 0 runs the next batch while slice 1 runs this one. A single-thread
    executor per slice runs its forwards in submission order, which is the order `Pipeline` promises."""

    def __init__(self, specs: list[SliceSpec], depth: int = 0) -> None:
        """`depth`: steps in flight at once (0: one per slice). At 1, a step runs through every slice in one
        call on one thread, as one model would: no hand-off between threads, one OpenMP thread team."""
        self.specs = specs
        self.runners = [_runner(spec) for spec in specs]
        for runner in self.runners:
            runner.warmup()
            runner.reset()  # open the cache; a runner rebuilt later (a restarted slice) stays shut until recovery
        self.depth = min(depth or len(self.runners), len(self.runners))
        stages = len(specs) if self.depth > 1 else 1
        self._stages = [ThreadPoolExecutor(1, thread_name_prefix=f"slice-{i}") for i in range(stages)]
        self.adapters = PipelineAdapters()

    async def step(self, batch: StepBatch) -> list[int]:
        loop = asyncio.get_running_loop()
        out = None
        try:
            with self.adapters.stepping(batch):
                if len(self._stages) == 1:
                    return await loop.run_in_executor(self._stages[0], self._through, batch)
                for runner, stage in zip(self.runners, self._stages, strict=True):
                    out = await loop.run_in_executor(stage, runner.step, batch, out)
        except CacheMismatch as e:  # a runner was rebuilt (tests do that to stand in for a restarted actor)
            raise SliceLost(f"a slice lost its cache: {e}") from e
        except GroupBroken as e:  # a tensor-parallel rank died: the recovery forms the group again
            raise SliceLost(f"a tensor-parallel group broke: {e}") from e
        return out

    def _through(self, batch: StepBatch) -> list[int]:
        """The whole step on one thread (one step in flight: no hand-off between slice threads)."""
        out = None
        for runner in self.runners:
            out = runner.step(batch, out)
        return out

    def _stage_of(self, index: int) -> ThreadPoolExecutor:
        """The thread slice `index` runs on: its own, or the one thread every slice shares at depth 1."""
        return self._stages[index if len(self._stages) > 1 else 0]

    async def recover(self) -> Recovery:
        loop = asyncio.get_running_loop()
        for i, runner in enumerate(self.runners):
            if isinstance(runner, GroupRunner) and runner.broken:  # a tensor-parallel rank died
                log.warning("slice %d: forming its tensor-parallel group again", i)
                self.runners[i] = await loop.run_in_executor(self._stage_of(i), _formed, self.specs[i])
        await self.adapters.restore(self._load_all, self._unload_all)
        # Each reset on its slice's own thread, so after any step still running there: a dead loop cancels its
        # steps, but a forward already in a thread goes on, and its commit must not land after the reset.
        await asyncio.gather(*(loop.run_in_executor(self._stage_of(i), runner.reset)
                               for i, runner in enumerate(self.runners)))
        return self.adapters.recovered()

    async def stats(self) -> list[SliceStats]:
        return [r.stats() for r in self.runners]

    async def _load_all(self, name: str, source: AdapterSource) -> list[dict]:
        return await asyncio.to_thread(lambda: [r.load_adapter(name, source.path, source.fingerprint)
                                                for r in self.runners])

    async def _unload_all(self, name: str) -> list[int]:
        return await asyncio.to_thread(self._unload, name)

    def _unload(self, name: str) -> list[int]:
        failed = []
        for i, runner in enumerate(self.runners):
            try:
                runner.unload_adapter(name)
            except Exception as e:  # noqa: BLE001 - the next load under this name replaces the leftover
                log.warning("slice %d could not unload adapter %r: %s", i, name, e)
                failed.append(i)
        return failed

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> list[dict]:
        """Every slice takes its own layers' share of the adapter; all slices or none."""
        return await self.adapters.load(name, AdapterSource(path, fingerprint), self._load_all, self._unload_all)

    async def unload_adapter(self, name: str) -> list[int]:
        return await self.adapters.unload(name, self._unload_all)

    async def close(self) -> None:
        for stage in self._stages:
            stage.shutdown(wait=True, cancel_futures=True)
        for runner in self.runners:
            if isinstance(runner, GroupRunner):
                runner.close()
        self.runners = []


def _formed(spec: SliceSpec) -> GroupRunner:
    """A tensor-parallel group formed again and warmed up (its cache opens at the recovery's reset)."""
    runner = GroupRunner(spec)
    runner.warmup()
    return runner


def _runner(spec: SliceSpec) -> SliceRunner | GroupRunner:
    """A slice's runner: one rank, or a tensor-parallel group of them (shards/group.py)."""
    return GroupRunner(spec) if spec.tensor_parallel > 1 else SliceRunner(spec)
