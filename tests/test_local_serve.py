"""`qwen-relay serve` with the local Ray it starts itself, under the conditions users create: more slices than
cores, no RAY_AUTH_MODE in the environment (Ray's token authentication on), and signals to the whole process
group (Ctrl-C; `kill -- -PGID`, systemd's KillMode=control-group) while serving and while still loading.

Each case runs serve in a session of its own, so the test can signal serve's group as a terminal or systemd
would, and checks that serve exits 0 within --grace + 10 s leaving no process behind: none in serve's
session, none in the session of the Ray cluster it started. SIGTERM to serve alone also checks the drain: the
call in flight finishes, a new one is refused UNAVAILABLE; a second signal cuts the drain short.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from qwen_relay.client import RelayClient
from qwen_relay.ray_common.local_ray import _session_pids, free_port

pytestmark = pytest.mark.slow

GRACE = 5
THREE_SLICES = ["--layers", "0-0,1-3,4-4", "--local-ray-cpus", "2"]  # 3 slices on a 2-CPU node
NATIVE_DUMP = re.compile(r"Traceback|Fatal Python error|\*\*\* SIG|Stack trace|Check failure")


class Serve:
    """`qwen-relay serve` in its own session, its output in a file; by default in an environment without
    RAY_AUTH_MODE (`env` replaces it: a cluster's own)."""

    def __init__(self, model: Path, tmp_path: Path, *args: str, grace: float = GRACE, max_context: int = 512,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.log = tmp_path / "serve.log"
        self.grace = grace
        if env is None:
            env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qwen_relay.server.cli", "serve", "--model", str(model),
                 "--port", str(self.port), "--grace", str(grace), "--max-context", str(max_context), *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}):\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output}"
            time.sleep(0.2)

    def ray_session(self) -> int | None:
        """The session of the Ray cluster serve started (None with --no-ray or --ray-address: none of its own)."""
        if "--no-ray" in self.args or "--ray-address" in self.args:
            return None
        return int(re.search(r"its own session (\d+)", self.output).group(1))

    def stop_and_check(self, sig: signal.Signals, group: bool,
                       while_stopping: Callable[[], None] | None = None) -> float:
        """Send `sig` (to the group or to serve alone), run `while_stopping`; serve must exit 0 in time and
        leave nothing behind."""
        ray_sid = self.ray_session()
        started = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        if while_stopping is not None:
            while_stopping()
        assert self.proc.wait(self.grace + 10) == 0, self.output
        took = time.monotonic() - started
        assert _session_pids(self.proc.pid) == [], "processes left in serve's session"
        if ray_sid is not None:
            assert _session_pids(ray_sid) == [], "Ray processes left behind"
        assert not NATIVE_DUMP.search(self.output), self.output
        return took

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Stream:
    """A long greedy stream on a thread: the call in flight when serve is told to stop."""

    def __init__(self, client: RelayClient, max_new: int) -> None:
        self.chunks: list = []
        self.errors: list[grpc.RpcError] = []
        self.streaming = threading.Event()
        self.thread = threading.Thread(target=self._consume, args=(client, max_new))
        self.thread.start()
        assert self.streaming.wait(60)

    def _consume(self, client: RelayClient, max_new: int) -> None:
        try:
            for chunk in client.stream(prompt="Merhaba", max_new_tokens=max_new, ignore_eos=True):
                self.chunks.append(chunk)
                self.streaming.set()
        except grpc.RpcError as e:
            self.errors.append(e)
            self.streaming.set()

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


DRAIN_TOKENS = 400  # seconds of decoding: still running when the new call comes


def test_three_slices_on_two_cpus_serve_and_stop_cleanly_on_sigterm_to_the_group(tiny_model, tmp_path):
    """3 slices on a 2-CPU node, token authentication on, then systemd's SIGTERM to the whole group. (Ctrl-C,
    the same handler, is sent while loading: test_ctrl_c_while_loading_ends_the_load.)"""
    serve = Serve(tiny_model, tmp_path, *THREE_SLICES)
    try:
        serve.wait_for_line("app: SERVING")
        with RelayClient(f"127.0.0.1:{serve.port}", timeout=60) as client:
            assert client.health() == "SERVING"
            assert [s.first_layer for s in client.model_info().slices] == [0, 1, 4]
            assert client.generate("Merhaba", max_new_tokens=4, ignore_eos=True).completion_tokens == 4
            serve.stop_and_check(signal.SIGTERM, group=True)
    finally:
        serve.kill()
    assert "0.666 Ray CPU each" in serve.output
    assert "Token authentication" not in serve.output  # the mode is set explicitly: no warning either


def test_sigterm_to_serve_alone_drains(tiny_model, tmp_path):
    """An orchestrator stopping a container's main process: NOT_SERVING, a new call refused UNAVAILABLE while
    the running one finishes in the grace period. In-process slices (--no-ray): the drain is the gateway's.
    (Serve's Ray runs in a session of its own, so a signal to serve's group does not reach it either: serve
    stops it itself in both cases, as the 3-slice case above checks.)"""
    serve = Serve(tiny_model, tmp_path, "--no-ray", grace=60)
    try:
        serve.wait_for_line("app: SERVING")
        with RelayClient(f"127.0.0.1:{serve.port}", timeout=60) as client:
            running = Stream(client, DRAIN_TOKENS)
            refused: list[grpc.RpcError] = []

            def new_call_is_refused() -> None:
                serve.wait_for_line("requests for up to")  # the drain began
                assert client.health() == "NOT_SERVING"
                with pytest.raises(grpc.RpcError) as info:
                    client.generate(prompt="Merhaba", max_new_tokens=2, timeout=5)
                assert running.tokens < DRAIN_TOKENS  # refused while the running call still ran
                refused.append(info.value)

            serve.stop_and_check(signal.SIGTERM, group=False, while_stopping=new_call_is_refused)
            running.thread.join(60)
            assert [(e.code(), "shutting down" in e.details()) for e in refused] == [
                (grpc.StatusCode.UNAVAILABLE, True)]
            assert running.errors == [] and running.tokens == DRAIN_TOKENS
            assert running.chunks[-1].finish_reason == "length"
    finally:
        serve.kill()


def test_second_signal_stops_at_once_and_running_calls_end_unavailable(tiny_model, tmp_path):
    """A second signal cuts a 600 s grace period short; the call still running ends UNAVAILABLE (retry
    elsewhere), not CANCELLED. In-process slices (--no-ray): the point is the gateway's shutdown, not Ray's."""
    serve = Serve(tiny_model, tmp_path, "--no-ray", "--max-new-tokens-cap", "1000", grace=600, max_context=1024)
    try:
        serve.wait_for_line("qwen-relay listening on")
        with RelayClient(f"127.0.0.1:{serve.port}", timeout=60) as client:
            running = Stream(client, 1000)  # seconds of work left when the second signal comes
            serve.proc.send_signal(signal.SIGTERM)
            serve.wait_for_line("draining")
            started = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)
            assert serve.proc.wait(60) == 0
            stopped_in = time.monotonic() - started
            running.thread.join(60)
    finally:
        serve.kill()
    assert stopped_in < 30, serve.output  # nowhere near the 600 s grace period
    assert "second signal: stopping now" in serve.output
    assert [e.code() for e in running.errors] == [grpc.StatusCode.UNAVAILABLE], serve.output
    assert "shutting down" in running.errors[0].details()


def test_ctrl_c_while_loading_ends_the_load(tiny_model, tmp_path):
    """SIGINT to the group, as a terminal sends it, while the 3 slices load on 2 CPUs."""
    serve = Serve(tiny_model, tmp_path, *THREE_SLICES)
    try:
        serve.wait_for_line("loading 3 slices")
        serve.stop_and_check(signal.SIGINT, group=True)
    finally:
        serve.kill()
    assert "app: SERVING" not in serve.output and "signal received while starting" in serve.output


def test_a_request_that_cannot_fit_fails_at_once_and_says_why(tiny_model, tmp_path):
    """The local node's CPUs are known before Ray starts: refused before starting it, exit 2."""
    serve = Serve(tiny_model, tmp_path, *THREE_SLICES, "--cpus-per-slice", "1")
    try:
        assert serve.proc.wait(60) == 2
    finally:
        serve.kill()
    assert re.search(r"3 slices need 3 CPU in all .* local Ray node has 2 CPU .* change --cpus-per-slice",
                     serve.output), serve.output
    assert "starting local Ray" not in serve.output


def test_serve_killed_outright_takes_its_ray_cluster_with_it(tiny_model, tmp_path):
    """SIGKILL leaves serve no chance to clean up: the kernel signals `ray start` (PR_SET_PDEATHSIG), which
    stops the cluster and the slice actors on it. Killed once its Ray is up and the slice is loading: what
    runs on the cluster is not the point here, so the test does not wait for the slice."""
    serve = Serve(tiny_model, tmp_path, "--shards", "1", "--local-ray-cpus", "2")
    try:
        serve.wait_for_line("loading 1 slice (")
        ray_sid = serve.ray_session()
        serve.proc.kill()
        serve.proc.wait()
        deadline = time.monotonic() + 30
        while _session_pids(ray_sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_pids(ray_sid) == [], "Ray processes outlived serve"
    finally:
        serve.kill()
