"""`RayPipeline`: one Ray actor per slice, stepped through a compiled graph (or chained actor calls).

Hidden states go slice to slice without passing through the gateway and only the last slice's token ids come
back (server/transport.py). Up to `depth` (= the number of slices) steps may be in flight at once, so while
slice 1 runs one batch slice 0 runs the next. Kept apart from server/pipeline.py so that a machine without Ray
can still serve with in-process slices (`--no-ray`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen_relay.ray_common.placement import PlacementError, describe_resources, wait_placed
from qwen_relay.shards.actor import SliceActor
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.runner import SliceSpec
from qwen_relay.shards.stats import SliceStats

from .pipeline import SLICE_ENV, AdapterSource, PipelineAdapters, Recovery, SliceLost
from .placement import slice_bundle
from .transport import SLICE_DIED, Transport, build_transport

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
# A transport that polls when idle (a compiled graph) is torn down after this long without a step; the next
# step builds it again (docs/design.md, "Hops"). 0 keeps it.
IDLE_TEARDOWN_S = 10.0


def _cause(error: BaseException) -> BaseException:
    """The slice's own exception inside Ray's wrapper (whose text is a remote traceback)."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, Exception):
        return error.cause
    return error


class RayPipeline:
    """One `SliceActor` per slice, each in its own placement-group bundle (where GPUs exist, one GPU per
    tensor-parallel rank: the group's ranks share the actor's node).

    Ray restarts a dead actor, re-placing it on a surviving node if its node is gone; calls are never retried
    by Ray. A failed step surfaces as `SliceLost` and the engine decides what to do. `transport`: "auto" (a
    compiled graph, else actor calls), "compiled" or "calls". `idle_teardown`: seconds without a step after
    which a transport that polls when idle is torn down (0: never).
    """

    def __init__(self, specs: list[SliceSpec], actors: list, group: PlacementGroup, first: list[SliceStats], *,
                 use_gpu: bool, transport: str = "auto", idle_teardown: float = IDLE_TEARDOWN_S) -> None:
        self.specs = specs
        self.actors = actors
        self.group = group
        self.depth = len(specs)  # steps that may be in flight at once
        self.use_gpu = use_gpu
        self.transport_mode = transport
        self.transport: Transport | None = None  # built in the event loop, by the first step
        self.idle_teardown = idle_teardown
        self._in_flight = 0
        self._idle: asyncio.TimerHandle | None = None  # the pending idle teardown
        self._dropping: asyncio.Future | None = None  # a transport being torn down; the next one waits for it
        self.incarnations = [s.incarnation for s in first]  # a new one means Ray restarted that slice
        self.restarts = [0] * len(specs)
        self.adapters = PipelineAdapters()

    def _transport(self) -> Transport:
        if self.transport is None:
            try:
                self.transport = build_transport(self.actors, self.depth, mode=self.transport_mode,
                                                 use_gpu=self.use_gpu)
            except SLICE_DIED as e:  # it died after the last graph was torn down (idle, or by a recovery)
                raise SliceLost(f"a slice is down, no compiled graph can be built: {type(e).__name__}") from e
        return self.transport

    @classmethod
    async def start(cls, specs: list[SliceSpec], *, use_gpu: bool, cpus_per_slice: float = 1.0,
                    strategy: str = "PACK", placement_timeout: float = 600.0, load_timeout: float = 600.0,
                    max_restarts: int = -1, transport: str = "auto",
                    idle_teardown: float = IDLE_TEARDOWN_S) -> RayPipeline:
        """Reserve a bundle per slice, start the actors and wait until every slice has loaded and warmed up.

        Both waits are bounded and logged (ray_common/placement.py); cancelling them (a signal during the load)
        releases the actors and the placement group before the cancellation goes on.
        """
        bundle = slice_bundle(cpus_per_slice, use_gpu, specs[0].tensor_parallel)  # a GPU per rank
        what = f"{len(specs)} slices of {describe_resources(bundle)} ({strategy})"
        group = placement_group([dict(bundle) for _ in specs], strategy=strategy)
        actors: list = []
        try:
            await wait_placed(group.ready(), what=what, timeout=placement_timeout,
                              resources=lambda: (ray.cluster_resources(), ray.available_resources()))
            actors = [
                SliceActor.options(
                    num_cpus=cpus_per_slice,
                    num_gpus=bundle.get("GPU", 0),  # rank r of its group on the r-th of them
                    max_restarts=max_restarts,
                    max_task_retries=0,
                    runtime_env={"env_vars": SLICE_ENV},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                ).remote(spec)
                for i, spec in enumerate(specs)
            ]
            # Constructors load weights and warm up; wait for all of them so health turns SERVING only then.
            first = await asyncio.wait_for(_all([a.stats.remote() for a in actors]), load_timeout)
            await _all([a.reset.remote() for a in actors])  # open the caches; a restarted actor's stay shut
        except BaseException as e:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)
            if isinstance(e, asyncio.TimeoutError):
                raise PlacementError(f"the slices did not load within {load_timeout:.0f} s") from e
            raise
        return cls(specs, actors, group, first, use_gpu=use_gpu, transport=transport, idle_teardown=idle_teardown)

    async def step(self, batch: StepBatch) -> list[int]:
        """Up to `depth` calls may be outstanding; slices see the batches in call order."""
        if self._dropping is not None and not self._dropping.done():
            await asyncio.shield(self._dropping)  # a new graph only over slices the old one has let go
        self._cancel_idle()
        self._in_flight += 1
        try:
            with self.adapters.stepping(batch):
                return await self._transport().step(batch)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._arm_idle()

    def _arm_idle(self) -> None:
        """The pipe is empty: tear a transport that polls when idle down unless a step comes within the bound."""
        if self.transport is not None and self.transport.polls_when_idle and self.idle_teardown > 0:
            self._idle = asyncio.get_running_loop().call_later(self.idle_teardown, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        """Armed only with a transport and nothing in flight; every step and every drop cancels it first."""
        self._idle = None
        log.info("no step for %g s: tearing down the %s (it polls a core per slice while idle); the next step "
                 "builds it again", self.idle_teardown, self.transport.name)
        self._start_drop()

    def _start_drop(self) -> None:
        """Detach the transport at once (no step can take it any more) and tear it down in the background."""
        old, self.transport = self.transport, None
        self._dropping = asyncio.ensure_future(old.close())

    async def drop_transport(self) -> None:
        """Tear down the transport (bounded); the next step or recovery builds a fresh one."""
        self._cancel_idle()
        if self.transport is not None:
            self._start_drop()
        if self._dropping is not None:
            await asyncio.shield(self._dropping)

    async def recover(self) -> Recovery:
        """One attempt: every slice answers, restarted ones get their adapters back, every cache is cleared.
        The transport is torn down first; the next step builds a new one over the (restarted) slices.

        Raises `SliceLost` while a slice is down or if one dies meanwhile. An adapter a restarted slice cannot
        load again (its folder moved, or now holds other files) is unloaded everywhere and reported."""
        await self.drop_transport()
        down = [i for i, s in enumerate(await self.stats()) if not s.healthy]
        if down:
            raise SliceLost(f"slice(s) {', '.join(map(str, down))} not answering yet")
        await self.adapters.restore(self._load_all, self._unload_all)
        try:
            await asyncio.gather(*(a.reset.remote() for a in self.actors))
        except SLICE_DIED as e:
            raise SliceLost(f"a slice died during recovery: {type(e).__name__}") from e
        return self.adapters.recovered()

    async def _stats(self, index: int) -> SliceStats:
        spec = self.specs[index]
        try:
            stats = await asyncio.wait_for(self.actors[index].stats.remote(), STATS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - an unreachable slice is reported, not raised
            log.warning("slice %d (layers %d-%d) is not answering: %s", index, spec.first, spec.end - 1,
                        type(e).__name__)
            return SliceStats.down(spec.first, spec.end, self.specs[-1].end, self.restarts[index])
        if stats.incarnation != self.incarnations[index]:
            self.incarnations[index] = stats.incarnation
            self.restarts[index] += 1
            log.warning("slice %d was restarted by Ray (restart #%d)", index, self.restarts[index])
        return dataclasses.replace(stats, healthy=True, restarts=self.restarts[index])

    async def stats(self) -> list[SliceStats]:
        return list(await asyncio.gather(*(self._stats(i) for i in range(len(self.actors)))))

    async def _load_all(self, name: str, source: AdapterSource) -> list[dict]:
        results = await asyncio.gather(
            *(a.load_adapter.remote(name, source.path, source.fingerprint) for a in self.actors),
            return_exceptions=True)
        failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        died = next((i for i, f in failures if isinstance(f, SLICE_DIED)), None)
        if died is not None:
            raise SliceLost(f"slice {died} died while loading adapter {name!r}; no slice keeps it: retry once the "
                            f"slice is back")
        if failures:
            raise _cause(failures[0][1]) from None
        return results

    async def _unload_all(self, name: str) -> list[int]:
        """A dead slice holds nothing any more; one that raised keeps a leftover that the next load under this
        name replaces."""
        results = await asyncio.gather(*(a.unload_adapter.remote(name) for a in self.actors),
                                       return_exceptions=True)
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        for i in failed:
            log.warning("slice %d could not unload adapter %r: %s", i, name, _cause(results[i]))
        return failed

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> list[dict]:
        """Every slice actor takes its own layers' share of the adapter; all slices or none."""
        return await self.adapters.load(name, AdapterSource(path, fingerprint), self._load_all, self._unload_all)

    async def unload_adapter(self, name: str) -> list[int]:
        return await self.adapters.unload(name, self._unload_all)

    async def close(self) -> None:
        await self.drop_transport()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_placement_group(self.group)


async def _all(refs: list) -> list:
    """The refs' values in order; unlike gather, cancelling it leaves no orphaned future behind."""
    return [await ref for ref in refs]
