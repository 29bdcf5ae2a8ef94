"""The thin gRPC servicer (TGI style): validate at the edge, one call into the engine per RPC.

Requests are rendered and tokenized on one worker thread, not on the event loop: a chat of 30k small messages
passes the size check yet takes seconds to render, and every stream would stall meanwhile. One thread, because
a Hugging Face fast tokenizer must not be used by two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from transformers import PreTrainedTokenizerBase

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .engine import AdapterLost, Engine, Overloaded, ReplayLimit, Unavailable
from .metrics import Metrics
from .reasoning import ReasoningSplitter, opens_reasoning
from .sequence import Delta, FinishReason, Sequence
from .validation import InvalidRequest, Limits, UnknownAdapter, check_size, prepare, render_prompt

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300
ERROR_CODES = [  # engine errors a client can act on; anything else is INTERNAL
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (AdapterLost, grpc.StatusCode.FAILED_PRECONDITION),
    (ReplayLimit, grpc.StatusCode.INTERNAL),
]

FINISH_REASONS = {
    FinishReason.EOS: relay_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: relay_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: relay_pb2.FINISH_REASON_STOP_SEQUENCE,
}


def public_message(error: BaseException) -> str:
    """An error as a client may read it: the root cause's first line, clipped. Never a remote traceback: Ray's
    `RayTaskError` text is one, with file paths, addresses and pids (the full error goes to the log)."""
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


@dataclass(frozen=True)
class ModelMeta:
    """What GetModelInfo reports besides the live per-slice numbers."""

    model_id: str
    num_layers: int
    max_batch: int


async def run(engine: Engine, seq: Sequence, metrics: Metrics) -> AsyncIterator[Delta]:
    """The deltas of one request, timed and logged; what every front end (gRPC, HTTP) generates through.
    Raises the engine's errors (`Overloaded`, `Unavailable`, a failed step) for the caller to map."""
    log.info("request %s: %d prompt tokens, max_new_tokens %d", seq.log_id, len(seq.prompt_ids),
             seq.params.max_new_tokens)
    timer = metrics.generation()
    try:
        async for delta in engine.generate(seq):
            timer.tokens(len(delta.token_ids))
            yield delta
    finally:
        timer.finish()
        log.info("request %s ended (%s): %d tokens, first after %s", seq.log_id,
                 seq.finish_reason.value if seq.finish_reason else "unfinished", timer.num_tokens,
                 f"{timer.ttft:.3f} s" if timer.ttft is not None else "-")


def splitter(request: relay_pb2.GenerateRequest, seq: Sequence, tokenizer: PreTrainedTokenizerBase
             ) -> ReasoningSplitter | None:
    """A reasoning splitter when the request asks for one."""
    if not request.separate_reasoning:
        return None
    return ReasoningSplitter(opens_reasoning(tokenizer, seq.prompt_ids))


def split(splitter: ReasoningSplitter | None, delta: Delta) -> tuple[str, str]:
    """(reasoning, answer) of one delta; everything is answer without a splitter."""
    if splitter is None:
        return "", delta.text
    reasoning, answer = splitter.add(delta.text)
    if delta.finish_reason is not None:
        tail = splitter.flush()
        reasoning, answer = reasoning + tail[0], answer + tail[1]
    return reasoning, answer


class TextGenerationServicer(relay_pb2_grpc.TextGenerationServicer):
    """Built complete before the slices load: until the engine is `ready`, calls get UNAVAILABLE."""

    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, limits: Limits, meta: ModelMeta,
                 adapters: Container[str], metrics: Metrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.meta = meta
        self.adapters = adapters  # names requests may pick (the gateway's AdapterRegistry)
        self.metrics = metrics
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # see the module doc

    async def off_loop(self, fn, *args):
        """`fn(*args)` on the tokenizing thread (see the module doc); HTTP requests are prepared here too."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    async def _ready(self, context: grpc.aio.ServicerContext) -> Engine:
        if not self.engine.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.engine

    async def _sequence(self, request: relay_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Sequence:
        await self._ready(context)
        try:
            return await self.off_loop(prepare, request, self.tokenizer, self.limits,
                                       self.adapters.fingerprints())
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except UnknownAdapter as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def _deltas(self, seq: Sequence, context: grpc.aio.ServicerContext) -> AsyncIterator[Delta]:
        try:
            async for delta in run(self.engine, seq, self.metrics):
                yield delta
        except Exception as e:  # noqa: BLE001 - a failed step ends this call, not the server
            code = next((c for kind, c in ERROR_CODES if isinstance(e, kind)), None)
            if code is None:
                log.error("request %s failed: %r", seq.log_id, e)
                await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {public_message(e)}")
            await context.abort(code, str(e))

    def _response(self, seq: Sequence, text: str, token_ids: list[int], reason: FinishReason | None,
                  reasoning: str = "") -> relay_pb2.GenerateResponse:
        response = relay_pb2.GenerateResponse(request_id=seq.request_id, text=text, token_ids=token_ids,
                                              reasoning=reasoning)
        if reason is not None:
            response.finish_reason = FINISH_REASONS[reason]
            response.usage.prompt_tokens = len(seq.prompt_ids)
            response.usage.completion_tokens = seq.num_generated
            response.usage.cached_prompt_tokens = seq.cached_tokens or 0
        return response

    async def Generate(self, request, context):  # noqa: N802 - gRPC method names
        seq = await self._sequence(request, context)
        reasoning = splitter(request, seq, self.tokenizer)
        thoughts, texts, reason = [], [], None
        async for delta in self._deltas(seq, context):
            thought, text = split(reasoning, delta)
            thoughts.append(thought)
            texts.append(text)
            reason = delta.finish_reason
        return self._response(seq, "".join(texts), seq.generated, reason, "".join(thoughts))

    async def GenerateStream(self, request, context):  # noqa: N802
        seq = await self._sequence(request, context)
        reasoning = splitter(request, seq, self.tokenizer)
        async for delta in self._deltas(seq, context):
            thought, text = split(reasoning, delta)
            yield self._response(seq, text, delta.token_ids, delta.finish_reason, thought)

    async def Tokenize(self, request, context):  # noqa: N802
        try:
            check_size(request, self.limits)
            ids = await self.off_loop(render_prompt, request, self.tokenizer, self.limits.vocab_size)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return relay_pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    async def GetModelInfo(self, request, context):  # noqa: N802
        engine = await self._ready(context)
        stats = await engine.pipeline.stats()
        info = relay_pb2.ModelInfo(
            model_id=self.meta.model_id,
            dtype=next((s.dtype for s in stats if s.dtype), ""),  # a slice that is down reports none
            num_layers=self.meta.num_layers,
            max_context=self.limits.max_context,
            vocab_size=self.limits.vocab_size,
            max_new_tokens_cap=self.limits.max_new_tokens_cap,
            max_batch_size=self.meta.max_batch,
        )
        kv = self.engine.kv_stats()
        info.kv_capacity_tokens, info.kv_block_size, info.kv_blocks_free = (kv.capacity_tokens, kv.block_size,
                                                                            kv.blocks_free)
        info.prefix_cache, info.prefix_cache_hit_rate, info.preemptions = kv.prefix_cache, kv.hit_rate, kv.preemptions
        holding = self.engine.sequences_holding_blocks()
        for i, s in enumerate(stats):
            info.slices.add(
                index=i, first_layer=s.first, last_layer=s.end - 1, has_embeddings=s.has_embeddings,
                has_lm_head=s.has_lm_head, actor_id=s.actor_id, node_id=s.node_id, device=s.device,
                cache_entries=holding, weight_bytes=s.weight_bytes,
                peak_rss_bytes=s.peak_rss_bytes, healthy=s.healthy, restarts=s.restarts,
            )
        return info
