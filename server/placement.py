"""Reserving the slices' resources on Ray: what a local node can hold, and a bounded, explained wait.

A local Ray node that serve started itself cannot grow: a request that does not fit fails at once, naming
what it needs, what the node has and the flag to change. An existing cluster may grow (an autoscaler adds
nodes), so there the wait is right, but it is logged (after `FIRST_LOG_S`, then every `LOG_EVERY_S` seconds)
and bounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

FIRST_LOG_S = 2.0  # a group not placed by then waits for resources: say so while the user still watches
LOG_EVERY_S = 15.0


class PlacementError(RuntimeError):
    """The slices' resources cannot be reserved (or were not within the timeout)."""


def local_cpu_share(node_cpus: float, slices: int) -> float:
    """Ray CPUs each CPU slice reserves on a local node: at most 1, and small enough that all slices fit.

    Slices run one after another (a step passes through them in order), so a slice that uses every core
    of its node while the others wait is the normal case; the reservation is a scheduling share, not a
    thread count (--threads sets those). Rounded down to Ray's 1/1000 resource granularity.
    """
    return min(1.0, math.floor(node_cpus / slices * 1000) / 1000)


def describe_resources(resources: dict[str, float]) -> str:
    """`CPU 2, GPU 1`: the resources people reason about, without Ray's memory and node-id entries."""
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not (
        k.startswith("node:") or k in ("memory", "object_store_memory") or k.startswith("accelerator_type"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


def check_fits_node(bundles: list[dict[str, float]], strategy: str, node: dict[str, float]) -> None:
    """Refuse at once what one local node can never hold (the node cannot grow)."""
    if strategy == "STRICT_SPREAD" and len(bundles) > 1:
        raise PlacementError(f"--placement STRICT_SPREAD puts each of the {len(bundles)} slices on its own "
                             "node, and local Ray has one node: use --placement PACK or join a cluster "
                             "with --ray-address")
    for resource in sorted({k for b in bundles for k in b}):
        need = sum(b.get(resource, 0) for b in bundles)
        have = node.get(resource, 0)
        if need > have + 1e-9:
            flag = "--cpus-per-slice" if resource == "CPU" else "--device cpu, --shards" if resource == "GPU" \
                else "the slice resources"
            raise PlacementError(
                f"{len(bundles)} slices need {need:g} {resource} in all ({bundles[0].get(resource, 0):g} each) "
                f"but the local Ray node has {have:g} {resource} ({describe_resources(node)}): change {flag}, "
                "or join a larger cluster with --ray-address")


async def wait_placed(ready: Awaitable[Any], *, what: str, timeout: float,
                      resources: Callable[[], tuple[dict[str, float], dict[str, float]]]) -> None:
    """Await `ready` (a placement group's ready ref), logging what is awaited after FIRST_LOG_S seconds, then
    every LOG_EVERY_S.

    `resources()` returns the cluster's (total, available) resources for the log line. Raises PlacementError
    after `timeout` seconds; cancelling the wait (a signal) is the caller's to clean up after.
    """
    future = asyncio.ensure_future(ready)
    start = time.monotonic()
    interval = FIRST_LOG_S
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            done, _ = await asyncio.wait({future}, timeout=max(min(interval, left), 0))
            if done:
                future.result()
                return
            waited = time.monotonic() - start
            total, available = resources()
            if waited >= timeout:
                raise PlacementError(
                    f"Ray could not place {what} within --placement-timeout {timeout:g} s; the cluster has "
                    f"{describe_resources(total)} ({describe_resources(available)} free)")
            log.info("waiting %.0f s for Ray to place %s: the cluster has %s (%s free); giving up in %.0f s "
                     "(--placement-timeout)", waited, what, describe_resources(total),
                     describe_resources(available), timeout - waited)
            interval = LOG_EVERY_S
    finally:
        future.cancel()
