"""Which collective a tensor-parallel group's ranks meet through, and the torch.distributed one.

`ModelSlice` calls two collectives (shards/model.py): `all_reduce` (the row-parallel partial sums, two a layer)
and `all_gather` (the LM head's vocabulary shares). Two implementations offer them:

- `ShmCollectives` (shards/allreduce.py): CPU ranks on one host, through a /dev/shm buffer. The default on a
  CPU: gloo cost more per all-reduce than the matmuls it splits (docs/benchmarks.md).
- `TorchCollectives` (here): a torch.distributed process group, NCCL between GPUs (the only way GPU ranks can
  sum each other's tensors without a trip through the host) and gloo between CPU processes, so the same class,
  the same rendezvous and the same failure handling run in the CPU tests (`SliceSpec.collective="torch"`).

The process group is built from its backend class (`ProcessGroupNCCL` / `ProcessGroupGloo`), not through
`init_process_group`: that one sets a process-wide default group, and one process may host several groups'
rank 0 (`serve --no-ray` runs every slice in the gateway's process) or, in tests, every rank of a group. The
rendezvous is a `FileStore` in a private temporary folder (mode 0700) that rank 0 creates and removes: nothing
listens on a port. Ranks first meet at the store with a long bound (a child rank imports torch before it
arrives), checking between waits that their peers live, so a rank that dies while the group forms fails the
start at once; the process group itself gets the collectives' timeout.

A peer that dies mid-call: gloo sees its TCP connection close and raises at once (or after the timeout for a
peer that hangs alive); NCCL sees nothing and would wait in the GPU kernel, so the group's host watches its
rank processes and calls `abort()` (ncclCommAbort), which ends the pending collectives (shards/group.py).
Either way the error surfaces as `GroupBroken`. NCCL's own watchdog enforces the timeout for a peer that hangs
alive (by default it ends the process: on Ray the actor restarts).

`traceable` wraps either implementation as custom operators (`qwen_relay::all_reduce`, `qwen_relay::all_gather`)
that `torch.compile` keeps opaque, so a tensor-parallel rank's compiled decode step traces whole with the
collectives inside it (shards/runner.py); on CUDA the NCCL collective is captured into the step's CUDA graph.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from .allreduce import TIMEOUT_S, GroupBroken

log = logging.getLogger(__name__)

COLLECTIVES = ("auto", "shm", "torch")
START_TIMEOUT_S = 600.0  # for every rank to reach the store: a child imports torch and transformers first
MEET_WAKE_S = 1.0  # between a rank's checks of its peers while they gather (a FileStore wait lasts >= 1 s)


class Collectives(Protocol):
    """What a tensor-parallel rank's slice calls, and what the group and the benchmarks read."""

    rank: int
    world: int
    seconds: float  # time spent in collectives
    count: int  # collectives run

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor: ...


def choose_collective(asked: str, device: str) -> str:
    """"shm" or "torch" for ranks on `device` ("cpu", "cuda:1"): auto is the shared-memory buffer on a CPU,
    torch.distributed (NCCL) on GPUs."""
    if asked not in COLLECTIVES:
        raise ValueError(f"collective {asked!r}: choose one of {', '.join(COLLECTIVES)}")
    cuda = device.startswith("cuda")
    if asked == "shm" and cuda:
        raise ValueError("the shared-memory collective sums CPU tensors only: GPU ranks need collective 'torch' "
                         "(NCCL)")
    if asked == "auto":
        return "torch" if cuda else "shm"
    return asked


def rank_devices(device: str, world: int, visible_gpus: int) -> list[str]:
    """Each rank's device: on GPUs rank r takes the r-th GPU visible to the group's process from the one
    `device` names ("cuda" is "cuda:0"; a Ray actor sees only the GPUs it reserved), on a CPU every rank the
    CPU. A node with too few GPUs for the group is refused here, before any rank starts."""
    if device == "auto":
        device = "cuda" if visible_gpus else "cpu"
    if not device.startswith("cuda"):
        return [device] * world
    first = torch.device(device).index or 0
    if visible_gpus < first + world:
        raise ValueError(f"--tensor-parallel {world} needs {world} GPUs on one node (from cuda:{first}), but this "
                         f"process sees {visible_gpus}: lower --tensor-parallel, or give each slice a node with "
                         f"{world} GPUs")
    return [f"cuda:{first + r}" for r in range(world)]


def meet(store: dist.Store, rank: int, world: int, timeout: float, peers_alive: Callable[[], None]) -> None:
    """Wait until every rank has reached `store`; `peers_alive` raises `GroupBroken` for a peer that died."""
    store.set(f"arrived/{rank}", b"1")
    keys = [f"arrived/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.wait(keys, timedelta(seconds=MEET_WAKE_S))
            return
        except RuntimeError as e:  # the store's wait timed out: are the others still coming?
            peers_alive()
            if time.monotonic() > deadline:
                raise GroupBroken(f"tensor-parallel rank {rank}: the other ranks did not arrive within "
                                  f"{timeout:g} s") from e


def _process_group(backend: str, store: dist.Store, rank: int, world: int, timeout: float) -> dist.ProcessGroup:
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=timeout))
    from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch

    options = ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=timeout)  # the watchdog's bound for a collective that never completes
    return ProcessGroupNCCL(store, rank, world, options)


class TorchCollectives:
    """Rank `rank` of `world` over a torch.distributed process group on `device` (NCCL on CUDA, else gloo),
    meeting at the `FileStore` file `store_path`. Same interface and same results on every rank as
    `ShmCollectives`: every rank ends a collective with the same bytes."""

    def __init__(self, store_path: str, rank: int, world: int, device: torch.device, *,
                 timeout: float = TIMEOUT_S, start_timeout: float = START_TIMEOUT_S,
                 peers_alive: Callable[[], None] = lambda: None) -> None:
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.FileStore(store_path, world)
        meet(store, rank, world, start_timeout, peers_alive)
        self.group = _process_group(self.backend, store, rank, world, timeout)
        self._store = store  # NCCL forms its communicator at the first collective, through the store
        self.aborted = False
        self._abort_lock = threading.Lock()
        self.seconds = 0.0
        self.count = 0

    def _run(self, what: str, work: Callable[[], object]) -> None:
        if self.aborted:
            raise GroupBroken("this tensor-parallel group was aborted (a rank died)")
        try:
            work().wait()  # NCCL: the current stream waits for the collective; the host does not
        except RuntimeError as e:  # gloo: a peer's connection closed, or the timeout; NCCL: aborted
            raise GroupBroken(f"tensor-parallel rank {self.rank}: {what} failed ({self.backend}): {e}") from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`; `x` itself is left as it was."""
        start = time.perf_counter()
        out = x.contiguous().clone()
        self._run("all-reduce", lambda: self.group.allreduce([out]))
        self.seconds += time.perf_counter() - start
        self.count += 1
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side: [..., world * n]."""
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._run("all-gather", lambda: self.group.allgather([parts], [x]))
        self.seconds += time.perf_counter() - start
        self.count += 1
        return torch.cat(parts, dim=-1)

    def abort(self) -> None:
        """End every pending and future collective of this rank (another thread may be waiting in one): NCCL's
        only way out of a collective whose peer died. Gloo's pending collectives end on their own."""
        with self._abort_lock:  # the group's watch and its close may both get here
            if not self.aborted:
                self.aborted = True
                self.group.abort()

    def close(self) -> None:
        """Release the process group (its connections, NCCL's communicator)."""
        untrace(self)
        self.abort()


# Custom operators over the collectives, so `torch.compile` traces a tensor-parallel decode step whole: the
# graph calls the operator (opaque to inductor), which finds the rank's collectives by number.
_TRACED: dict[int, Collectives] = {}
_NUMBERS = itertools.count()


@torch.library.custom_op("qwen_relay::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, group: int) -> torch.Tensor:
    return _TRACED[group].all_reduce(x)


@_all_reduce_op.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qwen_relay::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, group: int) -> torch.Tensor:
    return _TRACED[group].all_gather(x)


@_all_gather_op.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] * _TRACED[group].world)


def traceable(collectives: Collectives) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                 Callable[[torch.Tensor], torch.Tensor]]:
    """`all_reduce` and `all_gather` of `collectives` as the custom operators `torch.compile` keeps whole."""
    number = next(_NUMBERS)
    _TRACED[number] = collectives

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qwen_relay.all_reduce(x, number)

    def all_gather(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qwen_relay.all_gather(x, number)

    return all_reduce, all_gather


def untrace(collectives: Collectives) -> None:
    """Forget `collectives` in the operators' table (its group is closing)."""
    for number in [n for n, c in _TRACED.items() if c is collectives]:
        del _TRACED[number]
