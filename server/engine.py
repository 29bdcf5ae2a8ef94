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
class EngineConfig:
    max_batch: int  # sequences stepping together; also the number of cache slots in every slice
    max_context: int  # prompt + generated tokens per sequence
    eos_ids: frozenset[int]
    max_prefill_tokens: int = 4096
    max_queue: int = 256  # requests waiting for a cache slot; beyond it new ones are refused
    recovery_timeout: float = 60.0  # how long in-flight calls wait for a lost slice to come back


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

    def start(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
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
        while True:
            if not self.available:
                await self._restore()
                continue
            self._reap_cancelled()
            batch = self.scheduler.schedule()
            self._report_load()
            if not batch and not self._release:
                self._wake.clear()
                await self._wake.wait()
                continue
            release, self._release = self._release, []
            step = StepBatch(
                slots=[s.slot for s in batch],
                starts=[s.num_cached for s in batch],
                token_ids=[s.pending() for s in batch],
                sampling=[s.params.sampling for s in batch],
                adapters=[s.params.adapter for s in batch] if any(s.params.adapter for s in batch) else None,
                release=release,
            )
            try:
                started = time.perf_counter()
                tokens = await self.pipeline.step(step)
            except asyncio.CancelledError:
                raise
            except SliceLost as e:
                log.warning("step of %d sequences lost: %s", len(batch), e)
                await self._recover()
                continue
            except Exception as e:  # noqa: BLE001 - the batch fails, the server keeps serving
                log.exception("step failed for %d sequences (requests %s)", len(batch),
                              ", ".join(s.request_id for s in batch))
                self._release += release  # some slices may not have seen them; releasing twice is harmless
                for seq in batch:
                    self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=e))
                continue
            if self.metrics is not None and batch:
                self.metrics.observe_step(time.perf_counter() - started)
            for seq, token in zip(batch, tokens, strict=True):
                seq.num_cached = len(seq.tokens)
                if token == NO_TOKEN:
                    log.error("request %s: the model produced non-finite logits", seq.request_id)
                    error = RuntimeError("the model produced non-finite logits (NaN or inf) for this request")
                    self._finish(seq, FinishReason.ERROR, Delta("", [], FinishReason.ERROR, error=error))
                else:
                    self._append(seq, token)
            await asyncio.sleep(0)  # let RPC handlers run between steps

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
        for seq in [s for s in (*self.scheduler.waiting, *self.scheduler.running) if s.cancelled]:
            log.info("request %s cancelled after %d tokens", seq.request_id, seq.num_generated)
            self._finish(seq, FinishReason.CANCELLED)
