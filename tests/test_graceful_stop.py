"""`qwen-relay serve` as users run it: SIGTERM means NOT_SERVING, no new calls, in-flight calls finish
within the grace period, then the slices are released and the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from qwen_relay.client import RelayClient

pytestmark = pytest.mark.slow  # starts Ray actors, subprocesses or a cluster: `make test-fast` skips it


def test_sigterm_drains_in_flight_calls(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_relay.server.cli", "serve", "--model", str(tiny_model), "--shards", "2",
         "--port", str(port), "--grace", "60", "--max-context", "512"],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    client = RelayClient(f"127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not come up"
            try:
                if client.health(timeout=2) == "SERVING":
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)

        chunks = []
        streaming = threading.Event()

        def consume() -> None:
            for chunk in client.stream(prompt="Merhaba", max_new_tokens=400, ignore_eos=True):
                chunks.append(chunk)
                streaming.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert streaming.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # new calls are refused while the old one drains
            client.generate(prompt="Merhaba", max_new_tokens=2, timeout=5)
            refused = None
        except grpc.RpcError as e:
            refused = e.code()
        reader.join(120)
        assert proc.wait(120) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert sum(len(c.token_ids) for c in chunks) == 400 and chunks[-1].finish_reason == "length"
    assert f"listening on 127.0.0.1:{port}" in output and "layers 0-2" in output and "layers 3-4" in output
    assert "stopped" in output
