"""How a step batch travels through the slice actors: a Ray compiled graph, or chained actor calls.

Both take any actors with a `step(batch, hidden=None)` method (the slices; the hop microbenchmark's identity
actors), accept up to `depth` concurrent `step` calls, and run the batches through every slice in submission
order. Both turn a lost slice into `SliceLost` and let application errors through.

`CompiledGraph` (docs/design.md, "Hops"): one Ray compiled graph per pipeline. Hidden states go slice to slice
over shared-memory channels (NCCL between GPU actors); the gateway writes the batch once and reads only the
token ids. Each actor runs the graph's loop in Ray's `_ray_system` concurrency group, so its ordinary methods
(stats, adapters, reset) still run on the default thread while the graph serves; the slice's own lock keeps
adapter changes between forwards.

`ActorCalls`: one actor call per slice, each given the previous call's object ref. Ray returns a small result
inline to the caller, so every hop passes through the gateway's core worker: the fallback, where a compiled
graph cannot be built.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Protocol

import ray
from ray.dag import InputNode

from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.kv_cache import CacheMismatch

from .pipeline import SliceLost

log = logging.getLogger(__name__)

# What Ray raises for a call to an actor that died or is restarting, building a graph over it included.
SLICE_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# A torn-down graph must not stall recovery: past this, the graph's surviving actors are killed (Ray restarts
# them, and recovery replays every cache anyway) instead of waiting on a loop stuck in a channel read.
TEARDOWN_TIMEOUT_S = 10.0


class Transport(Protocol):
    name: str
    polls_when_idle: bool  # keeps cores busy between steps: the pipeline tears it down after a while idle

    async def step(self, batch: StepBatch) -> list[int]: ...

    async def close(self) -> None: ...


def _raise_task_error(e: ray.exceptions.RayTaskError) -> None:
    """A slice raised while stepping: a lost cache means the slice restarted, anything else is the batch's."""
    if isinstance(e.cause, CacheMismatch):
        raise SliceLost(f"a slice restarted and lost its cache: {e.cause}") from e
    raise e


class ActorCalls:
    """Chained actor calls: slice i+1's call takes slice i's output ref. Ray runs one caller's calls to an actor
    in submission order, so concurrent steps stay ordered at every slice."""

    name = "actor calls"
    polls_when_idle = False

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    async def step(self, batch: StepBatch) -> list[int]:
        out = None
        for actor in self.actors:
            out = actor.step.remote(batch, out)
        try:
            return await out
        except ray.exceptions.RayActorError as e:
            raise SliceLost(f"a slice actor died: {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:
            _raise_task_error(e)

    async def close(self) -> None:
        pass


class CompiledGraph:
    """The slices as one Ray compiled graph with up to `depth` executions in flight.

    Ray's asyncio futures of a graph whose actor died may never resolve, so every step also waits on the
    graph's actor loops: when any loop ends, the graph is broken and every outstanding step raises
    `SliceLost`. A broken graph is torn down at once (bounded by `TEARDOWN_TIMEOUT_S`) and never reused:
    the pipeline builds a new one once Ray has restarted the slice.

    Build it inside the event loop that will call `step` (Ray binds the graph's result reader to it).
    """

    name = "compiled graph"
    # Between steps, each slice's loop and the gateway's result reader keep polling their shared-memory
    # channels: a core each, measured on CPU slices (the gateway's reader thread, 2 slices: 20 CPU-s in 10 s).
    polls_when_idle = True

    def __init__(self, actors: list[Any], depth: int, tensor_transport: str | None) -> None:
        self.actors = actors
        with InputNode() as batch:
            out = None
            for actor in actors:
                if out is None:
                    out = actor.step.bind(batch)
                else:
                    hidden = out.with_tensor_transport(tensor_transport) if tensor_transport else out
                    out = actor.step.bind(batch, hidden)
        self.dag = out.experimental_compile(enable_asyncio=True, _max_inflight_executions=depth)
        self.broken = asyncio.Event()
        self._teardown: asyncio.Task | None = None
        loops = [asyncio.wrap_future(ref.future()) for ref in self.dag.worker_task_refs.values()]
        self._watch = asyncio.ensure_future(self._watch_loops(loops))

    async def _watch_loops(self, loops: list[asyncio.Future]) -> None:
        await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        for loop in loops:
            if loop.done() and not loop.cancelled() and loop.exception() is not None:
                log.warning("compiled graph: a slice's loop ended: %s", type(loop.exception()).__name__)
        self._break()

    def _break(self) -> None:
        if not self.broken.is_set():
            self.broken.set()
            self._teardown = asyncio.ensure_future(self._tear_down())

    async def step(self, batch: StepBatch) -> list[int]:
        if self.broken.is_set():
            raise SliceLost("the compiled graph is down (a slice was lost)")
        result = asyncio.ensure_future(self._execute(batch))
        broken = asyncio.ensure_future(self.broken.wait())
        await asyncio.wait({result, broken}, return_when=asyncio.FIRST_COMPLETED)
        broken.cancel()
        if not result.done():
            result.cancel()
            raise SliceLost("a slice was lost while the step was in the compiled graph")
        try:
            return result.result()
        except ray.exceptions.RayCgraphCapacityExceeded as e:
            raise RuntimeError(f"more steps in flight than the pipeline's depth: {e}") from e
        except ray.exceptions.RayTaskError as e:
            _raise_task_error(e)
        except Exception as e:  # noqa: BLE001 - channel errors and actor deaths alike: the graph is gone
            self._break()
            raise SliceLost(f"the compiled graph lost a slice: {type(e).__name__}: {e}") from e

    async def _execute(self, batch: StepBatch) -> list[int]:
        future = await self.dag.execute_async(batch)
        return await future

    async def _tear_down(self) -> None:
        """Ray's teardown, bounded: past the bound the graph's actors are killed (Ray restarts them)."""
        done = threading.Event()

        def run() -> None:
            try:
                self.dag.teardown()
            except Exception as e:  # noqa: BLE001 - a dead actor makes Ray's teardown complain; it still ends
                log.debug("compiled graph teardown: %s", e)
            done.set()

        threading.Thread(target=run, name="graph-teardown", daemon=True).start()
        if not await asyncio.to_thread(done.wait, TEARDOWN_TIMEOUT_S):
            log.error("compiled graph teardown still running after %.0f s: killing its slices so Ray restarts "
                      "them", TEARDOWN_TIMEOUT_S)
            for actor in self.actors:
                ray.kill(actor, no_restart=False)

    async def close(self) -> None:
        """Tear the graph down (bounded) so its actors can serve another graph or be killed."""
        self._break()
        await asyncio.shield(self._teardown)
        self._watch.cancel()


def build_transport(actors: list[Any], depth: int, *, mode: str = "auto", use_gpu: bool = False) -> Transport:
    """The pipeline's transport. "auto": a compiled graph between GPU slices (NCCL), actor calls between CPU
    slices: a CPU slice waiting on a compiled graph's shared-memory channel polls it and takes CPU time from
    the forwards of its own and the other slices (measured on the 2-core machine, 2 slices, 2 steps in
    flight: 32.6 tokens/s over the graph against 46.3 over actor calls, docs/benchmarks.md). "compiled" and
    "calls" force one; "auto" falls back to actor calls, saying why, where a graph cannot be built."""
    if mode not in ("auto", "compiled", "calls"):
        raise ValueError(f"unknown slice transport {mode!r}: auto, compiled or calls")
    if mode == "auto" and not use_gpu:
        log.info("slice transport: actor calls (CPU slices; a compiled graph's channel polling costs them CPU)")
        return ActorCalls(actors)
    if mode != "calls":
        try:
            graph = CompiledGraph(actors, depth, "nccl" if use_gpu else None)
        except SLICE_DIED:
            raise  # a slice is down (it died while no graph stood): the caller's to recover, not a reason to fall back
        except Exception as e:
            if mode == "compiled":
                raise
            log.warning("slice transport: actor calls (a compiled graph could not be built: %s: %s)",
                        type(e).__name__, e)
        else:
            log.info("slice transport: compiled graph over %d slices, %d steps in flight, hidden states over %s",
                     len(actors), depth, "NCCL" if use_gpu else "shared memory")
            return graph
    else:
        log.info("slice transport: actor calls (asked for)")
    return ActorCalls(actors)
