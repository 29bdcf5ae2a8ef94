"""One decoding step through every slice, in order (DESIGN.md: Ray is the transport, not the engine).

`RayPipeline` chains actor calls by object ref: slice i+1 receives slice i's output ref, so hidden states go
actor to actor and only the last slice's token ids come back. `LocalPipeline` runs the same `SliceRunner`s
in this process, for tests and for timing where Ray is absent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen_relay.shards.actor import SliceActor
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    async def step(self, batch: StepBatch) -> list[int]: ...

    def release(self, slots: list[int]) -> None: ...

    async def stats(self) -> list[dict]: ...

    async def close(self) -> None: ...


class LocalPipeline:
    """All slices in this process; forwards run in a worker thread so the event loop keeps serving."""

    def __init__(self, specs: list[SliceSpec]) -> None:
        self.runners = [SliceRunner(spec) for spec in specs]
        for runner in self.runners:
            runner.warmup()

    def _step(self, batch: StepBatch) -> list[int]:
        out = None
        for runner in self.runners:
            out = runner.step(batch, out)
        return out

    async def step(self, batch: StepBatch) -> list[int]:
        return await asyncio.to_thread(self._step, batch)

    def release(self, slots: list[int]) -> None:
        for runner in self.runners:
            runner.release(slots)

    async def stats(self) -> list[dict]:
        return [{**r.stats(), "actor_id": "", "node_id": ""} for r in self.runners]

    async def close(self) -> None:
        self.runners = []


class RayPipeline:
    """One `SliceActor` per slice, each in its own placement-group bundle (one GPU each where GPUs exist)."""

    def __init__(self, specs: list[SliceSpec], *, use_gpu: bool, cpus_per_slice: float = 1.0,
                 strategy: str = "PACK", ready_timeout: float = 600.0) -> None:
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
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(spec)
            for i, spec in enumerate(specs)
        ]
        # Constructors load weights and warm up; wait for all of them so health turns SERVING only then.
        ray.get([a.stats.remote() for a in self.actors], timeout=ready_timeout)

    async def step(self, batch: StepBatch) -> list[int]:
        out = None
        for actor in self.actors:
            out = actor.step.remote(batch, out)
        return await out

    def release(self, slots: list[int]) -> None:
        for actor in self.actors:
            actor.release.remote(slots)

    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*(a.stats.remote() for a in self.actors)))

    async def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        remove_placement_group(self.group)
