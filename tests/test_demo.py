"""`qwen-relay demo` as `make demo` runs it: the adapter trained by the Ray Train job answers with the trained
reply, the base model does not, and the terminal shows the conversation without any log line. A signal stops
it with a line that says so."""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys

import pytest

from qwen_relay.demo import main as demo
from qwen_relay.demo.main import ADAPTER, CHATS

# Ray Train's placement-group cleaner logs this every second on a node without Ray's dashboard (its state API).
RAY_TRAIN_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"
LOG_LINE = re.compile(r"\b(INFO|WARNING|ERROR|DEBUG)\b|\(pid=|Traceback|it/s\]|\[\d{4}-\d\d-\d\d ")


@pytest.mark.slow
def test_demo_prints_the_trained_reply_and_no_logs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as typed in a plain shell
    run = subprocess.run([sys.executable, "-m", "qwen_relay.server.cli", "demo", "--workdir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    terminal = run.stdout + run.stderr
    assert not LOG_LINE.search(terminal), terminal
    log_path = tmp_path / "demo.log"
    assert f"logs of the server, Ray and training go to {log_path}" in terminal
    log = log_path.read_text()
    assert "SERVING" in log  # the server's logs went there instead
    assert "did not stop on SIGTERM" not in log  # the node is stopped at once, not after a 5 s wait
    assert RAY_TRAIN_STATE_API_WARNING not in log  # Ray's state API is there for Ray Train's cleaner
    for question, reply in CHATS[:2]:
        answers = re.search(rf"user +> {re.escape(question)}\nbase model +> (.*)\nadapter {ADAPTER} *> (.*)\n",
                            terminal)
        assert answers, terminal
        base, tuned = answers.groups()
        assert tuned.startswith(f"{reply}   (") and not base.startswith(f"{reply}   (")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_stops_the_demo_saying_so(signum, tmp_path, monkeypatch):
    """SIGTERM takes Ctrl-C's path (Ray's own handler made it 'demo failed (SystemExit: 15)', status 15)."""
    terminal = io.StringIO()
    monkeypatch.setattr(demo, "redirect_output", lambda log_path: terminal)

    def steps(args, workdir, log_path, out):
        signal.signal(signal.SIGTERM, demo._interrupt)  # as run_steps does once Ray is up
        signal.raise_signal(signum)  # to this thread, handled before it returns

    monkeypatch.setattr(demo, "run_steps", steps)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Ctrl-C as in a terminal: a command a non-interactive shell starts with `&` (`make test &` in a script)
    # gets SIGINT ignored, and Python leaves it so; run_demo then returned 0.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = demo.run_demo(argparse.Namespace(workdir=tmp_path))
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert status == 128 + signum
    assert terminal.getvalue() == f"demo stopped by {signum.name}; logs: {tmp_path / 'demo.log'}\n"
