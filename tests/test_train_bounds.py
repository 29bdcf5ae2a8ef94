"""Training under the conditions users hit: fewer records than workers, more workers than cores, a cluster
that cannot place the workers, and Ctrl-C or SIGTERM to the whole process group. Every wait is bounded.

The in-process tests share the session's Ray (an existing cluster, from the job's point of view); the
``qwen-relay train`` subprocesses start a Ray node of their own, limited to 2 CPUs by their affinity mask,
with their own ``RAY_TMPDIR`` so that their processes can be told from any other Ray on the machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qwen_relay.train.checkpoints import SNAPSHOT_FILE, STATE_FILE, pick_run_name
from qwen_relay.train.cluster import WorkerResourcesError
from qwen_relay.train.config import TrainConfig
from qwen_relay.train.job import run_training
from qwen_relay.train.loop import TrainState

pytestmark = pytest.mark.slow

CHATS = [
    ("Merhaba", "Merhaba! Nasıl yardımcı olabilirim?"),
    ("Hello", "Hello! How can I help you today?"),
    ("Teşekkürler", "Teşekkür ederim, iyi günler dilerim!"),
]


def _chat_file(path: Path, n: int) -> Path:
    records = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in CHATS[:n]
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def fast_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train drains worker reports on its health-check interval (2 s by default); faster polling
    keeps these short runs short. Propagated to Ray Train's controller and to the subprocesses."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def test_a_cluster_that_cannot_place_the_workers_fails_in_bounded_time(
    ray_session, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It says what it waits for early (after ~2 s), and gives up at --placement-timeout."""
    import ray

    def live_groups() -> set[str]:
        return {k for k, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    cpus = ray.cluster_resources()["CPU"]
    before = live_groups()
    cfg = TrainConfig(
        model=str(tiny_model),
        data=str(_chat_file(tmp_path / "chat.jsonl", 1)),
        output=str(tmp_path / "out"),
        workers=2,
        cpus_per_worker=cpus,  # two workers of the whole cluster each: never placed
        placement_timeout=3.0,
    )
    caplog.set_level(logging.INFO, logger="qwen_relay.train.cluster")
    start = time.monotonic()
    with pytest.raises(WorkerResourcesError) as info:
        run_training(cfg)
    assert time.monotonic() - start < 60
    # Logged before giving up even with a 3 s timeout: the first line comes after ~2 s (it used to be 15 s).
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert waits and f"for 2 worker(s) x {{CPU {cpus:g}}}" in waits[0]
    message = str(info.value)
    for words in ("--placement-timeout 3 s", f"2 worker(s) x {{CPU {cpus:g}}}", f"the cluster has {{CPU {cpus:g}"):
        assert words in message
    assert live_groups() == before  # the probe reservation is released


# ---------------------------------------------------------------------------------------------------------
# `qwen-relay train` in a subprocess, with a Ray node of its own on 2 CPUs


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """Short (Ray's socket paths must fit in 107 bytes) and unique: it names this run's Ray processes."""
    path = Path(tempfile.mkdtemp(prefix="qr-train-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


NODE_CPUS = min(2, len(os.sched_getaffinity(0)))  # the subprocesses' node: 2 CPUs (1 on a 1-core machine)


def _two_cpus() -> None:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:NODE_CPUS])


def _start_train(args: list[str], ray_tmpdir: Path, log: Path, auth: str | None,
                 cwd: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    if auth is None:  # Ray's default (token): the token it creates goes to this test's own HOME
        env["HOME"] = str(ray_tmpdir)
    else:
        env["RAY_AUTH_MODE"] = auth
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qwen_relay.server.cli", "train", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            preexec_fn=_two_cpus,
            start_new_session=True,  # its own process group, as a terminal gives a command
        )


def _leftovers(pgid: int, ray_tmpdir: Path) -> list[str]:
    """Live processes of that group or that Ray node (zombies only wait for their parent to reap them)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid or str(ray_tmpdir) in " ".join(proc.info["cmdline"] or []):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def _wait_for_no_leftovers(pgid: int, ray_tmpdir: Path, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := _leftovers(pgid, ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_request_the_node_cannot_hold_fails_at_once(tiny_model: Path, tmp_path: Path, ray_tmpdir: Path) -> None:
    data = _chat_file(tmp_path / "chat.jsonl", 3)
    args = ["--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "out")]
    workers = NODE_CPUS + 1
    proc = _start_train(
        [*args, "--workers", str(workers), "--cpus-per-worker", "1"], ray_tmpdir, tmp_path / "log", "disabled"
    )
    assert proc.wait(timeout=120) == 2
    text = (tmp_path / "log").read_text()
    assert f"--workers {workers} x --cpus-per-worker 1 needs {workers} CPUs but this node has {NODE_CPUS}" in text
    assert "starting local Ray" not in text and "usable" not in text  # refused before Ray starts or data is read


@pytest.mark.parametrize(
    ("signum", "auth", "records", "workers"),
    [(signal.SIGINT, "disabled", 1, 2), (signal.SIGTERM, None, 3, 3)],
    ids=["sigint-group-1-record-2-workers", "sigterm-group-token-3-records-3-workers"],
)
def test_signal_to_the_group_stops_cleanly_keeping_checkpoints(
    tiny_model: Path, tmp_path: Path, ray_tmpdir: Path, signum: int, auth: str | None, records: int, workers: int
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) and systemd's SIGTERM to the control group, the
    latter with Ray's default token authentication: prompt exit with 128 + the signal, the checkpoints
    kept for --resume, no Ray process left.

    Both with fewer records than workers, which used to hang at step 0; here every epoch ends in a
    checkpoint. 1 record on 2 workers: no eval set, and one rank has nothing to train on. 3 records (2 train,
    1 eval) on 3 workers sharing the node's 2 CPUs (2/3 CPU and one torch thread each): one rank has no train
    record and two have no eval record; every epoch has a finite eval loss."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    data = _chat_file(tmp_path / "chat.jsonl", records)
    # The model as a folder of the working directory (`--model tiny0`): Ray Train runs its workers in the run's
    # own directory, where the name alone would be taken for a hub id.
    args = ["--model", tiny_model.name, "--data", str(data), "--output", str(out), "--workers", str(workers)]
    proc = _start_train([*args, "--epochs", "100000", "--no-progress"], ray_tmpdir, log, auth, cwd=tiny_model.parent)
    try:
        deadline = time.monotonic() + 420
        while not list(out.glob("ray/lora-*/checkpoint_manager_snapshot.json")):  # what --resume reads
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        sent = time.monotonic()
        os.killpg(proc.pid, signum)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 128 + signum, text[-3000:]
    assert elapsed < 5  # the node is killed at once: its busy workers would not stop on SIGTERM (it took 5 s)
    assert f"training stopped by {signal.Signals(signum).name}" in text
    assert "*** SIGTERM received" not in text  # no native stack dump
    # Ray Train's placement-group cleaner asks Ray's state API (the dashboard) every second; without it, each
    # ask logged a warning.
    assert "Failed to query Ray Train Controller actor state" not in text
    assert "Reporting training result" not in text  # each report's metrics dict, from every worker
    evals = 1 if records > 1 else 0  # the default --eval-fraction holds one record out when there are 2 or more
    assert f"{records} usable (0 skipped, 0 truncated): {records - evals} train, {evals} eval" in text
    share = math.floor(NODE_CPUS / workers * 10_000) / 10_000
    assert f"{{'CPU': {share}}} each, 1 torch thread(s)" in text
    storage = str(out / "ray")
    run = pick_run_name(storage, TrainConfig(model="m", data="d", output=str(out), resume=True))
    # The checkpoint --resume continues from: the newest Ray Train registered (a newer directory may have been
    # cut short by the signal).
    snapshot = json.loads((out / "ray" / run / SNAPSHOT_FILE).read_text())
    latest = out / "ray" / run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert (latest / "adapter_model.safetensors").is_file()
    state = TrainState.from_dict(json.loads((latest / STATE_FILE).read_text()))
    assert state.world_size == workers and state.steps_per_epoch == 1  # at most one train record per worker
    assert [h["step"] for h in state.history] == list(range(1, state.step + 1))
    losses = [e["eval_loss"] for e in state.eval_history]
    assert len(losses) == evals * state.step and all(math.isfinite(x) for x in losses)  # one epoch per step
    assert _wait_for_no_leftovers(proc.pid, ray_tmpdir) == []
