"""`qwen-relay demo` as `make demo` runs it: the adapter trained by the Ray Train job answers with the trained
reply, the base model does not, and the terminal shows the conversation without any log line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from qwen_relay.demo.main import ADAPTER, CHATS

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"\b(INFO|WARNING|ERROR|DEBUG)\b|\(pid=|Traceback|it/s\]|\[\d{4}-\d\d-\d\d ")


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
    for question, reply in CHATS[:2]:
        answers = re.search(rf"user +> {re.escape(question)}\nbase model +> (.*)\nadapter {ADAPTER} *> (.*)\n",
                            terminal)
        assert answers, terminal
        base, tuned = answers.groups()
        assert tuned.startswith(f"{reply}   (") and not base.startswith(f"{reply}   (")
