"""What serve's slices may reserve on a local Ray node it started itself.

That node cannot grow: a request that does not fit fails at once, naming what it needs, what the node has and
the flag to change. Waiting on a cluster that may grow is `qwen_relay.ray_common.placement`'s.
"""

from __future__ import annotations

import math

from qwen_relay.ray_common.placement import PlacementError, describe_resources


def local_cpu_share(node_cpus: float, slices: int) -> float:
    """Ray CPUs each CPU slice reserves on a local node: at most 1, and small enough that all slices fit.

    Slices run one after another (a step passes through them in order), so a slice that uses every core
    of its node while the others wait is the normal case; the reservation is a scheduling share, not a
    thread count (--threads sets those). Rounded down to Ray's 1/1000 resource granularity.
    """
    return min(1.0, math.floor(node_cpus / slices * 1000) / 1000)


def slice_bundle(cpus: float, use_gpu: bool, tensor_parallel: int = 1) -> dict[str, float]:
    """What one slice reserves: CPUs, and on GPUs one per tensor-parallel rank. One bundle, one actor: a group's
    ranks (the actor and its child processes) are on one node by construction, a STRICT_PACK per group, while the
    placement group's strategy spreads the slices over nodes."""
    return {"CPU": cpus, "GPU": tensor_parallel} if use_gpu else {"CPU": cpus}


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
            flag = "--cpus-per-slice" if resource == "CPU" else "--device cpu, --shards, --tensor-parallel" \
                if resource == "GPU" \
                else "the slice resources"
            raise PlacementError(
                f"{len(bundles)} slices need {need:g} {resource} in all ({bundles[0].get(resource, 0):g} each) "
                f"but the local Ray node has {have:g} {resource} ({describe_resources(node)}): change {flag}, "
                "or join a larger cluster with --ray-address")
