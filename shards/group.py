"""A tensor-parallel slice: a group of `spec.tensor_parallel` rank processes on one host that the gateway drives
as one stage, with `SliceRunner`'s interface (a Ray `SliceActor` or `LocalPipeline` hosts it like a runner).

Rank 0 runs in the caller's process; ranks 1 .. N-1 are child processes (`python -m qwen_relay.shards.group`,
not multiprocessing's spawn, which would re-run a Ray worker's main module), each with its own `SliceRunner`
holding its share of the layers (shards/tensor_parallel.py). They meet for the all-reduces in a shared-memory
buffer on a CPU (shards/allreduce.py) or a torch.distributed process group, NCCL between GPUs
(shards/collectives.py; rank r on the r-th GPU the host process sees), and hear each call from rank 0 over a
Unix socket pair. Every rank runs every call; only rank 0's result leaves the group (all ranks hold the same
hidden states and sample the same tokens).

A group lives and dies whole: a rank that dies (or a call that fails on one rank and not the others) raises
`GroupBroken` in rank 0, which stops the other ranks; the group's host then builds a new group (the Ray actor
exits and Ray restarts it; `LocalPipeline` rebuilds it in its recovery), whose caches stay shut until the
gateway replays every sequence into them. A child whose rank 0 is gone sees its socket close and exits, or, if
it is waiting in a collective that will never complete (NCCL), notices that its parent changed and exits. Over
NCCL, which cannot see a dead peer, rank 0's host watches its children while the group lives and aborts the
process group when one dies, which ends the collective rank 0 waits in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from .allreduce import WAKE_S, GroupBroken, ShmCollectives, channel_path
from .batch import StepBatch
from .collectives import Collectives, TorchCollectives, choose_collective, rank_devices, untrace
from .runner import SliceRunner, SliceSpec
from .stats import SliceStats
from .tensor_parallel import Shard

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
PARENT_WAKE_S = 0.5  # a child rank's checks that its rank 0 still lives


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as plain bytes for a child rank: pickling the tensor itself would share its storage through
    multiprocessing's resource sharer, which only processes multiprocessing started may use."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorBytes:
        flat = tensor.detach().cpu().contiguous().view(-1)
        return cls(tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).view(self.shape)


class GroupRunner:
    """Ranks 0 .. N-1 of one slice; rank 0 here. `forward_seconds`/`steps` as a runner's, from rank 0."""

    def __init__(self, spec: SliceSpec) -> None:
        world = spec.tensor_parallel
        devices = rank_devices(spec.device, world, torch.cuda.device_count())  # refuses too few GPUs
        kind = choose_collective(spec.collective, devices[0])
        if spec.threads == 0:  # the ranks run at once: the host's cores shared out, no OpenMP pool oversubscribed
            spec = dataclasses.replace(spec, threads=max(1, (os.cpu_count() or 1) // world))
        self.spec = spec
        self.broken = False
        self._children: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._rendezvous: str | None = None  # the torch collectives' private store folder
        self._closed = threading.Event()
        self._comm: Collectives | None = None
        shm = None
        if kind == "shm":
            path = channel_path()
            shm = ShmCollectives(path, 0, world, create=True)
        else:
            self._rendezvous = tempfile.mkdtemp(prefix="qwen-relay-tp-")  # mode 0700: this user's alone
            path = os.path.join(self._rendezvous, "store")
        try:
            for rank in range(1, world):
                # A socket pair per child, its end inherited as a file descriptor: private to the two processes,
                # and a child that dies at any point (even before it runs a line) closes it, so rank 0 sees EOF.
                mine, theirs = socket.socketpair()
                with theirs:
                    self._children.append(subprocess.Popen(
                        [sys.executable, "-m", "qwen_relay.shards.group", str(theirs.fileno()), str(rank), path,
                         str(os.getpid())],
                        pass_fds=(theirs.fileno(),)))
                conn = Connection(mine.detach())
                conn.send(spec)
                self._conns.append(conn)
            comm = self._comm = shm or TorchCollectives(path, 0, world, torch.device(devices[0]),
                                                        peers_alive=self._check_children)
            if kind == "torch":  # NCCL cannot see a dead peer: this thread aborts the group for it
                threading.Thread(target=self._watch, args=(comm,), daemon=True, name="tp-group-watch").start()
            # Rank 0 loads while the children load.
            self.runner = SliceRunner(dataclasses.replace(spec, device=devices[0]), Shard(0, world), comm)
            for rank, conn in enumerate(self._conns, start=1):
                if not conn.poll(START_TIMEOUT_S):
                    raise GroupBroken(f"tensor-parallel rank {rank} did not load within {START_TIMEOUT_S:g} s")
                error = self._answer(rank, conn)
                if error is not None:
                    raise GroupBroken(f"tensor-parallel rank {rank} failed to load: {error}")
        except BaseException:
            self.close()
            raise
        finally:
            if shm is not None:
                shm.unlink()  # every rank has mapped it (or never will): nothing is left in /dev/shm
        log.info("layers %d-%d: tensor-parallel group of %d ranks on %s over %s (pids %s)", spec.first,
                 spec.end - 1, world, ", ".join(dict.fromkeys(devices)),
                 "shared memory" if kind == "shm" else comm.backend,
                 ", ".join(str(p) for p in [os.getpid(), *(c.pid for c in self._children)]))

    def _check_children(self) -> None:
        """Raise `GroupBroken` for a child rank that has exited (with what it said, if it said why)."""
        for rank, (child, conn) in enumerate(zip(self._children, self._conns, strict=True), start=1):
            if child.poll() is not None:
                said = ""
                try:
                    if conn.poll(0):
                        said = f": {conn.recv()}"
                except (EOFError, OSError):
                    pass
                raise GroupBroken(f"tensor-parallel rank {rank} exited with status {child.returncode}{said}")

    def _watch(self, comm: TorchCollectives) -> None:
        """While the group lives: abort its collectives as soon as a child rank dies, so rank 0, which may be
        waiting in one (NCCL waits on the GPU forever), gets out; the step then fails on the dead child's
        closed socket and the group is broken."""
        while not self._closed.wait(WAKE_S):
            dead = [rank for rank, child in enumerate(self._children, start=1) if child.poll() is not None]
            if dead:
                log.warning("tensor-parallel rank(s) %s died: aborting the group's collectives", dead)
                comm.abort()
                return

    @property
    def slice(self):
        return self.runner.slice

    @property
    def collectives(self) -> Collectives:
        return self.runner.collectives

    def _answer(self, rank: int, conn: Connection) -> str | None:
        """What rank `rank` answered: None, or the error it raised ("Type: message")."""
        try:
            return conn.recv()
        except (EOFError, OSError) as e:
            raise GroupBroken(f"tensor-parallel rank {rank} is gone") from e

    def _all(self, method: str, *args) -> object:
        """Run `method` on every rank at once; rank 0's result. An error every rank raised (a cache the gateway
        has not reset yet refuses a step on every rank, before any collective) leaves the group whole; a rank
        gone, or ranks that disagree, break it."""
        if self.broken:
            raise GroupBroken("this tensor-parallel group is broken: it must be rebuilt")
        try:
            message = (method, tuple(TensorBytes.of(a) if isinstance(a, torch.Tensor) else a for a in args))
            for rank, conn in enumerate(self._conns, start=1):
                try:
                    conn.send(message)
                except OSError as e:
                    raise GroupBroken(f"tensor-parallel rank {rank} is gone") from e
            try:
                result, error = getattr(self.runner, method)(*args), None
            except GroupBroken:
                raise
            except Exception as e:  # noqa: BLE001 - raised below once the other ranks have answered
                result, error = None, e
            answers = [self._answer(rank, conn) for rank, conn in enumerate(self._conns, start=1)]
        except BaseException:
            self.broken = True
            self.close()
            raise
        mine = None if error is None else f"{type(error).__name__}: {error}"
        if any(answer != mine for answer in answers):
            self.broken = True
            self.close()
            raise GroupBroken(f"tensor-parallel ranks disagree on {method}: rank 0 {mine or 'ok'}, the others "
                              f"{[a or 'ok' for a in answers]}") from error
        if error is not None:
            raise error
        return result

    def step(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int]:
        return self._all("step", batch, hidden)

    def reset(self) -> None:
        self._all("reset")

    def warmup(self) -> None:
        self._all("warmup")

    def load_adapter(self, name: str, path: str, fingerprint: str = "") -> dict:
        """Every rank takes its share (shards/tensor_parallel.py, `shard_lora`); rank 0's description."""
        return self._all("load_adapter", name, path, fingerprint)

    def unload_adapter(self, name: str) -> None:
        self._all("unload_adapter", name)

    @property
    def forward_seconds(self) -> float:
        return self.runner.forward_seconds

    @property
    def steps(self) -> int:
        return self.runner.steps

    def stats(self) -> SliceStats:
        """Rank 0's, with the group's weights and caches (each rank holds 1/N of them)."""
        mine = self.runner.stats()
        world = self.spec.tensor_parallel
        return dataclasses.replace(mine, weight_bytes=mine.weight_bytes * world, cache_bytes=mine.cache_bytes * world)

    def close(self) -> None:
        """Stop the other ranks (closing their sockets ends them), wait for them, release the process group."""
        self._closed.set()
        for conn in self._conns:
            conn.close()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._conns, self._children = [], []
        if isinstance(self._comm, TorchCollectives):
            self._comm.close()
        elif self._comm is not None:
            untrace(self._comm)
        if self._rendezvous is not None:
            shutil.rmtree(self._rendezvous, ignore_errors=True)
            self._rendezvous = None


def _exit_with(parent: int) -> None:
    """End this child rank once its rank 0's process is gone, even while the main thread waits in a collective
    that will never complete (NCCL's wait on the GPU)."""
    while os.getppid() == parent:
        time.sleep(PARENT_WAKE_S)
    log.warning("tensor-parallel rank 0 (pid %d) is gone: exiting", parent)
    os._exit(1)


def serve_rank(fd: int, rank: int, path: str, parent: int) -> None:
    """A child rank: load its share, answer "ready", then run each call rank 0 sends until its socket closes.
    `parent`: rank 0's pid, as rank 0 said (a parent that died while this child imported torch is already
    someone else by now)."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="tp-parent-watch").start()
    conn = Connection(fd)
    spec: SliceSpec = conn.recv()
    world = spec.tensor_parallel

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise GroupBroken(f"tensor-parallel rank {rank}: rank 0 (pid {parent}) is gone")

    try:
        device = rank_devices(spec.device, world, torch.cuda.device_count())[rank]
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # NCCL and the caching allocator: this rank's GPU, never GPU 0
        comm: Collectives = (
            ShmCollectives(path, rank, world) if choose_collective(spec.collective, device) == "shm"
            else TorchCollectives(path, rank, world, torch.device(device), peers_alive=parent_alive))
        runner = SliceRunner(dataclasses.replace(spec, device=device), Shard(rank, world), comm)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which fails the group's start
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send(None)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 closed the group, or died
        try:
            getattr(runner, method)(*(a.tensor() if isinstance(a, TensorBytes) else a for a in args))
        except Exception as e:  # noqa: BLE001 - rank 0 compares it with its own outcome
            log.warning("tensor-parallel rank %d: %s raised %s: %s", rank, method, type(e).__name__, e)
            conn.send(f"{type(e).__name__}: {e}")
            if isinstance(e, GroupBroken):
                return
            continue
        conn.send(None)


if __name__ == "__main__":
    from qwen_relay.shards import group  # the module's own classes (TensorBytes), not this script's copies

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    group.serve_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
