"""`qwen-relay serve` as users run it: SIGTERM means NOT_SERVING, no new calls, in-flight calls finish
within the grace period, then the slices are released and the process exits 0. A second signal cuts the grace
period short, and calls still running then end UNAVAILABLE (retry elsewhere), not CANCELLED."""

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



class Serve:
    """`qwen-relay serve` in a subprocess, its output read line by line so a test can wait for a line."""

    def __init__(self, model, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_relay.server.cli", "serve", "--model", str(model), "--shards", "2",
             "--port", str(self.port), "--max-context", "512", *flags],
            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.client = RelayClient(f"127.0.0.1:{self.port}", timeout=60)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 180) -> None:
        with self._seen:
            assert self._seen.wait_for(lambda: any(text in line for line in self.lines) or self.proc.poll()
                                       is not None, timeout), f"no {text!r} in {timeout} s"
        assert any(text in line for line in self.lines), "".join(self.lines)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _stream_in_background(client: RelayClient, chunks: list, errors: list,
                          max_new: int = 400) -> tuple[threading.Thread, threading.Event]:
    streaming = threading.Event()

    def consume() -> None:
        try:
            for chunk in client.stream(prompt="Merhaba", max_new_tokens=max_new, ignore_eos=True):
                chunks.append(chunk)
                streaming.set()
        except grpc.RpcError as e:
            errors.append(e)
            streaming.set()

    reader = threading.Thread(target=consume)
    reader.start()
    return reader, streaming


def test_sigterm_drains_in_flight_calls(tiny_model):
    serve = Serve(tiny_model, "--grace", "60")
    try:
        serve.wait_for("qwen-relay listening on")
        chunks, errors = [], []
        reader, streaming = _stream_in_background(serve.client, chunks, errors)
        assert streaming.wait(60)
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_for("requests for up to")  # Relay.stop began: new calls are refused while the old one drains
        try:
            serve.client.generate(prompt="Merhaba", max_new_tokens=2, timeout=5)
            refused = None
        except grpc.RpcError as e:
            refused = e.code()
        reader.join(120)
        assert serve.proc.wait(120) == 0
    finally:
        serve.close()
    output = serve.output
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert errors == []
    assert sum(len(c.token_ids) for c in chunks) == 400 and chunks[-1].finish_reason == "length"
    assert f"listening on 127.0.0.1:{serve.port}" in output and "layers 0-2" in output and "layers 3-4" in output
    assert "stopped" in output


def test_second_signal_stops_at_once_and_running_calls_end_unavailable(tiny_model):
    """In-process slices (--no-ray): the point is the gateway's shutdown, not Ray's."""
    serve = Serve(tiny_model, "--no-ray", "--grace", "600", "--max-context", "1024", "--max-new-tokens-cap", "1000")
    try:
        serve.wait_for("qwen-relay listening on")
        chunks, errors = [], []  # 1000 tokens: seconds of work left when the second signal comes
        reader, streaming = _stream_in_background(serve.client, chunks, errors, max_new=1000)
        assert streaming.wait(60)
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_for("draining")
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 0
        stopped_in = time.monotonic() - started
        reader.join(60)
    finally:
        serve.close()
    assert stopped_in < 30, serve.output  # nowhere near the 600 s grace period
    assert "second signal: stopping now" in serve.output
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE], serve.output
    assert "shutting down" in errors[0].details()
