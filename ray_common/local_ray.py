"""The local Ray cluster that `serve`, `train` (and the demo) start when no `--ray-address` is given.

It runs as `ray start --head --block` in a session of its own (docs/local-ray.md):

- a signal to serve's process group (Ctrl-C, `kill -- -PGID`, systemd's `KillMode=control-group`) reaches the
  gateway only, so the gateway drains its calls on a live cluster and then stops Ray itself;
- stopping it is exact: every process in that session is ours (the raylet's workers included), and nothing
  else on the machine is touched;
- if serve is SIGKILLed, the kernel sends `ray start` SIGTERM (PR_SET_PDEATHSIG), and `ray start --block`
  stops the processes it started; its own children die with it the same way (Ray's fate sharing).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
STARTED_LINE = "Ray runtime started."
NODE_TIMEOUT_LINE = "timed out during startup"  # Ray gives the raylet 30 s, too little on a loaded machine
START_ATTEMPTS = 2
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0
# Ray starts one worker per CPU ahead of time when the first driver connects. serve's slices never run in them
# (they carry environment variables, so each gets a worker of its own): they idled until Ray stopped them, a
# Python process each, started while the slices load. Ray Train starts its actors' workers as needed just as well.
PRESTART_ENV = "RAY_prestart_worker_first_driver"
FIXED_PORTS_START = 20000  # Ray's workers take 10002-19999 (`ray start --max-worker-port`'s default)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_PR_SET_PDEATHSIG = 1


def local_ray_auth_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The authentication settings for a Ray cluster this process starts for itself on this machine.

    Token authentication stays on (Ray's default), with a fresh random token for this cluster alone, handed
    to Ray and to this driver through the environment: Ray listens on every interface even for a node given
    `--node-ip-address=127.0.0.1` (which it replaces by the machine's address), loopback alone would not keep
    out the other users of a shared machine, and anyone who reaches Ray's ports runs code as us. A per-cluster
    token in the environment never touches `~/.ray/auth_token` (which another cluster of the same user may rely
    on) and, as the mode is then set explicitly, Ray prints no warning. A mode the user set (`RAY_AUTH_MODE=disabled`
    or `token` with their own token) is respected as is: an empty dict.
    """
    if environ.get(AUTH_MODE_ENV):
        return {}
    return {AUTH_MODE_ENV: "token", AUTH_TOKEN_ENV: secrets.token_hex(32)}


class RayStartTimeout(RuntimeError):
    """`ray start` gave up waiting for its own raylet: worth one more try."""


def _use_env(env: dict[str, str]) -> None:
    """Put `env` in this process's environment (Ray's children inherit it) and make Ray see it here too."""
    os.environ.update(env)
    if env and "ray" in sys.modules:  # Ray reads these once; refresh as its own token set-up does
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _ephemeral_ports_start() -> int:
    """Where the kernel's ephemeral range begins: the ports it hands out to a bind to port 0."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    return 32768  # Linux's default


def free_port() -> int:
    """A loopback port that nothing listens on now, for a server started next by another process.

    Taken between Ray's worker ports and the kernel's ephemeral range where there is room. A port found free by
    binding port 0 lies in the ephemeral range, where Ray picks the ports of its own processes while a node
    starts (random ones above a port-0 bind's): one of them could take it before the process it was meant for,
    which then fails to bind and takes the node down.
    """
    end = _ephemeral_ports_start()
    for _ in range(100):
        port = FIXED_PORTS_START + secrets.randbelow(end - FIXED_PORTS_START) if end > FIXED_PORTS_START else 0
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]
    raise RuntimeError(f"no free loopback port found between {FIXED_PORTS_START} and {end}")


def _die_with_parent() -> None:
    """`preexec_fn` of `ray start`: SIGTERM when the thread that started it ends (serve killed outright)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _session_pids(sid: int) -> list[int]:
    """Every live process in session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
                pids.append(int(stat.parent.name))
    return pids


def local_ray_cpus(requested: int | None) -> int:
    """The CPUs the local node gets: as asked, else every core of this machine."""
    return requested or os.cpu_count() or 1


@dataclass
class LocalRay:
    """A running single-node Ray cluster of this process, reached at 127.0.0.1 (Ray itself listens on every
    interface: see `local_ray_auth_env`); `await LocalRay.start(...)`, then `stop()`."""

    address: str
    num_cpus: int
    temp_dir: str
    process: subprocess.Popen
    log_path: str
    log_offset: int  # where this cluster's output starts in log_path (the demo shares one log)

    @classmethod
    async def start(cls, num_cpus: int | None = None, num_gpus: int | None = None,
                    log_path: str | None = None, dashboard: bool = False) -> LocalRay:
        """Start it and wait until it runs. Call from the main thread (see `_die_with_parent`).

        Its auth settings (`local_ray_auth_env`) go into this process's environment too, so `ray.init` here
        and everything Ray starts agree. Cancelling the wait (a signal) stops what was started.

        `dashboard`: also run Ray's dashboard (on loopback, behind the same token), which serves Ray's state
        API. Ray Train needs it: its placement-group cleaner asks that API every second whether the run's
        controller is alive, and without it logs a warning each time. serve does without (~1 CPU-s less).
        """
        _use_env(local_ray_auth_env())
        for attempt in range(1, START_ATTEMPTS + 1):
            ray = cls._launch(local_ray_cpus(num_cpus), num_gpus, log_path, dashboard)
            try:
                await ray._wait_started()
                return ray
            except RayStartTimeout:
                ray.stop()
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("local Ray timed out while starting (a busy machine?): trying again")
            except BaseException:
                ray.stop()
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _launch(cls, num_cpus: int, num_gpus: int | None, log_path: str | None, dashboard: bool) -> LocalRay:
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="qr-", dir="/tmp")  # short: Ray's socket paths have a length limit
        log_path = log_path or os.path.join(temp_dir, "ray-start.log")
        # This interpreter, not the `ray` script's: Ray's workers run the Python that started the node, and they
        # must import the same code as this process (ray.init() does the same).
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   f"--port={port}", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={num_cpus}", f"--include-dashboard={str(dashboard).lower()}",
                   "--disable-usage-stats", f"--temp-dir={temp_dir}"]
        if dashboard:
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"]
        if num_gpus is not None:
            command.append(f"--num-gpus={num_gpus}")
        out = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        offset = out.tell()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={PRESTART_ENV: "0", **os.environ}, start_new_session=True,
                                   preexec_fn=_die_with_parent)
        out.close()
        log.info("starting local Ray (%d CPUs) at 127.0.0.1:%d, its own session %d; its log: %s", num_cpus, port,
                 process.pid, log_path)
        return cls(address=f"127.0.0.1:{port}", num_cpus=num_cpus, temp_dir=temp_dir, process=process,
                   log_path=log_path, log_offset=offset)

    def _log(self) -> str:
        """What `ray start` has written so far."""
        with open(self.log_path, errors="replace") as f:
            f.seek(self.log_offset)
            return f.read()

    async def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED_LINE not in (output := self._log()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                error = RayStartTimeout if NODE_TIMEOUT_LINE in output else RuntimeError
                raise error(f"local Ray did not start (exit status {self.process.poll()}); the end of "
                            f"{self.log_path}:\n{output[-2000:]}")
            await asyncio.sleep(0.2)

    def stop(self, grace: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to `ray start` (it stops what it started, ~2 s), then SIGKILL whatever of its session is left
        after `grace` seconds. A node that ran Ray Train does not stop on SIGTERM (its workers while training,
        and the helper actors it leaves behind after): train and the demo, with everything on disk, pass no
        grace at all."""
        sid = self.process.pid
        self.process.terminate()
        deadline = time.monotonic() + grace
        while (left := _session_pids(sid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)
        if left and grace > 0:
            log.warning("local Ray: %d processes did not stop on SIGTERM and were killed", len(left))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        log.info("local Ray stopped")
