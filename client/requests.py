"""Building the requests both clients send, so a GenerateRequest is built one way whatever the transport."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from qwen_relay.v1 import relay_pb2

# A chat message as callers write it: {"role": ..., "content": ...} or the proto itself.
MessageLike = Mapping[str, str] | relay_pb2.ChatMessage


def to_chat_message(message: MessageLike) -> relay_pb2.ChatMessage:
    """Turns a ``{"role", "content"}`` dict (or a ChatMessage) into the proto, failing loudly on a typo."""
    if isinstance(message, relay_pb2.ChatMessage):
        return relay_pb2.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        try:
            return relay_pb2.ChatMessage(role=message["role"], content=message["content"])
        except KeyError as err:
            keys = sorted(message)
            raise ValueError(f"a chat message needs 'role' and 'content', got keys {keys}") from err
    raise TypeError(f"a chat message is a dict with 'role' and 'content', not {type(message).__name__}")


def _exactly_one(**inputs: Any) -> None:
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(inputs)
        raise ValueError(f"pass exactly one of {names}; got {', '.join(given) or 'none'}")


def _template_value(name: str, value: Any) -> struct_pb2.Value:
    """One chat-template option as a protobuf Value (JSON types: bool, number, string)."""
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    raise TypeError(f"chat_template_kwargs[{name!r}] must be a bool, number or string, not {type(value).__name__}")


def _set_template_kwargs(request: Any, options: Mapping[str, Any] | None) -> None:
    for name, value in (options or {}).items():
        request.chat_template_kwargs[name].CopyFrom(_template_value(name, value))


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[MessageLike] | None = None,
    prompt_token_ids: Iterable[int] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    ignore_eos: bool = False,
    adapter: str | None = None,
    request_id: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    separate_reasoning: bool = False,
) -> relay_pb2.GenerateRequest:
    """Builds the one GenerateRequest both clients send.

    ``None`` means "leave it to the server": max_new_tokens 0 is the server default, temperature 0 is greedy,
    and top_p / seed stay unset (they are proto3 ``optional``, so unset differs from 0). A single ``stop``
    string is accepted as a list of one. Unknown keyword arguments raise TypeError, so a misspelt parameter
    never silently does nothing. Range checks (top_p in (0, 1], caps) are the server's job.

    ``chat_template_kwargs`` (with ``messages``) passes options to the chat template, e.g.
    ``{"enable_thinking": False}``; the server accepts an allow-listed set. ``separate_reasoning`` asks for
    the model's ``<think>`` block in ``reasoning``, apart from ``text``.
    """
    _exactly_one(prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids)
    request = relay_pb2.GenerateRequest()
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.extend(to_chat_message(m) for m in messages)
    else:
        assert prompt_token_ids is not None
        request.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    if request_id:
        request.request_id = request_id
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        request.seed = seed
    if stop is not None:
        request.stop.extend([stop] if isinstance(stop, str) else list(stop))
    request.ignore_eos = bool(ignore_eos)
    if adapter:
        request.adapter = adapter
    _set_template_kwargs(request, chat_template_kwargs)
    request.separate_reasoning = bool(separate_reasoning)
    return request


def build_tokenize_request(
    prompt: str | None = None,
    messages: Iterable[MessageLike] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> relay_pb2.TokenizeRequest:
    """Builds a TokenizeRequest from exactly one of a prompt or chat messages (and template options)."""
    _exactly_one(prompt=prompt, messages=messages)
    if prompt is not None:
        request = relay_pb2.TokenizeRequest(prompt=prompt)
    else:
        assert messages is not None
        request = relay_pb2.TokenizeRequest(messages=[to_chat_message(m) for m in messages])
    _set_template_kwargs(request, chat_template_kwargs)
    return request
