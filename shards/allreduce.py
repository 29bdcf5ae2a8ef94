"""All-reduce and all-gather between the ranks of one tensor-parallel group on one host, through shared memory.

Between CPU processes, gloo took ~1.1-1.3 ms per all-reduce of a 16 x 896 fp32 tensor on the 2-core machine
this project is measured on, two per layer: more than the matmuls it splits. vLLM's CPU backend uses a
shared-memory all-reduce instead; this is the simplest one that is correct:

- one file in /dev/shm, mapped by every rank: a 64-byte header line per rank (its arrival counter and pid) and
  two data buffers per rank (`capacity` bytes each), used alternately;
- a collective copies the rank's part into its own buffer, bumps its counter, and spins until every counter
  has reached the same value; then each rank reads all buffers and sums (or concatenates) them in rank order,
  so every rank ends with the same bytes (ranks keep identical residual streams and sample the same token);
- two buffers make one barrier per call enough: a rank writing call n + 2's part into the buffer call n used
  has passed call n + 1's barrier, which every rank reaches only after reading call n;
- a tensor larger than a buffer goes in chunks, one barrier each.

A rank waiting on a peer checks, every few thousand spins, that the peer's process is alive; a dead peer (or no
progress within `timeout`) raises `GroupBroken`, so a rank that dies takes its group down instead of hanging it.

The file is unlinked once every rank has mapped it (`unlink`), so nothing is left in /dev/shm when the group
goes. Ordering: on x86-64 (total store order) a peer that sees a counter also sees the data written before it;
on other architectures this needs fences and is refused.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import time
import uuid
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

LINE = 64  # bytes of header per rank: its own cache line, so counters never share one
CAPACITY = 4 << 20  # bytes per buffer: a 16 x 896 fp32 hidden state is 56 KiB, a prefill chunk a few MiB
SPINS = 256  # busy polls between yields to the scheduler
LIVENESS_EVERY = 4096  # polls between checks that waited-on peers still live
TIMEOUT_S = 60.0


class GroupBroken(RuntimeError):
    """A rank of this tensor-parallel group died or stopped answering: the group must be re-formed."""


def channel_path() -> str:
    """A fresh name for a group's shared-memory file."""
    return f"/dev/shm/qwen-relay-tp-{uuid.uuid4().hex}"


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a dead child its parent has not reaped yet (a zombie) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ShmCollectives:
    """Rank `rank` of `world` over the shared file `path` (created by rank 0 with `create=True` before the
    others attach)."""

    def __init__(self, path: str, rank: int, world: int, *, create: bool = False, capacity: int = CAPACITY,
                 timeout: float = TIMEOUT_S) -> None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError("the shared-memory all-reduce relies on x86-64's store ordering")
        self.path, self.rank, self.world, self.capacity, self.timeout = path, rank, world, capacity, timeout
        size = world * LINE + 2 * world * capacity
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        header = self._map[: world * LINE].view(np.int64).reshape(world, LINE // 8)
        self._counters = header[:, 0]  # a strided view: one int64 per rank, a line apart
        self._pids = header[:, 1]
        self._data = torch.from_numpy(self._map[world * LINE:]).view(2, world, capacity)
        self.calls = int(self._counters[rank])
        self._pids[rank] = os.getpid()
        self.seconds = 0.0  # time spent in collectives: the cost tensor parallelism adds
        self.count = 0

    def unlink(self) -> None:
        """Remove the file's name once every rank has mapped it; the mappings keep the memory alive."""
        Path(self.path).unlink(missing_ok=True)

    def _buffers(self, dtype: torch.dtype) -> torch.Tensor:
        """This call's buffers [world, capacity // itemsize], viewed as `dtype`."""
        return self._data[self.calls % 2].view(dtype)

    def _barrier(self) -> None:
        self.calls += 1
        target = self.calls
        self._counters[self.rank] = target
        polls = 0
        deadline = None
        while self._counters.min() < target:
            polls += 1
            if polls % SPINS == 0:
                time.sleep(0)  # yield the core (and the GIL: ranks may be threads of one process)
            if polls % LIVENESS_EVERY == 0:
                deadline = deadline or time.monotonic() + self.timeout
                self._check_peers(target, deadline)

    def _check_peers(self, target: int, deadline: float) -> None:
        late = [r for r in range(self.world) if self._counters[r] < target]
        for r in late:
            pid = int(self._pids[r])
            if pid and not alive(pid):
                raise GroupBroken(f"tensor-parallel rank {r} (pid {pid}) died")
        if time.monotonic() > deadline:
            raise GroupBroken(f"tensor-parallel rank(s) {late} did not reach collective #{target} "
                              f"within {self.timeout:g} s")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (same shape and dtype on every rank), summed in rank order."""
        start = time.perf_counter()
        flat = x.contiguous().view(-1)
        out = torch.empty_like(flat)
        step = self.capacity // flat.element_size()
        for at in range(0, flat.numel(), step):
            n = min(step, flat.numel() - at)
            bufs = self._buffers(flat.dtype)
            bufs[self.rank, :n].copy_(flat[at:at + n])
            self._barrier()
            part = out[at:at + n]
            part.copy_(bufs[0, :n])
            for r in range(1, self.world):
                part.add_(bufs[r, :n])
        self.seconds += time.perf_counter() - start
        self.count += 1
        return out.view(x.shape)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] (the same shape on every rank) side by side: [..., world * n]."""
        start = time.perf_counter()
        flat = x.contiguous().view(-1)
        out = torch.empty(self.world, flat.numel(), dtype=x.dtype, device=x.device)
        step = self.capacity // flat.element_size()
        for at in range(0, flat.numel(), step):
            n = min(step, flat.numel() - at)
            bufs = self._buffers(flat.dtype)
            bufs[self.rank, :n].copy_(flat[at:at + n])
            self._barrier()
            out[:, at:at + n].copy_(bufs[:, :n])
        self.seconds += time.perf_counter() - start
        self.count += 1
        parts = out.view(self.world, *x.shape)
        return torch.cat(parts.unbind(0), dim=-1)
