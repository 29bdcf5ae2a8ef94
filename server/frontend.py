"""The front-end core gRPC, HTTP and adapter admin are thin adapters over (TGI's shape: validation at the edge,
one call into the model per request).

Each API turns its request into a `GenerationRequest` (server/request.py) and calls a `Frontend`: one readiness
check, validation and tokenizing on one worker thread with a bounded queue, generation, and the deltas folded
into answer pieces the same way for unary and streaming calls. Errors leave as exceptions; `describe` maps each
to its gRPC code and its HTTP status + OpenAI error type from one table (`ERRORS`), so the APIs cannot drift.

Requests are rendered and tokenized on one worker thread, not on the event loop: a chat of 30k small messages
passes the size check yet takes seconds to render, and every stream would stall meanwhile. One thread, because
a Hugging Face fast tokenizer must not be used by two threads at once. Its queue is bounded like the engine's
admission queue (`--max-queue`): beyond it a request is refused at once (`Overloaded`), since requests waiting
to be tokenized are not yet in the admission queue the engine bounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from transformers import PreTrainedTokenizerBase

from qwen_relay.v1 import relay_pb2

from .engine import AdapterLost, Engine, Overloaded, ReplayLimit, Unavailable
from .metrics import Metrics
from .reasoning import ReasoningSplitter, opens_reasoning
from .request import GenerationRequest
from .sequence import FinishReason, Sequence
from .validation import InvalidRequest, Limits, UnknownAdapter, check_size, prepare, render_prompt

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_ERROR_CHARS = 300


class Loading(Unavailable):
    """The slices are not loaded yet."""

    def __init__(self) -> None:
        super().__init__("the model is still loading; retry shortly")


# ------------------------------------------------------------------------------------------ error statuses


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                      429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


@dataclass(frozen=True)
class Status:
    """How one kind of error is answered: its gRPC code, and its HTTP status with OpenAI's error `code`."""

    grpc: grpc.StatusCode
    http: int
    code: str

    @property
    def openai_type(self) -> str:
        return OPENAI_ERROR_TYPES.get(self.http, "server_error")


ErrorTable = Seq[tuple[type[BaseException], Status]]
ERRORS: ErrorTable = (  # errors a client can act on, most specific first; anything else is INTERNAL
    (InvalidRequest, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_value")),
    (UnknownAdapter, Status(grpc.StatusCode.NOT_FOUND, 404, "model_not_found")),
    (Overloaded, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "queue_full")),
    (Loading, Status(grpc.StatusCode.UNAVAILABLE, 503, "loading")),
    (Unavailable, Status(grpc.StatusCode.UNAVAILABLE, 503, "unavailable")),
    (AdapterLost, Status(grpc.StatusCode.FAILED_PRECONDITION, 404, "model_not_found")),  # unloaded: not served
    (ReplayLimit, Status(grpc.StatusCode.INTERNAL, 500, "generation_failed")),
)
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "generation_failed")


def public_message(error: BaseException) -> str:
    """An error as a client may read it: the root cause's first line, clipped. Never a remote traceback: Ray's
    `RayTaskError` text is one, with file paths, addresses and pids (the full error goes to the log)."""
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def describe(error: BaseException, what: str, table: ErrorTable = ERRORS) -> tuple[Status, str]:
    """The status and client-facing message of `error`; one the table does not know is a server fault: logged
    at ERROR with its traceback, answered INTERNAL / 500 without it."""
    status = next((s for kind, s in table if isinstance(error, kind)), None)
    if status is not None:
        return status, str(error)
    log.error("%s failed: %r", what, error, exc_info=error)
    return INTERNAL, f"{what} failed: {public_message(error)}"


# ------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class FinishNames:
    grpc: relay_pb2.FinishReason
    openai: str


FINISH_REASONS = {
    FinishReason.EOS: FinishNames(relay_pb2.FINISH_REASON_EOS, "stop"),
    FinishReason.LENGTH: FinishNames(relay_pb2.FINISH_REASON_LENGTH, "length"),
    FinishReason.STOP_SEQUENCE: FinishNames(relay_pb2.FINISH_REASON_STOP_SEQUENCE, "stop"),
}


@dataclass(frozen=True)
class Piece:
    """Answer text of one delta (streaming) or of the whole generation (unary): `reasoning` is what a reasoning
    splitter took out of `text` (empty without one)."""

    reasoning: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # of the prompt's, those whose KV came from the prefix cache


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to generate."""

    seq: Sequence
    reasoning: ReasoningSplitter | None  # set when the request asked for reasoning to be separated

    @property
    def usage(self) -> Usage:
        return Usage(len(self.seq.prompt_ids), self.seq.num_generated, self.seq.cached_tokens or 0)


def _split(splitter: ReasoningSplitter | None, text: str, finished: bool) -> tuple[str, str]:
    """(reasoning, answer) of one delta's text; everything is answer without a splitter."""
    if splitter is None:
        return "", text
    reasoning, answer = splitter.add(text)
    if finished:
        tail = splitter.flush()
        reasoning, answer = reasoning + tail[0], answer + tail[1]
    return reasoning, answer


# ----------------------------------------------------------------------------------------------- the core


class AdapterNames(Protocol):
    """The adapter registry, as validation sees it."""

    def fingerprints(self) -> dict[str, str]:
        """Loaded adapter name -> fingerprint of its files (part of every cached KV block's key)."""
        ...


class Frontend:
    """What every API calls; built before the slices load (until the engine is ready, `Loading`)."""

    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, limits: Limits,
                 adapters: AdapterNames, metrics: Metrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.adapters = adapters  # what requests may pick (the gateway's AdapterRegistry)
        self.metrics = metrics
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # see the module doc
        self._tokenizing_jobs = 0  # submitted and not yet answered

    def check_ready(self) -> Engine:
        if not self.engine.ready:
            raise Loading()
        return self.engine

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizing thread; `Overloaded` when `--max-queue` jobs already wait for it."""
        limit = self.engine.config.max_queue
        if self._tokenizing_jobs >= limit:
            raise Overloaded(f"tokenizer queue is full: {self._tokenizing_jobs} requests wait to be rendered and "
                             f"tokenized (limit --max-queue {limit})")
        self._tokenizing_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)
        finally:
            self._tokenizing_jobs -= 1

    async def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate and tokenize: `Loading`, `InvalidRequest`, `UnknownAdapter` or `Overloaded` otherwise."""
        self.check_ready()
        seq = await self._off_loop(prepare, request, self.tokenizer, self.limits, self.adapters.fingerprints())
        splitter = ReasoningSplitter(opens_reasoning(self.tokenizer, seq.prompt_ids)) \
            if request.separate_reasoning else None
        return Prepared(seq, splitter)

    async def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (no readiness needed: only the tokenizer is used)."""
        check_size(request, self.limits)
        return await self._off_loop(render_prompt, request, self.tokenizer, self.limits.vocab_size)

    async def pieces(self, prepared: Prepared) -> AsyncIterator[Piece]:
        """The answer one delta at a time, timed and logged; raises the engine's errors (see `describe`).
        Leaving early cancels the generation."""
        seq = prepared.seq
        log.info("request %s: %d prompt tokens, max_new_tokens %d", seq.log_id, len(seq.prompt_ids),
                 seq.params.max_new_tokens)
        timer = self.metrics.generation()
        try:
            async for delta in self.engine.generate(seq):
                timer.tokens(len(delta.token_ids))
                finished = delta.finish_reason is not None
                reasoning, text = _split(prepared.reasoning, delta.text, finished)
                yield Piece(reasoning, text, delta.token_ids, delta.finish_reason)
        finally:
            timer.finish()
            log.info("request %s ended (%s): %d tokens, first after %s", seq.log_id,
                     seq.finish_reason.value if seq.finish_reason else "unfinished", timer.num_tokens,
                     f"{timer.ttft:.3f} s" if timer.ttft is not None else "-")

    @staticmethod
    async def fold(first: Piece | None, rest: AsyncIterator[Piece], prepared: Prepared) -> Piece:
        """The whole answer from its pieces (`first`, if already taken, then `rest`), as a unary call returns it."""
        reasoning, texts, reason = [], [], None
        try:
            piece = first if first is not None else await anext(rest)
            while True:
                reasoning.append(piece.reasoning)
                texts.append(piece.text)
                reason = piece.finish_reason
                if reason is not None:
                    break
                piece = await anext(rest)
        finally:
            await rest.aclose()
        return Piece("".join(reasoning), "".join(texts), prepared.seq.generated, reason)
