"""The decode loop: schedule a batch, step it through the slices, turn token ids into streamed deltas.

One asyncio task runs the loop; RPC handlers only `generate` (submit a sequence and read its outbox).
Cancellation is a flag the loop reaps between steps, so a slot is never freed while a step that uses it is in
flight. A freed slot travels to the slices on the next step (`StepBatch.release`), so every slice forgets it
before it runs anything that reuses it.

Faults: when a slice dies mid-step (`SliceLost`), the step's tokens never arrive, so nothing was appended.
The loop waits (bounded) for Ray to bring the slice back, clears every cache and replays each running
sequence by prefilling prompt + generated tokens: callers see no token lost, repeated or changed. If the
slice does not come back in time, in-flight calls end UNAVAILABLE and the loop keeps probing until it does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.sampler import NO_TOKEN

from .pipeline import Pipeline, SliceLost
from .scheduler import Scheduler
from .sequence import Delta, FinishReason, Sequence

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """A limit is reached (maps to RESOURCE_EXHAUSTED: retrying at once would not help)."""


class Unavailable(RuntimeError):
    """A slice is down (maps to UNAVAILABLE: the service recovers by itself)."""


@dataclass(frozen=True)
class InFlight:
    """A step in the pipe: its sequences, the batch sent and when it was sent."""

    seqs: list[Sequence]
    batch: StepBatch
    started: float


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int  # sequences stepping together; also the number of cache slots in every slice
    max_context: int  # prompt + generated tokens per sequence
    eos_ids: frozenset[int]
    max_prefill_tokens: int = 4096
    max_queue: int = 256  # requests waiting for a cache slot; beyond it new ones are refused
    recovery_timeout: float = 60.0  # how long in-flight calls wait for a lost slice to come back
    max_in_flight: int = 0  # steps in the pipe at once; 0: the pipeline's depth (one per slice)


class Engine:
    """Built before the slices load, so the servicer can hold it from the start; `start(pipeline)` once they
    are warm. Until then `ready` is False."""

    def __init__(self, config: EngineConfig, on_health: Callable[[bool], Awaitable[None]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.pipeline: Pipeline | None = None
        self.config = config
        self.scheduler = Scheduler(config.max_batch, config.max_prefill_tokens)
        self.available = True
        self._on_health = on_health
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._release: list[int] = []  # slots freed since the last step, released by the slices on the next
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
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    def adapter_users(self, name: str) -> int:
        """Requests waiting for or holding a cache slot with adapter `name`."""
        return sum(1 for s in (*self.scheduler.waiting, *self.scheduler.running) if s.params.adapter == name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def generate(self, seq: Sequence) -> AsyncIterator[Delta]:
        """Submit `seq` and yield its deltas until it finishes. Leaving early cancels it."""
        if not self.available:
            raise Unavailable("a model slice is down and being restored; retry shortly")
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise Overloaded(f"admission queue is full: {len(self.scheduler.waiting)} requests wait for one of "
                             f"{self.config.max_batch} active-sequence slots (limits --max-queue, --max-batch)")
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

    async def _loop(self) -> None:
        """Keep up to `depth` steps in the pipe; postprocess each as it comes back, oldest first."""
        in_flight: dict[asyncio.Task[list[int]], InFlight] = {}
        try:
            while True:
                if not self.available:
                    await self._restore()
                    continue
                self._wake.clear()  # before looking for work: a request added after this sets it again
                self._reap_cancelled()
                while len(in_flight) < self.depth and (step := self._next_step()) is not None:
                    in_flight[asyncio.create_task(self.pipeline.step(step.batch))] = step
                if not in_flight:
                    await self._wake.wait()
                    continue
                oldest = next(iter(in_flight))  # the pipeline returns steps in the order they went in
                waiters: set[asyncio.Future] = {oldest}
                if len(in_flight) < self.depth:  # room in the pipe: new work may start before the oldest is back
                    waiters.add(asyncio.ensure_future(self._wake.wait()))
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
                # rebuild every cache and replay.
                if in_flight:
                    await asyncio.wait(in_flight)
                for task, step in in_flight.items():
                    self._postprocess(step, task)
                in_flight.clear()
                await self._recover()
        finally:  # stopped: nothing will read these steps' results
            for task in in_flight:
                task.cancel()

    def _next_step(self) -> InFlight | None:
        """The next batch to send down the pipe, with the slots freed since the last one; None if idle."""
        seqs = self.scheduler.schedule()
        self._report_load()
        if not seqs and not self._release:
            return None
        release, self._release = self._release, []
        for seq in seqs:
            seq.in_flight = True
        batch = StepBatch(
            slots=[s.slot for s in seqs],
            starts=[s.num_cached for s in seqs],
            token_ids=[s.pending() for s in seqs],
            sampling=[s.params.sampling for s in seqs],
            adapters=[s.params.adapter for s in seqs] if any(s.params.adapter for s in seqs) else None,
            release=release,
        )
        return InFlight(seqs, batch, time.perf_counter())

    def _postprocess(self, step: InFlight, task: asyncio.Task[list[int]]) -> bool:
        """Append a finished step's tokens; False if it was lost with a slice (nothing was appended)."""
        for seq in step.seqs:
            seq.in_flight = False
        try:
            tokens = task.result()
        except SliceLost as e:
            log.warning("step of %d sequences lost: %s", len(step.seqs), e)
            return False
        except Exception as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            log.error("step failed for %d sequences (requests %s): %s", len(step.seqs),
                      ", ".join(s.request_id for s in step.seqs), e, exc_info=e)
            self._release += step.batch.release  # some slices may not have seen them; releasing twice is harmless
            for seq in step.seqs:
                self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=e))
            return True
        if self.metrics is not None and step.seqs:
            self.metrics.observe_step(time.perf_counter() - step.started)
        for seq, token in zip(step.seqs, tokens, strict=True):
            seq.num_cached = len(seq.tokens)
            if token == NO_TOKEN:
                log.error("request %s: the model produced non-finite logits", seq.request_id)
                error = RuntimeError("the model produced non-finite logits (NaN or inf) for this request")
                self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=error))
            else:
                self._append(seq, token)
        return True

    def _append(self, seq: Sequence, token: int) -> None:
        """Postprocess one new token: stop checks in the order a caller expects (stop string, EOS, length)."""
        seq.tokens.append(token)
        is_eos = token in self.config.eos_ids and not seq.params.ignore_eos
        text = "" if is_eos else seq.detokenizer.add(token)
        if seq.detokenizer.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif is_eos:
            reason = FinishReason.EOS
        elif seq.num_generated >= seq.params.max_new_tokens or len(seq.tokens) >= self.config.max_context:
            reason = FinishReason.LENGTH
        else:
            seq.outbox.put_nowait(Delta(text, [token]))
            return
        if reason is not FinishReason.STOP_SEQUENCE:
            text += seq.detokenizer.flush()
        self._finish(seq, reason, Delta(text, [token], reason))

    def _finish(self, seq: Sequence, reason: FinishReason, last: Delta | None = None) -> None:
        seq.finish_reason = reason
        slot = self.scheduler.finish(seq)
        if slot is not None:
            self._release.append(slot)
        if last is not None:
            seq.outbox.put_nowait(last)

    async def _set_health(self, serving: bool) -> None:
        if self._on_health is not None:
            await self._on_health(serving)

    async def _recover(self) -> None:
        """After a lost step: wait for the slices, then replay every running sequence from its history."""
        await self._set_health(False)
        timeout = self.config.recovery_timeout
        if await self.pipeline.recover(timeout):
            for seq in self.scheduler.running:
                seq.num_cached = 0  # the next step re-prefills prompt + generated tokens
            log.info("slices back; replaying %d sequences", len(self.scheduler.running))
            await self._set_health(True)
            return
        error = Unavailable(f"a model slice did not come back within {timeout:.0f} s; retry later")
        log.error("%s: failing %d in-flight requests", error, len(self.scheduler))
        self.available = False
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=error))

    async def _restore(self) -> None:
        """While unavailable: probe until every slice answers again, then serve again."""
        if await self.pipeline.recover(self.config.recovery_timeout):
            self.available = True
            log.info("every slice answers again: serving")
            await self._set_health(True)

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_load(waiting=len(self.scheduler.waiting), active=len(self.scheduler.running))

    def _reap_cancelled(self) -> None:
        """Finish cancelled sequences, except those in flight: their slot is in use until their step is back."""
        for seq in [s for s in (*self.scheduler.waiting, *self.scheduler.running) if s.cancelled and not s.in_flight]:
            log.info("request %s cancelled after %d tokens", seq.request_id, seq.num_generated)
            self._finish(seq, FinishReason.CANCELLED)
