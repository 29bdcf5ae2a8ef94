"""`RayPipeline`: one Ray actor per slice, actor calls chained by object ref.

Slice i+1 receives slice i's output ref, so hidden states never pass through the gateway's Python code and
only the last slice's token ids come back. Kept apart from server/pipeline.py so that a machine without Ray
can still serve with in-process slices (`--no-ray`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen_relay.shards.actor import SliceActor
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.kv_cache import CacheMismatch
from qwen_relay.shards.runner import SliceSpec
from qwen_relay.shards.stats import SliceStats

from .pipeline import SLICE_ENV, SliceLost
from .placement import PlacementError, describe_resources, wait_placed

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0


class RayPipeline:
    """One `SliceActor` per slice, each in its own placement-group bundle (one GPU each where GPUs exist).

    Ray restarts a dead actor, re-placing it on a surviving node if its node is gone; calls are never retried
    by Ray. A failed step surfaces as `SliceLost` and the engine decides what to do.
    """

    def __init__(self, specs: list[SliceSpec], actors: list, group: PlacementGroup,
                 first: list[SliceStats]) -> None:
        self.specs = specs
        self.actors = actors
        self.group = group
        self.incarnations = [s.incarnation for s in first]  # a new one means Ray restarted that slice
        self.restarts = [0] * len(specs)
        self.adapters: dict[str, str] = {}  # name -> path: re-sent to slices after a restart

    @classmethod
    async def start(cls, specs: list[SliceSpec], *, use_gpu: bool, cpus_per_slice: float = 1.0,
                    strategy: str = "PACK", placement_timeout: float = 600.0, load_timeout: float = 600.0,
                    max_restarts: int = -1) -> RayPipeline:
        """Reserve a bundle per slice, start the actors and wait until every slice has loaded and warmed up.

        Both waits are bounded and logged (server/placement.py); cancelling them (a signal during the load)
        releases the actors and the placement group before the cancellation goes on.
        """
        bundle = {"CPU": cpus_per_slice, "GPU": 1} if use_gpu else {"CPU": cpus_per_slice}
        what = f"{len(specs)} slices of {describe_resources(bundle)} ({strategy})"
        group = placement_group([dict(bundle) for _ in specs], strategy=strategy)
        actors: list = []
        try:
            await wait_placed(group.ready(), what=what, timeout=placement_timeout,
                              resources=lambda: (ray.cluster_resources(), ray.available_resources()))
            actors = [
                SliceActor.options(
                    num_cpus=cpus_per_slice,
                    num_gpus=1 if use_gpu else 0,
                    max_restarts=max_restarts,
                    max_task_retries=0,
                    runtime_env={"env_vars": SLICE_ENV},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                ).remote(spec)
                for i, spec in enumerate(specs)
            ]
            # Constructors load weights and warm up; wait for all of them so health turns SERVING only then.
            first = await asyncio.wait_for(_all([a.stats.remote() for a in actors]), load_timeout)
        except BaseException as e:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)
            if isinstance(e, asyncio.TimeoutError):
                raise PlacementError(f"the slices did not load within {load_timeout:.0f} s") from e
            raise
        return cls(specs, actors, group, first)

    async def step(self, batch: StepBatch) -> list[int]:
        out = None
        for actor in self.actors:
            out = actor.step.remote(batch, out)
        try:
            return await out
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise SliceLost(f"a slice actor died: {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CacheMismatch):
                raise SliceLost(f"a slice restarted and lost its cache: {e.cause}") from e
            raise

    async def recover(self, timeout: float) -> bool:
        """Wait (bounded) until every slice answers, then clear all caches for replay. False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.stats()
            if all(s.healthy for s in stats):
                # A restarted slice was rebuilt from its spec alone: give it back its adapters (a no-op elsewhere).
                loads = [a.load_adapter.remote(n, p) for a in self.actors for n, p in self.adapters.items()]
                for failed in await asyncio.gather(*loads, return_exceptions=True):
                    if isinstance(failed, Exception):
                        log.error("could not restore an adapter on a restarted slice: %s", failed)
                await asyncio.gather(*(a.reset.remote() for a in self.actors))
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(min(0.5, max(deadline - loop.time(), 0)))

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

    async def load_adapter(self, name: str, path: str) -> list[dict]:
        """Every slice actor takes its own layers' share of the adapter; all slices or none."""
        try:
            infos = list(await asyncio.gather(*(a.load_adapter.remote(name, path) for a in self.actors)))
        except ray.exceptions.RayTaskError as e:
            await self.unload_adapter(name)
            raise e.cause if isinstance(e.cause, Exception) else e from None
        self.adapters[name] = path
        return infos

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        await asyncio.gather(*(a.unload_adapter.remote(name) for a in self.actors))

    async def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_placement_group(self.group)


async def _all(refs: list) -> list:
    """The refs' values in order; unlike gather, cancelling it leaves no orphaned future behind."""
    return [await ref for ref in refs]
