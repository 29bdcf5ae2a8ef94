"""The decode loop, recovery and supervision: schedule a batch (server/scheduler.py), step it through the
slices, hand each new token to postprocessing (server/postprocess.py) and stream the deltas.

One asyncio task runs the loop; RPC handlers only `generate` (submit a sequence and read its outbox). The loop
keeps up to `depth` steps in the pipe (one per slice: slice 0 runs batch B while slice 1 runs batch A) and
postprocesses each as it comes back, oldest first; a sequence is in at most one step in flight
(docs/design.md, "Several batches in flight").
Cancellation is a flag the loop reaps between steps, so a sequence's blocks are never freed while a step that
uses them is in flight. The gateway owns the blocks (server/block_manager.py): a finished or failed sequence
needs no message to any slice, and a block is reused only by steps sent after it was freed.

Faults (docs/reliability.md lists each with its outcome):
- A lost step (`SliceLost`: a slice died or restarted mid-step) appended nothing. Every sequence in it gets a
  strike; the engine recovers (`_recover`: one probe loop with backoff until `pipeline.recover()` succeeds,
  which clears every cache; the gateway forgets every block and cached prefix with them) and replays each
  running sequence by prefilling prompt + generated tokens, in chunks within the step's token budget: callers
  see no token lost, repeated or changed. A slice killed during replay is
  just another lost step.
- Replay is bounded: a sequence in two lost steps steps alone (server/scheduler.py), and one in
  `max_lost_steps` lost steps fails (`ReplayLimit`), so a request whose step kills its slice every time cannot
  keep the service down; its neighbours complete.
- If the slices are not back within `recovery_timeout`, every request fails UNAVAILABLE and new ones are
  refused until they are; probing goes on.
- An adapter a restarted slice cannot load again is unloaded: its requests fail (`AdapterLost`), the rest
  replay, and the `adapter_lost` event tells whoever subscribed (the registry).
- A request is admitted only while the pipeline serves its adapter; a step naming one it no longer serves is
  refused before any slice runs (`AdapterNotServed`) and fails the requests naming it alone, never a slice.
- The loop is supervised: if it dies, the reason is logged, every request fails UNAVAILABLE, health turns
  NOT_SERVING and the loop restarts (with backoff), recovering the slices first. Restarting, not exiting: the
  loop's state is only the requests just failed, while the slices hold weights that take minutes to reload;
  a loop that keeps dying keeps health NOT_SERVING, which is what an orchestrator acts on.

The engine reports to subscribers (`health_changed`, `adapter_lost`: server/events.py) and never calls up into
the app or the registry; the registry reaches the pipeline's adapters only through `load_adapter`,
`unload_adapter` and `adapter_users`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_relay.shards.batch import StepBatch

from .block_manager import BlockManager, KvStats
from .events import Signal
from .pipeline import AdapterNotServed, Pipeline, SliceLost
from .postprocess import take_token
from .scheduler import Row, Scheduler
from .sequence import Delta, FinishReason, Sequence

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

PROBE_FIRST_S = 0.05  # recovery probes back off from this ...
PROBE_MAX_S = 2.0  # ... to this
RESTART_FIRST_S = 0.1  # a dead loop restarts after this, doubling while it keeps dying ...
RESTART_MAX_S = 30.0  # ... up to this


class Overloaded(RuntimeError):
    """A limit is reached (maps to RESOURCE_EXHAUSTED: retrying at once would not help)."""


class Unavailable(RuntimeError):
    """A slice is down, the engine restarts or the server stops (UNAVAILABLE: retry, maybe elsewhere)."""


class AdapterLost(RuntimeError):
    """The request's adapter was unloaded: before the request was admitted, or because a restarted slice could
    not load it again (FAILED_PRECONDITION: load it again, then retry). Never a lost slice."""


class ReplayLimit(RuntimeError):
    """The request was in `max_lost_steps` steps that lost a slice (INTERNAL: its step likely kills the
    slice, e.g. out of memory on a long prefill; retrying it as is would do the same)."""


@dataclass(frozen=True)
class InFlight:
    """A step in the pipe: its rows, the batch sent and when it was sent."""

    rows: list[Row]
    batch: StepBatch
    started: float

    @property
    def seqs(self) -> list[Sequence]:
        return [r.seq for r in self.rows]


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int  # sequences running at once (decoding, or prefilling in chunks)
    max_context: int  # prompt + generated tokens per sequence: a per-request limit, not a reservation
    eos_ids: frozenset[int]
    num_blocks: int = 2048  # KV blocks every slice holds (server/block_manager.py)
    block_size: int = 16
    prefix_cache: bool = True
    max_step_tokens: int = 2048  # a step's token budget: decodes first, then chunks of prompts
    max_queue: int = 256  # requests waiting to run; beyond it new ones are refused
    recovery_timeout: float = 60.0  # how long in-flight calls wait for a lost slice to come back
    max_in_flight: int = 0  # steps in the pipe at once; 0: the pipeline's depth (one per slice)
    max_lost_steps: int = 3  # a request in this many lost steps fails (ReplayLimit)


class Engine:
    """Built before the slices load, so the servicer can hold it from the start; `start(pipeline)` once they
    are warm. Until then `ready` is False."""

    def __init__(self, config: EngineConfig, metrics: Metrics | None = None) -> None:
        self.pipeline: Pipeline | None = None
        self.config = config
        if config.num_blocks * config.block_size < config.max_context:
            raise ValueError(f"the KV cache holds {config.num_blocks * config.block_size} tokens, fewer than one "
                             f"sequence of the context limit ({config.max_context})")
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.prefix_cache)
        self.scheduler = Scheduler(config.max_batch, self.blocks, config.max_step_tokens,
                                   max_lost_steps=config.max_lost_steps)
        self.available = True
        self.health_changed: Signal[bool] = Signal()  # serving or not, reported on each change
        self.adapter_lost: Signal[str] = Signal()  # an adapter the slices dropped (see the module doc)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever no request waits or runs (shutdown drains on it)
        self._task: asyncio.Task | None = None
        self._lost = False  # a step was lost (or the loop died): recover before the next step
        self._closing = False
        self._serving = True  # the last health reported; the app reports SERVING once the engine starts
        self._restart_delay = RESTART_FIRST_S
        self.metrics = metrics

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    @property
    def depth(self) -> int:
        """Steps kept in the pipe at once: one per slice lets every slice work (docs/design.md)."""
        return self.scheduler.depth

    def start(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.scheduler.depth = min(pipeline.depth, self.config.max_in_flight or pipeline.depth)
        self._task = asyncio.create_task(self._supervise(), name="engine-loop")

    def adapter_users(self, name: str) -> int:
        """Requests waiting or running with adapter `name`."""
        return len(self.scheduler.users_of(name))

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> None:
        """Have every slice load the adapter (all or none); requests may name it once this returns."""
        await self.pipeline.load_adapter(name, path, fingerprint)

    async def unload_adapter(self, name: str) -> list[int]:
        """Stop admitting requests with the adapter at once (before any await), then drop it from every slice
        once no step in flight names it; returns the slices that failed to. Call it when `adapter_users` is 0."""
        return await self.pipeline.unload_adapter(name)

    async def drain(self, timeout: float) -> None:
        """Shutdown: refuse new requests, let queued and running ones finish for up to `timeout` s, then fail
        the rest UNAVAILABLE, so their clients retry elsewhere (CANCELLED would say they gave up themselves)."""
        self._closing = True
        if len(self.scheduler):
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        self._fail_all(Unavailable("the server is shutting down; retry on another replica"))

    async def stop(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_all(Unavailable("the server stopped"))

    async def generate(self, seq: Sequence) -> AsyncIterator[Delta]:
        """Submit `seq` and yield its deltas until it finishes. Leaving early cancels it."""
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another replica")
        if not self.available:
            raise Unavailable("a model slice is down and being restored; retry shortly")
        if self.scheduler.num_waiting >= self.config.max_queue:
            raise Overloaded(f"admission queue is full: {self.scheduler.num_waiting} requests wait for one of "
                             f"{self.config.max_batch} running places or KV blocks (limits --max-queue, --max-batch, "
                             f"--kv-cache-tokens)")
        adapter = seq.params.adapter
        if adapter and (self.pipeline is None or adapter not in self.pipeline.adapters):
            # Validated while loaded, unloaded since. An unload counts `adapter_users` and withdraws the adapter
            # with no await between, and this check and `scheduler.add` have none either: a request is counted
            # by the unload (which is then refused) or refused here, and never reaches a slice.
            raise AdapterLost(f"adapter {adapter!r} was unloaded before this request started; load it again, "
                              f"then retry")
        self.scheduler.add(seq)
        self._report_load()
        self._wake.set()
        try:
            while True:
                delta = await seq.outbox.get()
                if delta.error is not None:
                    raise delta.error
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None:
                seq.cancelled = True
                self._wake.set()

    async def _supervise(self) -> None:
        """Run the loop; if it dies, log why, fail every request, report NOT_SERVING and restart it."""
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - supervision: anything that ends the loop
                delay = self._restart_delay
                log.critical("the engine loop died; failing %d requests and restarting it in %.1f s",
                             len(self.scheduler), delay, exc_info=True)
                self.available = False
                self._fail_all(Unavailable(f"the engine failed ({type(e).__name__}) and is restarting; retry "
                                           f"shortly"))
                await self._set_health(False)
                self._lost = True  # the slices' caches are in an unknown state: clear them first
                self._restart_delay = min(delay * 2, RESTART_MAX_S)
                await asyncio.sleep(delay)

    async def _loop(self) -> None:
        """Keep up to `depth` steps in the pipe; postprocess each as it comes back, oldest first."""
        in_flight: dict[asyncio.Task[list[int]], InFlight] = {}
        try:
            while True:
                if self._lost:
                    await self._recover()
                self._wake.clear()  # before looking for work: a request added after this sets it again
                self._reap_cancelled()
                while (room := self.depth - len(in_flight)) and (step := self._next_step(room)) is not None:
                    in_flight[asyncio.create_task(self.pipeline.step(step.batch))] = step
                if not in_flight:
                    await self._wake.wait()
                    continue
                oldest = next(iter(in_flight))  # the pipeline returns steps in the order they went in
                # A wake-up (a new request, or a cancellation to reap) is looked at before the oldest step is
                # back: with room in the pipe new work may start, and a request given up while queued leaves
                # the queue at once even when the pipe is full (one step in flight).
                waiters: set[asyncio.Future] = {oldest, asyncio.ensure_future(self._wake.wait())}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters - {oldest}:
                        waiter.cancel()
                if not oldest.done():
                    continue
                if self._postprocess(in_flight.pop(oldest), oldest):
                    continue
                # A slice was lost: every other step in the pipe fails or finishes; take what finished, then
                # (at the top of the loop) rebuild every cache and replay.
                if in_flight:
                    await asyncio.wait(in_flight)
                for task, step in in_flight.items():
                    self._postprocess(step, task)
                in_flight.clear()
        finally:  # stopped, or the loop died: nothing will read these steps' results
            for task in in_flight:
                task.cancel()

    def _next_step(self, room: int) -> InFlight | None:
        """The next batch to send down the pipe; None if idle."""
        rows = self.scheduler.schedule(room)
        self._report_load()
        if not rows:
            return None
        seqs = [r.seq for r in rows]
        for seq in seqs:
            seq.in_flight = True
        batch = StepBatch(
            slots=[s.slot for s in seqs],
            starts=[s.num_cached for s in seqs],
            token_ids=[r.tokens for r in rows],
            blocks=[list(s.block_table) for s in seqs],
            sampling=[s.params.sampling for s in seqs],
            adapters=[s.params.adapter for s in seqs] if any(s.params.adapter for s in seqs) else None,
        )
        return InFlight(rows, batch, time.perf_counter())

    def _postprocess(self, step: InFlight, task: asyncio.Task[list[int]]) -> bool:
        """Append a finished step's tokens; False if it was lost with a slice (nothing was appended)."""
        for seq in step.seqs:
            seq.in_flight = False
        try:
            tokens = task.result()
        except SliceLost as e:
            self._lost_step(step.seqs, e)
            return False
        except AdapterNotServed as e:  # refused before any slice ran: no block was written, the others step again
            self._fail([s for s in step.seqs if s.params.adapter in e.names],
                       AdapterLost(f"adapter(s) {', '.join(map(repr, sorted(e.names)))} was unloaded while this "
                                   f"request ran; load it again, then retry"))
            return True
        except Exception as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            log.error("step failed for %d sequences (requests %s): %s", len(step.seqs),
                      ", ".join(s.log_id for s in step.seqs), e, exc_info=e)
            self._fail(step.seqs, e)  # their blocks go back; steps sent later never named them
            return True
        self._restart_delay = RESTART_FIRST_S  # the loop works again
        if self.metrics is not None and step.seqs:
            self.metrics.observe_step(time.perf_counter() - step.started)
        self.scheduler.stepped(step.rows)
        rows = [r for r in step.rows if r.seq.finish_reason is None]  # not failed meanwhile (shutdown)
        complete = {id(r.seq) for r in rows if r.completes}
        self.scheduler.done(rows)
        for seq, token in zip(step.seqs, tokens, strict=True):
            if id(seq) not in complete:
                continue  # a chunk of a prompt: its sampled token is not the next one
            try:
                self._take(seq, token)
            except Exception as e:  # noqa: BLE001 - a bug in one request's postprocessing fails it alone
                log.exception("request %s: postprocessing a token failed", seq.log_id)
                self._fail([seq], e)
        return True

    def _take(self, seq: Sequence, token: int) -> None:
        delta = take_token(seq, token, self.config.eos_ids, self.config.max_context)
        if delta.finish_reason is None:
            seq.outbox.put_nowait(delta)
        else:
            self._finish(seq, delta.finish_reason, delta)

    def _finish(self, seq: Sequence, reason: FinishReason, last: Delta | None = None) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        if last is not None:
            seq.outbox.put_nowait(last)
        if not len(self.scheduler):
            self._idle.set()

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        for seq in seqs:
            self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=error))

    def _fail_all(self, error: Exception) -> None:
        self._fail(self.scheduler.sequences(), error)

    async def _set_health(self, serving: bool) -> None:
        """Report a change of health (only a change: recovery after a restarted loop does not repeat it)."""
        if serving != self._serving:
            self._serving = serving
            await self.health_changed.emit(serving)

    def _lost_step(self, batch: list[Sequence], error: SliceLost) -> None:
        """A step that lost a slice appended nothing: strike its sequences, fail those out of strikes."""
        log.warning("step of %d sequences lost: %s", len(batch), error)
        for seq in self.scheduler.strike(batch):
            log.error("request %s: in %d steps that lost a slice; failing it", seq.log_id, seq.lost_steps)
            self._fail([seq], ReplayLimit(
                f"this request was in {seq.lost_steps} steps that lost a model slice (its step may be what "
                f"kills the slice, e.g. out of memory); it is not replayed again"))
        self._lost = True

    async def _recover(self) -> None:
        """Probe with backoff until `pipeline.recover()` succeeds (every slice answers, caches cleared), then
        replay. Past `recovery_timeout`, fail every request UNAVAILABLE and refuse new ones until then."""
        await self._set_health(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.recovery_timeout
        delay = PROBE_FIRST_S
        while True:
            try:
                recovery = await self.pipeline.recover()
                break
            except asyncio.CancelledError:
                raise
            except SliceLost as e:
                log.info("waiting for the slices: %s", e)
            except Exception as e:  # noqa: BLE001 - recovery itself failed: probe again
                log.warning("recovering the slices failed (retrying): %r", e)
            if self.available and loop.time() >= deadline:
                error = Unavailable(f"a model slice did not come back within {self.config.recovery_timeout:.0f} "
                                    f"s; retry later")
                log.error("%s: failing %d in-flight requests", error, len(self.scheduler))
                self.available = False
                self._fail_all(error)
            wait = delay if not self.available else min(delay, max(deadline - loop.time(), 0.0))
            await asyncio.sleep(wait)
            delay = min(delay * 2, PROBE_MAX_S)
        for name, reason in recovery.lost_adapters.items():
            await self._adapter_lost(name, reason)
        self.scheduler.caches_lost()  # the next steps re-prefill prompt + generated tokens
        self._lost = False
        self.available = True
        log.info("slices back; replaying %d sequences", self.scheduler.num_running)
        await self._set_health(True)

    async def _adapter_lost(self, name: str, reason: str) -> None:
        users = self.scheduler.users_of(name)
        log.error("adapter %r was unloaded (%s): failing its %d requests", name, reason, len(users))
        self._fail(users, AdapterLost(f"adapter {name!r} was unloaded: a restarted model slice could not load it "
                                      f"again ({reason}); load it again, then retry"))
        await self.adapter_lost.emit(name)

    def sequences_holding_blocks(self) -> int:
        return self.scheduler.holding_blocks()

    def kv_stats(self) -> KvStats:
        return self.blocks.stats(self.scheduler.preemptions)

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_load(waiting=self.scheduler.num_waiting, active=self.scheduler.num_running)
            self.metrics.observe_kv(self.kv_stats())

    def _reap_cancelled(self) -> None:
        """Finish cancelled sequences, except those in flight: their blocks are in use until their step is back."""
        for seq in self.scheduler.cancelled():
            log.info("request %s cancelled after %d tokens", seq.log_id, seq.num_generated)
            self._finish(seq, FinishReason.CANCELLED)
