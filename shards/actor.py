"""The Ray actor that hosts one slice: a thin wrapper that places a `SliceRunner` on a GPU or CPU.

Hidden states arrive as Ray object refs from the previous slice's actor (Ray resolves a ref passed as an
argument by fetching it straight from the producer), so activations never travel through the gateway.
Ray restarts a dead actor (the pipeline sets `max_restarts`); the new one rebuilds its slice from the
checkpoint with an empty cache, and the gateway replays what was lost. A tensor-parallel slice is a group of
rank processes behind this one actor (shards/group.py): one Ray bundle (on GPUs, N GPUs, rank r on the r-th the
actor sees), so its ranks share a node; a rank that dies makes the actor exit, and the restarted actor forms a
new group. Steps are never retried by Ray
(`max_task_retries=0`): a step applied twice would corrupt a cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import ray
import torch

from .allreduce import GroupBroken
from .batch import StepBatch
from .group import GroupRunner
from .runner import SliceRunner, SliceSpec
from .stats import SliceStats

log = logging.getLogger(__name__)


@ray.remote
class SliceActor:
    def __init__(self, spec: SliceSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if spec.threads == 0 and not torch.cuda.is_available():
            # Ray pins OMP threads to the bundle's CPU count; the slices of one request run one after
            # another, so each may use every core of its node (one thread each measured 1.7x slower).
            # A tensor-parallel group's ranks run at once: they share the cores out (shards/group.py).
            spec = dataclasses.replace(spec, threads=max(1, (os.cpu_count() or 1) // spec.tensor_parallel))
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts this actor
        self.runner = GroupRunner(spec) if spec.tensor_parallel > 1 else SliceRunner(spec)
        self.runner.warmup()

    def _call(self, method: str, *args) -> object:
        try:
            return getattr(self.runner, method)(*args)
        except GroupBroken:
            # A tensor-parallel rank died: the whole group goes, and Ray restarts this actor with a new one.
            log.exception("tensor-parallel group of layers %d-%d broken: exiting so Ray restarts it",
                          self.runner.spec.first, self.runner.spec.end - 1)
            os._exit(1)

    def step(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int]:
        return self._call("step", batch, hidden)

    def reset(self) -> None:
        self._call("reset")

    def load_adapter(self, name: str, path: str, fingerprint: str = "") -> dict:
        return self._call("load_adapter", name, path, fingerprint)

    def unload_adapter(self, name: str) -> None:
        self._call("unload_adapter", name)

    def stats(self) -> SliceStats:
        context = ray.get_runtime_context()
        return dataclasses.replace(self.runner.stats(), actor_id=context.get_actor_id(),
                                   node_id=context.get_node_id(), incarnation=self.incarnation, pid=os.getpid())
