"""All-reduce and all-gather between the ranks of one tensor-parallel group on one host, through shared memory.

Between CPU processes, gloo took ~1.1-1.3 ms per all-reduce of a 16 x 896 fp32 tensor on the 2-core machine
this project is measured on, two per layer: more than the matmuls it splits. vLLM's CPU backend uses a
shared-memory all-reduce instead; this is a simple one that is correct:

- one file in /dev/shm, mapped by every rank: a barrier (a process-shared, robust pthread mutex and condition
  variable with an arrival count and a generation number, called through ctypes) and two data buffers per rank
  (`capacity` bytes each), used alternately;
- a collective copies the rank's part into its own buffer and meets the others at the barrier; then each rank
  reads all buffers and sums (or concatenates) them in rank order, so every rank ends with the same bytes
  (ranks keep identical residual streams and sample the same token);
- two buffers make one barrier per call enough: a rank writing call n + 2's part into the buffer call n used
  has passed call n + 1's barrier, which every rank reaches only after reading call n;
- a tensor larger than a buffer goes in chunks, one barrier each.

Waiting: a rank that arrives early polls the generation for a few microseconds (ranks on cores of their own
meet within that), then sleeps on the condition variable. Spinning alone, as a first version did, cost 0.65 ms
per call and 6-8 ms inside a forward on the shared 2-core test machine, where a spinning rank burns the time
slice its peer needs; a sleeping rank gives it up (docs/benchmarks.md).

A waiting rank wakes every `WAKE_S` to check that its peers' processes live; a dead peer (or no progress within
`timeout`) raises `GroupBroken`, so a rank that dies takes its group down instead of hanging it; the mutex is
robust, so a rank that dies holding it cannot hang the others either. The file is unlinked once every rank has
mapped it (`unlink`), so nothing is left in /dev/shm when the group goes.
"""

from __future__ import annotations

import ctypes
import errno
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

CAPACITY = 4 << 20  # bytes per buffer: a 16 x 896 fp32 hidden state is 56 KiB, a prefill chunk a few MiB
MUTEX, COND, COUNTS, PIDS = 0, 64, 128, 192  # header offsets: pthread_mutex_t (40 B), pthread_cond_t (48 B), ...
SPINS = 200 if platform.machine().lower() in ("x86_64", "amd64") else 0  # polls before sleeping: x86's store
# order makes a peer's buffer visible once its generation is; elsewhere only the mutex orders them
WAKE_S = 0.1  # a sleeping rank's liveness checks
TIMEOUT_S = 60.0
PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST = 1, 1

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


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


def _check(rc: int, what: str) -> None:
    if rc:
        raise OSError(rc, f"{what}: {os.strerror(rc)}")


class ShmCollectives:
    """Rank `rank` of `world` over the shared file `path` (created by rank 0 with `create=True` before the
    others attach)."""

    def __init__(self, path: str, rank: int, world: int, *, create: bool = False, capacity: int = CAPACITY,
                 timeout: float = TIMEOUT_S) -> None:
        self.path, self.rank, self.world, self.capacity, self.timeout = path, rank, world, capacity, timeout
        header = -(-(PIDS + 8 * world) // 64) * 64
        size = header + 2 * world * capacity
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self._mutex, self._cond = ctypes.c_void_p(base + MUTEX), ctypes.c_void_p(base + COND)
        raw = np.frombuffer(self._mmap, dtype=np.uint8)
        self._counts = raw[COUNTS:COUNTS + 16].view(np.int64)  # [arrived, generation], changed under the mutex
        self._pids = raw[PIDS:PIDS + 8 * world].view(np.int64)
        self._data = torch.from_numpy(raw[header:]).view(2, world, capacity)
        if create:
            self._init_sync()
        self._pids[rank] = os.getpid()
        self.calls = 0
        self.seconds = 0.0  # time spent in collectives: the cost tensor parallelism adds
        self.count = 0

    def _init_sync(self) -> None:
        mattr, cattr = ctypes.create_string_buffer(64), ctypes.create_string_buffer(64)
        _check(_libc.pthread_mutexattr_init(mattr), "pthread_mutexattr_init")
        _check(_libc.pthread_mutexattr_setpshared(mattr, PTHREAD_PROCESS_SHARED), "setpshared")
        _check(_libc.pthread_mutexattr_setrobust(mattr, PTHREAD_MUTEX_ROBUST), "setrobust")
        _check(_libc.pthread_mutex_init(self._mutex, mattr), "pthread_mutex_init")
        _check(_libc.pthread_condattr_init(cattr), "pthread_condattr_init")
        _check(_libc.pthread_condattr_setpshared(cattr, PTHREAD_PROCESS_SHARED), "setpshared")
        _check(_libc.pthread_cond_init(self._cond, cattr), "pthread_cond_init")

    def unlink(self) -> None:
        """Remove the file's name once every rank has mapped it; the mappings keep the memory alive."""
        Path(self.path).unlink(missing_ok=True)

    def _buffers(self, dtype: torch.dtype) -> torch.Tensor:
        """This call's buffers [world, capacity // itemsize], viewed as `dtype`."""
        return self._data[self.calls % 2].view(dtype)

    def _lock(self) -> None:
        rc = _libc.pthread_mutex_lock(self._mutex)
        if rc == errno.EOWNERDEAD:  # a rank died holding it: the group is over
            _libc.pthread_mutex_consistent(self._mutex)
            _libc.pthread_mutex_unlock(self._mutex)
            raise GroupBroken("a tensor-parallel rank died inside the barrier")
        _check(rc, "pthread_mutex_lock")

    def _barrier(self) -> None:
        self.calls += 1
        self._lock()
        generation = int(self._counts[1])
        self._counts[0] += 1
        if self._counts[0] == self.world:  # the last to arrive releases the others
            self._counts[:] = (0, generation + 1)
            _libc.pthread_cond_broadcast(self._cond)
            _libc.pthread_mutex_unlock(self._mutex)
            return
        _libc.pthread_mutex_unlock(self._mutex)
        for _ in range(SPINS):
            if self._counts[1] != generation:
                return
        self._lock()
        try:
            deadline = time.monotonic() + self.timeout
            while self._counts[1] == generation:
                wake = time.time() + WAKE_S
                at = _Timespec(int(wake), int((wake % 1) * 1e9))
                rc = _libc.pthread_cond_timedwait(self._cond, self._mutex, ctypes.byref(at))
                if rc == errno.EOWNERDEAD:
                    _libc.pthread_mutex_consistent(self._mutex)
                    raise GroupBroken("a tensor-parallel rank died inside the barrier")
                if rc == errno.ETIMEDOUT and self._counts[1] == generation:
                    self._check_peers(deadline)
        finally:
            _libc.pthread_mutex_unlock(self._mutex)

    def _check_peers(self, deadline: float) -> None:
        for r in range(self.world):
            pid = int(self._pids[r])
            if r != self.rank and pid and not alive(pid):
                raise GroupBroken(f"tensor-parallel rank {r} (pid {pid}) died")
        if time.monotonic() > deadline:
            raise GroupBroken(f"tensor-parallel ranks did not meet at collective #{self.calls} within "
                              f"{self.timeout:g} s")

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
