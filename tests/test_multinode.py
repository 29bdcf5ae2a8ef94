"""Multi-node for real: a 2-node Ray cluster on this machine (`ray start --head` + a second `ray start`),
the relay serving on it with `--ray-address`: waiting for room, slices on different nodes, and a node killed
mid-stream.

Everything Ray here runs in subprocesses bound to 127.0.0.1 with its own temp dir, so it never touches the
test session's own Ray cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from test_local_serve import NATIVE_DUMP, Serve
from transformers import AutoTokenizer

from qwen_relay.client import RelayClient
from qwen_relay.ray_common.local_ray import _session_pids, free_port

pytestmark = pytest.mark.slow  # starts Ray actors, subprocesses or a cluster: `make test-fast` skips it

RAY = str(Path(sys.executable).with_name("ray"))
MAX_NEW = 60
# Detect a dead node in ~2 s instead of Ray's default ~15-30 s.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class LocalCluster:
    """A head node and worker nodes as separate raylets on this machine; workers can be killed outright."""

    def __init__(self) -> None:
        self.temp_dir = f"/tmp/qr-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **RAY_ENV}
        self.workers: list[subprocess.Popen] = []
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def add_worker(self) -> None:
        # Its own session (process group): killing the group kills its raylet and every worker on it.
        self.workers.append(subprocess.Popen(
            [RAY, "start", f"--address={self.address}", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--block"],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Ask the cluster's GCS directly: a `ray.init` probe would cost a Python process per poll, and this
        process may hold the session's own Ray already."""
        gcs = GcsClient(address=self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = gcs.get_all_node_info(timeout=30).values()
            if sum(node.state == GcsNodeInfo.ALIVE for node in nodes) == count:
                return
            time.sleep(0.5)
        raise AssertionError(f"the cluster did not reach {count} live nodes")

    def kill_worker(self) -> None:
        """The node dies at once: its raylet and every process it spawned (Ray workers get their own group)."""
        root = self.workers.pop(0).pid
        for pid in [root, *_descendants(root)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        while self.workers:
            self.kill_worker()
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    """One head node for the module: starting a cluster costs more than either test's own work."""
    c = LocalCluster()
    yield c
    c.close()


@pytest.fixture
def cluster(head):
    """The head and one live worker node. The strict-spread test runs before the spread test and ends with a
    worker that joined during it, which the spread test then uses; a worker is added here only when none is
    alive."""
    if not head.workers:
        head.add_worker()
    head.wait_for_nodes(2)
    return head


def _serve(cluster: LocalCluster, model: Path, tmp_path: Path, placement: str,
           recovery_timeout: float) -> tuple[Serve, RelayClient]:
    serve = Serve(model, tmp_path, "--shards", "2", "--ray-address", cluster.address, "--placement", placement,
                  "--recovery-timeout", str(recovery_timeout), env=cluster.env)
    client = RelayClient(f"127.0.0.1:{serve.port}", timeout=120)
    _wait_serving(client, serve)
    return serve, client


def _wait_serving(client: RelayClient, serve: Serve, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert serve.proc.poll() is None, f"qwen-relay serve exited:\n{serve.output}"
        try:
            if client.health(timeout=2) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the relay did not become SERVING:\n{serve.output}")


def _stop(serve: Serve, client: RelayClient) -> None:
    client.close()
    try:
        serve.stop_and_check(signal.SIGTERM, group=False)
    finally:
        serve.kill()


def test_a_placement_wait_is_logged_and_a_signal_to_the_group_ends_it(head, tiny_model, tmp_path):
    """First, while the head (2 CPUs) is the only node: 3 slices of 1 CPU wait (an autoscaler could add a node),
    saying what they wait for; SIGTERM to serve's group during the wait exits 0 and leaves nothing behind."""
    serve = Serve(tiny_model, tmp_path, "--layers", "0-0,1-3,4-4", "--ray-address", head.address,
                  "--placement-timeout", "300", env=head.env)
    try:
        serve.wait_for_line("placement: waiting")
        os.killpg(serve.proc.pid, signal.SIGTERM)
        assert serve.proc.wait(serve.grace + 10) == 0, serve.output
    finally:
        serve.kill()
    assert _session_pids(serve.proc.pid) == []
    assert not NATIVE_DUMP.search(serve.output), serve.output
    assert re.search(r"to place 3 slices of CPU 1 \(PACK\): the cluster has CPU 2 \(CPU 2 free\); giving up in "
                     r"\d+ s \(--placement-timeout\)", serve.output), serve.output


def test_strict_spread_without_a_spare_node_is_unavailable_until_one_joins(cluster, tiny_model, reference, tmp_path):
    serve, client = _serve(cluster, tiny_model, tmp_path, "STRICT_SPREAD", recovery_timeout=3)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            for i, _ in enumerate(client.stream(prompt="Merhaba", max_new_tokens=200, ignore_eos=True)):
                if i == 5:
                    cluster.kill_worker()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(prompt="Merhaba", max_new_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A node joins: Ray re-places the slice there and the relay recovers by itself.
        cluster.add_worker()
        _wait_serving(client, serve)
        assert len({s.node_id for s in client.model_info().slices}) == 2
        ids = [5, 17, 300, 42]
        assert client.generate(prompt_token_ids=ids, max_new_tokens=20).token_ids == reference(tiny_model, ids, 20)
    finally:
        _stop(serve, client)


def test_slices_spread_over_nodes_survive_a_node_dying(cluster, tiny_model, reference, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_ids = tokenizer.encode("Merhaba! Nasıl yardımcı olabilirim?", add_special_tokens=False)
    serve, client = _serve(cluster, tiny_model, tmp_path, "SPREAD", recovery_timeout=120)
    try:
        nodes = [s.node_id for s in client.model_info().slices]
        assert len(set(nodes)) == 2, nodes
        tokens: list[int] = []
        for chunk in client.stream(prompt_token_ids=prompt_ids, max_new_tokens=MAX_NEW, ignore_eos=True):
            tokens.extend(chunk.token_ids)
            if len(tokens) == 10:
                cluster.kill_worker()
        assert tokens == reference(tiny_model, prompt_ids, MAX_NEW)
        # The lost slice was re-placed on the surviving node, and the service keeps serving.
        after = [s.node_id for s in client.model_info().slices]
        assert len(set(after)) == 1
        again = client.generate(prompt_token_ids=prompt_ids, max_new_tokens=MAX_NEW, ignore_eos=True)
        assert again.token_ids == tokens
    finally:
        _stop(serve, client)
