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
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen_relay.shards.actor import SliceActor
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.runner import SliceSpec
from qwen_relay.shards.stats import SliceStats

from .pipeline import SLICE_ENV
from .transport import Transport, build_transport

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0


class RayPipeline:
    """One `SliceActor` per slice, each in its own placement-group bundle (one GPU each where GPUs exist).

    Ray restarts a dead actor, re-placing it on a surviving node if its node is gone; calls are never retried
    by Ray. A failed step surfaces as `SliceLost` and the engine decides what to do. `transport`: "auto" (a
    compiled graph, else actor calls), "compiled" or "calls".
    """

    def __init__(self, specs: list[SliceSpec], *, use_gpu: bool, cpus_per_slice: float = 1.0,
                 strategy: str = "PACK", ready_timeout: float = 600.0, max_restarts: int = -1,
                 transport: str = "auto") -> None:
        self.specs = specs
        self.depth = len(specs)  # Ray runs each actor's calls from this caller in submission order
        self.use_gpu = use_gpu
        self.transport_mode = transport
        self.transport: Transport | None = None  # built in the event loop, by the first step
        bundle = {"CPU": cpus_per_slice, "GPU": 1} if use_gpu else {"CPU": cpus_per_slice}
        self.group = placement_group([dict(bundle) for _ in specs], strategy=strategy)
        try:
            ray.get(self.group.ready(), timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError as e:
            remove_placement_group(self.group)
            raise RuntimeError(f"Ray could not place {len(specs)} slices of {bundle} ({strategy}) "
                               f"within {ready_timeout:.0f} s; cluster has {ray.cluster_resources()}") from e
        self.actors = [
            SliceActor.options(
                num_cpus=cpus_per_slice,
                num_gpus=1 if use_gpu else 0,
                max_restarts=max_restarts,
                max_task_retries=0,
                runtime_env={"env_vars": SLICE_ENV},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(spec)
            for i, spec in enumerate(specs)
        ]
        # Constructors load weights and warm up; wait for all of them so health turns SERVING only then.
        first = ray.get([a.stats.remote() for a in self.actors], timeout=ready_timeout)
        self.incarnations = [s.incarnation for s in first]  # a new one means Ray restarted that slice
        self.restarts = [0] * len(specs)
        self.adapters: dict[str, str] = {}  # name -> path: re-sent to slices after a restart

    def _transport(self) -> Transport:
        if self.transport is None:
            self.transport = build_transport(self.actors, self.depth, mode=self.transport_mode,
                                             use_gpu=self.use_gpu)
        return self.transport

    async def step(self, batch: StepBatch) -> list[int]:
        """Up to `depth` calls may be outstanding; slices see the batches in call order."""
        return await self._transport().step(batch)

    async def _drop_transport(self) -> None:
        """Tear down the transport (bounded); the next step or recovery builds a fresh one."""
        if self.transport is not None:
            old, self.transport = self.transport, None
            await old.close()

    async def recover(self, timeout: float) -> bool:
        """Wait (bounded) until every slice answers, then clear all caches for replay and rebuild the transport
        over the restarted slices. False on timeout. Only once every outstanding step has settled."""
        await self._drop_transport()
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
                self._transport()
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
        await self._drop_transport()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_placement_group(self.group)
