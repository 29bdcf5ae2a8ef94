"""Where the training workers run, and bounded waits for them.

``train`` either starts a Ray node of its own on this machine or joins an existing cluster
(``--ray-address``, or ``RAY_ADDRESS`` as ``ray job submit`` sets it). On its own node it sizes the workers
so they always fit: with ``--cpus-per-worker`` unset the workers split the node's CPUs between them (DDP
ranks compute at the same time, so each gets its share of the cores as torch threads), and an explicit
request that cannot fit fails at once, naming what it needs, what the node has and the flag to change.
On an existing cluster waiting for an autoscaler is normal, so the wait is logged (after ~2 s, then every
~15 s) and bounded by ``--placement-timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass

from qwen_relay.ray_common.local_ray import LocalRay
from qwen_relay.ray_common.placement import FIRST_LOG_S, LOG_EVERY_S  # the same cadence as serve's placement wait

from .config import TrainConfig

__all__ = [
    "AUTH_MODE_VAR",
    "Placement",
    "WorkerResourcesError",
    "WorkerShare",
    "node_cpus",
    "place_workers",
    "shortfall",
    "starts_own_node",
    "wait_for_worker_resources",
    "worker_share",
]

log = logging.getLogger(__name__)

AUTH_MODE_VAR = "RAY_AUTH_MODE"


class WorkerResourcesError(RuntimeError):
    """The worker group cannot be placed: too big for the node, or not placed within the timeout."""


@dataclass(frozen=True)
class WorkerShare:
    """What each worker reserves from Ray and how many torch threads it runs."""

    cpus: float
    threads: int


def node_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which ``taskset`` and cgroups narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_share(workers: int, cpus: int, cpus_per_worker: float | None) -> WorkerShare:
    """Each worker's share of a node of ``cpus`` CPUs that ``train`` started itself.

    Unset ``cpus_per_worker``: an equal share, rounded down to Ray's resource precision so the shares add
    up to at most the node (3 workers on 2 CPUs reserve 0.6666 each and run one torch thread each).
    """
    if cpus_per_worker is None:
        share = math.floor(cpus / workers * 10_000) / 10_000
        return WorkerShare(share, max(1, cpus // workers))
    if workers * cpus_per_worker > cpus + 1e-9:
        raise WorkerResourcesError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} needs {workers * cpus_per_worker:g} "
            f"CPUs but this node has {cpus}: lower --cpus-per-worker (or leave it unset so the workers share "
            "the node) or --workers"
        )
    return WorkerShare(cpus_per_worker, max(1, int(cpus_per_worker)))


def shortfall(per_worker: dict[str, float], workers: int, total: dict[str, float]) -> dict[str, tuple[float, float]]:
    """``{resource: (needed, available)}`` for each resource that ``workers`` bundles cannot get from
    ``total``; empty when they fit."""
    return {
        name: (amount * workers, total.get(name, 0.0))
        for name, amount in per_worker.items()
        if amount * workers > total.get(name, 0.0) + 1e-9
    }


def _describe(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU", "memory") and not k.startswith(("node:", "accelerator"))
    )
    return ", ".join(
        f"{k} {resources[k] / 2**30:.1f} GiB" if k in ("memory", "object_store_memory") else f"{k} {resources[k]:g}"
        for k in keys
    )


def wait_for_worker_resources(per_worker: dict[str, float], workers: int, timeout_s: float) -> None:
    """Wait until the cluster can place ``workers`` bundles of ``per_worker`` (as Ray Train will, PACK),
    logging what is awaited after ~2 s, then every ~15 s; raise :class:`WorkerResourcesError` after
    ``timeout_s``.

    A probe placement group is reserved and released: once it is placed the nodes exist (an autoscaler has
    started them), and Ray Train's own group follows at once.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(per_worker)] * workers, strategy="PACK")
    start = time.monotonic()
    interval = FIRST_LOG_S
    try:
        while True:
            waited = time.monotonic() - start
            ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(interval, timeout_s - waited)))
            if ready:
                return
            waited = time.monotonic() - start
            asked = f"{workers} worker(s) x {{{_describe(per_worker)}}}"
            total, free = _describe(ray.cluster_resources()), _describe(ray.available_resources())
            has = f"the cluster has {{{total}}}, free {{{free}}}"
            if waited >= timeout_s:
                raise WorkerResourcesError(
                    f"the training workers were not placed within --placement-timeout {timeout_s:g} s: asked "
                    f"for {asked}; {has}. Add nodes, lower --workers or --cpus-per-worker, or raise "
                    "--placement-timeout"
                )
            log.info("waiting %.0f s of %g s for %s; %s", waited, timeout_s, asked, has)
            interval = LOG_EVERY_S
    finally:
        remove_placement_group(pg)


@dataclass(frozen=True)
class Placement:
    """Where the workers go: each one's resources and threads, and whether this call initialized Ray
    (started a node or connected), so that it also shuts it down."""

    resources: dict[str, float]
    threads: int
    owns_ray: bool
    local_ray: LocalRay | None  # the node this call started, in a session of its own (stopped last)


def starts_own_node(cfg: TrainConfig) -> bool:
    """Whether ``train`` starts a Ray node of its own: no cluster given and no ``ray.init`` made already."""
    import ray

    return not (cfg.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def place_workers(cfg: TrainConfig) -> Placement:
    """Start a Ray node of our own, or join the cluster already there, and make sure the workers fit.

    On our own node the workers are sized to fit it (or refused at once); on an existing cluster (given by
    ``--ray-address``, ``RAY_ADDRESS``, or a ``ray.init`` the caller already made) the wait for their
    resources is logged and bounded by ``--placement-timeout``.
    """
    import ray

    owns = not ray.is_initialized()
    started = starts_own_node(cfg)
    local_ray = None
    if started:
        cpus = node_cpus()
        share = worker_share(cfg.workers, cpus, cfg.cpus_per_worker)
        # As serve does (docs/local-ray.md): Ray in a session of its own, so a signal to this process group
        # reaches the driver alone and Ray is stopped by it, last, instead of dying underneath it.
        local_ray = asyncio.run(LocalRay.start(cpus, dashboard=True))  # Ray Train asks its state API
        ray.init(address=local_ray.address)
    else:
        if owns:
            ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        cpus_per_worker = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else 1.0
        share = WorkerShare(cpus_per_worker, max(1, int(cpus_per_worker)))
    resources: dict[str, float] = {"CPU": share.cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1
    if started:
        missing = shortfall(resources, cfg.workers, ray.cluster_resources())
        if missing:
            ray.shutdown()
            local_ray.stop()
            needs = ", ".join(f"{need:g} {name} (the node has {have:g})" for name, (need, have) in missing.items())
            raise WorkerResourcesError(f"--workers {cfg.workers} need {needs}: lower --workers")
    else:
        wait_for_worker_resources(resources, cfg.workers, cfg.placement_timeout)
    return Placement(resources, share.threads, owns, local_ray)
