"""OpenAI bodies to request records, and answers back to OpenAI's JSON: response objects, chunks and their
server-sent-event stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .engine import AdapterLost
from .frontend import FINISH_REASONS, Piece, Prepared, describe
from .http_bodies import ApiError, ChatCompletionRequest, Sampling
from .request import ChatTurn, GenerationRequest
from .validation import InvalidRequest, UnknownAdapter

log = logging.getLogger(__name__)

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system messages


def to_request(body: Sampling, adapter: str) -> GenerationRequest:
    """The request record an OpenAI body means; validation then checks it as any other."""
    common = dict(adapter=adapter, temperature=1.0 if body.temperature is None else body.temperature,
                  top_p=body.top_p, top_k=max(body.top_k or 0, 0), seed=body.seed, ignore_eos=body.ignore_eos,
                  stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()))
    if isinstance(body, ChatCompletionRequest):
        messages = []
        for i, message in enumerate(body.messages):
            if isinstance(message.content, list):  # parts are lines, as vLLM joins them
                content = "\n".join(part.text for part in message.content)
            elif message.content is None:
                raise ApiError(400, f"messages[{i}].content: required", "messages", "invalid_value")
            else:
                content = message.content
            messages.append(ChatTurn(ROLE_ALIASES.get(message.role, message.role), content))
        return GenerationRequest(messages=tuple(messages), chat_template_kwargs=body.chat_template_kwargs or {},
                                 max_new_tokens=body.max_completion_tokens or body.max_tokens or 0,
                                 separate_reasoning=body.separate_reasoning, **common)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: only one prompt per request (a batch would need n choices)", "prompt",
                           "unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return GenerationRequest(prompt=prompt, max_new_tokens=body.max_tokens or 0, **common)
    return GenerationRequest(prompt_token_ids=tuple(prompt), max_new_tokens=body.max_tokens or 0, **common)


def invalid(error: InvalidRequest, body: Sampling) -> ApiError:
    """A validation error naming the OpenAI parameter (validation names the request record's field)."""
    chat = isinstance(body, ChatCompletionRequest)
    max_name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    names = {"max_new_tokens": max_name, "prompt_token_ids": "prompt", "adapter": "model",
             "prompt": "messages" if chat else "prompt"}
    param = names.get(error.field, error.field)
    status, _ = describe(error, "validation")
    return ApiError.of(status, f"{param}{error.path[len(error.field):]}: {error.detail}", param)


def failure(error: BaseException) -> ApiError:
    """Any other error of a request, with the status `frontend.ERRORS` gives it."""
    param = "model" if isinstance(error, UnknownAdapter | AdapterLost) else None
    return ApiError.of(*describe(error, "generation"), param)


@dataclass(frozen=True)
class Reply:
    """One request's identity in every response object and chunk."""

    prepared: Prepared
    model: str
    chat: bool
    created: int
    separates_reasoning: bool  # unary chat answers carry reasoning_content (maybe empty)
    token_ids: bool  # choices carry the generated token ids (return_token_ids)

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{self.prepared.seq.request_id}", "object": kind,
                "created": self.created, "model": self.model}

    def usage(self) -> dict[str, Any]:
        u = self.prepared.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}

    def choice(self, piece: Piece, chunk: bool) -> dict[str, Any]:
        finish = FINISH_REASONS[piece.finish_reason].openai if piece.finish_reason in FINISH_REASONS else None
        ids = {"token_ids": piece.token_ids} if self.token_ids else {}
        if not self.chat:
            return {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": finish, **ids}
        message: dict[str, Any] = {} if chunk else {"role": "assistant", "content": piece.text}
        if chunk and piece.text:
            message["content"] = piece.text
        if piece.reasoning or (not chunk and self.separates_reasoning):
            message["reasoning_content"] = piece.reasoning
        return {"index": 0, ("delta" if chunk else "message"): message, "logprobs": None, "finish_reason": finish,
                **ids}

    def completion(self, answer: Piece) -> dict[str, Any]:
        """The unary response object."""
        return {**self.head(False), "choices": [self.choice(answer, False)], "usage": self.usage()}


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def events(reply: Reply, first: Piece, rest: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: (chat: a role chunk), pieces, a finish chunk, maybe a usage chunk, [DONE]."""
    usage = {"usage": None} if include_usage else {}
    try:
        if reply.chat:
            yield _sse({**reply.head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}], **usage})
        piece: Piece | None = first
        while piece is not None:
            if piece.reasoning or piece.text or piece.finish_reason is not None or reply.token_ids:
                yield _sse({**reply.head(True), "choices": [reply.choice(piece, True)], **usage})
            if piece.finish_reason is not None:
                break
            piece = await anext(rest, None)
        if include_usage:
            yield _sse({**reply.head(True), "choices": [], "usage": reply.usage()})
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        log.warning("request %s failed mid-stream: %s", reply.prepared.seq.request_id, e)
        yield _sse(failure(e).body())
    finally:
        await rest.aclose()
    yield _sse("[DONE]")
