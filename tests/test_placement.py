"""Placement rules without Ray: a local node's CPU share fits any slice count, a request that cannot fit is
refused naming what it needs, what the node has and the flag, and the wait on a cluster is logged and bounded.
Also the auth decision and the ports for the Ray cluster serve starts on this machine."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from qwen_relay.ray_common import local_ray, placement
from qwen_relay.ray_common.local_ray import free_port, local_ray_auth_env
from qwen_relay.ray_common.placement import PlacementError, wait_placed
from qwen_relay.server.placement import check_fits_node, local_cpu_share, slice_bundle

NODE = {"CPU": 2.0, "memory": 1e10, "object_store_memory": 1e9, "node:127.0.0.1": 1.0}


@pytest.mark.parametrize("slices", [1, 2, 3, 5, 7, 32])
def test_any_slice_count_fits_a_two_cpu_node(slices):
    share = local_cpu_share(2, slices)
    assert 0 < share <= 1
    check_fits_node([{"CPU": share}] * slices, "PACK", NODE)  # does not raise


def test_share_is_a_whole_cpu_when_there_are_enough():
    assert local_cpu_share(8, 3) == 1.0
    assert local_cpu_share(2, 3) == 0.666


def test_too_much_cpu_is_refused_naming_need_have_and_flag():
    with pytest.raises(PlacementError) as info:
        check_fits_node([{"CPU": 1.0}] * 3, "PACK", NODE)
    message = str(info.value)
    assert "3 slices need 3 CPU" in message and "has 2 CPU" in message and "--cpus-per-slice" in message


def test_missing_gpus_are_refused_naming_the_flags():
    with pytest.raises(PlacementError, match=r"need 2 GPU.*has 0 GPU.*--device cpu"):
        check_fits_node([{"CPU": 0.5, "GPU": 1}] * 2, "PACK", NODE)


def test_a_tensor_parallel_gpu_slice_reserves_a_gpu_per_rank():
    """TP 4 x PP 2 fits one 8-GPU node; a third slice, or TP 8 x PP 2, does not, and the flag is named."""
    assert slice_bundle(1.0, True, 4) == {"CPU": 1.0, "GPU": 4}
    assert slice_bundle(1.0, False, 4) == {"CPU": 1.0}  # CPU ranks: the CPUs are the slice's to share out
    node = {**NODE, "CPU": 16.0, "GPU": 8.0}
    check_fits_node([slice_bundle(1.0, True, 4)] * 2, "PACK", node)  # does not raise
    with pytest.raises(PlacementError, match=r"need 16 GPU in all \(8 each\).*has 8 GPU.*--tensor-parallel"):
        check_fits_node([slice_bundle(1.0, True, 8)] * 2, "PACK", node)


def test_strict_spread_cannot_fit_one_node():
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        check_fits_node([{"CPU": 0.5}] * 2, "STRICT_SPREAD", NODE)


def test_serve_refuses_what_its_local_ray_cannot_hold_before_starting_it(tiny_model):
    """What serve checks before starting local Ray: the slices (--layers or --shards) against its CPUs."""
    from qwen_relay.server.app import ServeOptions, refuse_what_local_ray_cannot_hold

    def options(**kw) -> ServeOptions:
        return ServeOptions(model=str(tiny_model), local_ray_cpus=2, **kw)

    refuse_what_local_ray_cannot_hold(options(shards=4))  # shares of the node: fits
    refuse_what_local_ray_cannot_hold(options(shards=2, cpus_per_slice=1))
    with pytest.raises(PlacementError, match=r"3 slices need 3 CPU in all \(1 each\) but the local Ray node has 2"):
        refuse_what_local_ray_cannot_hold(options(layers="0-0,1-3,4-4", cpus_per_slice=1))
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        refuse_what_local_ray_cannot_hold(options(shards=2, placement_strategy="STRICT_SPREAD"))
    with pytest.raises(ValueError, match="--layers: the ranges cover layers 0-3, the model has 5"):
        refuse_what_local_ray_cannot_hold(options(layers="0-3"))


def test_wait_logs_what_it_awaits_and_gives_up(monkeypatch, caplog):
    monkeypatch.setattr(placement, "FIRST_LOG_S", 0.05)
    monkeypatch.setattr(placement, "LOG_EVERY_S", 0.05)
    never = asyncio.Event()
    caplog.set_level(logging.INFO, logger=placement.__name__)
    with pytest.raises(PlacementError) as info:
        asyncio.run(wait_placed(never.wait(), what="3 slices of CPU 1 (PACK)", timeout=0.3,
                                resources=lambda: ({"CPU": 2.0}, {"CPU": 0.0})))
    assert "3 slices of CPU 1 (PACK)" in str(info.value) and "--placement-timeout" in str(info.value)
    assert "CPU 2 (CPU 0 free)" in str(info.value)
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits and "the cluster has CPU 2 (CPU 0 free)" in waits[0]


def test_wait_returns_once_placed():
    async def placed() -> None:
        await asyncio.sleep(0)

    asyncio.run(wait_placed(placed(), what="x", timeout=5, resources=lambda: ({}, {})))


def test_local_ray_gets_its_own_token_unless_the_user_chose():
    env = local_ray_auth_env({})
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64
    assert local_ray_auth_env({}) != env  # a fresh token per cluster
    assert local_ray_auth_env({"RAY_AUTH_MODE": "disabled"}) == {}
    assert local_ray_auth_env({"RAY_AUTH_MODE": "token"}) == {}


def test_ports_for_local_ray_lie_below_the_ephemeral_range(tmp_path, monkeypatch):
    """Ray picks its own processes' ports from the ephemeral range while a node starts; ours stay out of it."""
    start = local_ray._ephemeral_ports_start()
    for _ in range(20):
        port = free_port()
        assert local_ray.FIXED_PORTS_START <= port < start
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed
    # A machine whose ephemeral range leaves no room below it: any free port, as the kernel picks it.
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("1024\t65535\n")
    monkeypatch.setattr(local_ray, "EPHEMERAL_RANGE_FILE", str(ranges))
    assert local_ray._ephemeral_ports_start() == 1024
    assert free_port() >= 1024
