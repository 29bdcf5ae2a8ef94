"""Waiting for Ray to place something, bounded and explained, for serve's slices and train's workers alike.

An existing cluster may grow (an autoscaler adds nodes), so waiting there is right, but it is logged (after
`FIRST_LOG_S`, then every `LOG_EVERY_S` seconds) and bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

FIRST_LOG_S = 2.0  # a group not placed by then waits for resources: say so while the user still watches
LOG_EVERY_S = 15.0


class PlacementError(RuntimeError):
    """What was asked of Ray (serve's slices, train's workers) cannot be placed, or was not within the timeout."""


def describe_resources(resources: dict[str, float]) -> str:
    """`CPU 2, GPU 1`: the resources people reason about, without Ray's memory and node-id entries."""
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not (
        k.startswith("node:") or k in ("memory", "object_store_memory") or k.startswith("accelerator_type"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


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
