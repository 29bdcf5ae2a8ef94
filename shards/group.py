"""A tensor-parallel slice: a group of `spec.tensor_parallel` rank processes on one host that the gateway drives
as one stage, with `SliceRunner`'s interface (a Ray `SliceActor` or `LocalPipeline` hosts it like a runner).

Rank 0 runs in the caller's process; ranks 1 .. N-1 are child processes (`python -m qwen_relay.shards.group`,
not multiprocessing's spawn, which would re-run a Ray worker's main module), each with its own `SliceRunner`
holding its share of the layers (shards/tensor_parallel.py). They meet in a shared-memory buffer for the
all-reduces (shards/allreduce.py) and hear each call from rank 0 over a Unix socket pair. Every rank runs every
call; only rank 0's result leaves the group (all ranks hold the same hidden states and sample the same tokens).

A group lives and dies whole: a rank that dies (or a call that fails on one rank and not the others) raises
`GroupBroken` in rank 0, which stops the other ranks; the group's host then builds a new group (the Ray actor
exits and Ray restarts it; `LocalPipeline` rebuilds it in its recovery), whose caches stay shut until the
gateway replays every sequence into them. A child whose rank 0 is gone sees its socket close and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from .allreduce import GroupBroken, ShmCollectives, channel_path
from .batch import StepBatch
from .runner import SliceRunner, SliceSpec
from .stats import SliceStats
from .tensor_parallel import Shard

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0


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
        if spec.device.startswith("cuda") or (spec.device == "auto" and torch.cuda.is_available()):
            raise ValueError("--tensor-parallel runs CPU ranks only: GPU ranks need NCCL collectives, not written yet")
        if spec.threads == 0:  # the ranks run at once: the host's cores shared out, no OpenMP pool oversubscribed
            spec = dataclasses.replace(spec, threads=max(1, (os.cpu_count() or 1) // world))
        self.spec = spec
        self.broken = False
        path = channel_path()
        comm = ShmCollectives(path, 0, world, create=True)
        self._children: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        try:
            for rank in range(1, world):
                # A socket pair per child, its end inherited as a file descriptor: private to the two processes,
                # and a child that dies at any point (even before it runs a line) closes it, so rank 0 sees EOF.
                mine, theirs = socket.socketpair()
                with theirs:
                    self._children.append(subprocess.Popen(
                        [sys.executable, "-m", "qwen_relay.shards.group", str(theirs.fileno()), str(rank), path],
                        pass_fds=(theirs.fileno(),)))
                conn = Connection(mine.detach())
                conn.send(spec)
                self._conns.append(conn)
            self.runner = SliceRunner(spec, Shard(0, world), comm)  # loads while the children load
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
            comm.unlink()  # every rank has mapped it (or never will): nothing is left in /dev/shm
        log.info("layers %d-%d: tensor-parallel group of %d ranks (pids %s)", spec.first, spec.end - 1, world,
                 ", ".join(str(p) for p in [os.getpid(), *(c.pid for c in self._children)]))

    @property
    def slice(self):
        return self.runner.slice

    @property
    def collectives(self) -> ShmCollectives:
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
        """Stop the other ranks (closing their sockets ends them) and wait for them."""
        for conn in self._conns:
            conn.close()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._conns, self._children = [], []


def serve_rank(fd: int, rank: int, path: str) -> None:
    """A child rank: load its share, answer "ready", then run each call rank 0 sends until its socket closes."""
    conn = Connection(fd)
    spec: SliceSpec = conn.recv()
    try:
        runner = SliceRunner(spec, Shard(rank, spec.tensor_parallel),
                             ShmCollectives(path, rank, spec.tensor_parallel))
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
    group.serve_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
