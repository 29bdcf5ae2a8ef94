"""Validation at the edge: a request becomes a prompt and `GenerationParams`, or an error naming the field.

Nothing invalid reaches the engine; slices assume valid batches.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from qwen_relay.shards.batch import SamplingParams
from qwen_relay.v1 import relay_pb2

from .detokenizer import Detokenizer
from .sequence import GenerationParams, Sequence

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
DEFAULT_MAX_NEW_TOKENS = 128
MAX_ADAPTER_CHARS = 64  # adapter names are 1-64 characters (shards/adapters.py NAME_PATTERN)
# Below this, logits / temperature overflows float32 to inf, softmax gives NaN and the sampler raises inside
# the last slice, failing every sequence in that step (vLLM's sampling epsilon is the same).
MIN_TEMPERATURE = 1e-5
ECHO_CHARS = 40  # error messages quote at most this much of a value: gRPC trailers are limited to 8-16 KiB
# Chat-template options a request may set, with the JSON type each takes. An allow-list: templates are code,
# and a free map would let callers steer any variable a template reads (tools, documents, date strings...).
CHAT_TEMPLATE_OPTIONS: dict[str, str] = {"enable_thinking": "bool_value"}


class InvalidRequest(ValueError):
    """Maps to INVALID_ARGUMENT; the message starts with the offending field."""

    @property
    def field(self) -> str:
        """The request field the message starts with, without indices ("messages" for "messages[2].role")."""
        return str(self).partition(":")[0].partition("[")[0].partition(".")[0]


class UnknownAdapter(LookupError):
    """Maps to NOT_FOUND: the request names an adapter that is not loaded."""

    def __str__(self) -> str:
        return str(self.args[0])


def _quote(value: str) -> str:
    """`value` quoted for an error message, clipped: echoing megabytes would exceed the client's trailer limit
    and turn the answer into a transport error."""
    return repr(value) if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int
    default_max_new_tokens: int | None = None  # when a request leaves max_new_tokens at 0; None: 128 or the cap
    max_new_tokens_cap: int = 1024

    def __post_init__(self) -> None:
        if self.default_max_new_tokens is None:  # held to the cap, so a lower cap alone does not break defaults
            object.__setattr__(self, "default_max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_cap))
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_cap:
            raise ValueError(f"--default-max-new-tokens {self.default_max_new_tokens} must lie in 1.."
                             f"{self.max_new_tokens_cap} (--max-new-tokens-cap)")


def template_options(request: relay_pb2.GenerateRequest | relay_pb2.TokenizeRequest) -> dict[str, object]:
    """`chat_template_kwargs` as Python values, each checked against `CHAT_TEMPLATE_OPTIONS`."""
    options: dict[str, object] = {}
    for name, value in sorted(request.chat_template_kwargs.items()):
        kind = CHAT_TEMPLATE_OPTIONS.get(name)
        if kind is None:
            raise InvalidRequest(f"chat_template_kwargs: {_quote(name)} is not an allowed option (allowed: "
                                 f"{', '.join(sorted(CHAT_TEMPLATE_OPTIONS))})")
        if value.WhichOneof("kind") != kind:
            raise InvalidRequest(f"chat_template_kwargs: {name} must be a {kind.removesuffix('_value')}")
        options[name] = getattr(value, kind)
    if options and not request.messages:
        raise InvalidRequest("chat_template_kwargs: only applies to messages (the chat template renders them)")
    return options


def render_prompt(request: relay_pb2.GenerateRequest | relay_pb2.TokenizeRequest,
                  tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """The prompt's token ids from whichever single input the request carries."""
    token_ids = list(getattr(request, "prompt_token_ids", ()))
    given = [name for name, present in
             (("prompt", bool(request.prompt)), ("messages", len(request.messages) > 0),
              ("prompt_token_ids", len(token_ids) > 0)) if present]
    if not given:
        raise InvalidRequest("prompt: no input given (set exactly one of prompt, messages, prompt_token_ids)")
    if len(given) > 1:
        raise InvalidRequest(f"{given[1]}: only one input is allowed, but {' and '.join(given)} are set")
    options = template_options(request)
    if request.prompt:
        return tokenizer.encode(request.prompt, add_special_tokens=False)
    if token_ids:
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocab_size:
                raise InvalidRequest(f"prompt_token_ids[{i}]: token id {token} is outside the vocabulary "
                                     f"[0, {vocab_size})")
        return token_ids
    messages = []
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role: unknown role {_quote(message.role)} "
                                 f"(expected one of {', '.join(sorted(ROLES))})")
        messages.append({"role": message.role, "content": message.content})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **options)
    return tokenizer.encode(text, add_special_tokens=False)


def check_size(request: relay_pb2.GenerateRequest | relay_pb2.TokenizeRequest, limits: Limits) -> None:
    """Refuse input that cannot fit the context before tokenizing it: tokenizing runs on the event loop."""
    if len(request.prompt) > limits.max_context * 64:
        raise InvalidRequest(f"prompt: {len(request.prompt)} characters cannot fit the context limit "
                             f"{limits.max_context} tokens")
    chars = sum(len(m.role) + len(m.content) for m in request.messages)
    if chars > limits.max_context * 64:
        raise InvalidRequest(f"messages: {chars} characters cannot fit the context limit {limits.max_context} "
                             f"tokens")
    token_ids = getattr(request, "prompt_token_ids", ())
    if len(token_ids) > limits.max_context:
        raise InvalidRequest(f"prompt_token_ids: {len(token_ids)} tokens cannot fit the context "
                             f"limit {limits.max_context}")


def validate(request: relay_pb2.GenerateRequest, tokenizer: PreTrainedTokenizerBase,
             limits: Limits) -> tuple[str, list[int], GenerationParams]:
    """Request id, prompt token ids and generation parameters, or `InvalidRequest`."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id: longer than {MAX_REQUEST_ID_CHARS} characters")
    request_id = request.request_id or secrets.token_hex(8)
    # Cheap checks first, so a huge prompt with a bad number is refused before tokenizing it.
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise InvalidRequest(f"temperature: must be a finite number >= 0, got {request.temperature}")
    # float32 on the wire: 1e-5 arrives as 9.99999974e-06; 7 significant digits give back what was sent.
    if 0 < float(f"{request.temperature:.7g}") < MIN_TEMPERATURE:
        raise InvalidRequest(f"temperature: must be 0 (greedy) or at least {MIN_TEMPERATURE}, "
                             f"got {request.temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:  # also false for NaN
        raise InvalidRequest(f"top_p: must lie in (0, 1], got {top_p}")
    if request.max_new_tokens > limits.max_new_tokens_cap:
        raise InvalidRequest(f"max_new_tokens: {request.max_new_tokens} is above the server cap "
                             f"{limits.max_new_tokens_cap}")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(request.stop)}")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{i}]: must be 1 to {MAX_STOP_CHARS} characters long")
    if len(request.adapter) > MAX_ADAPTER_CHARS:
        raise InvalidRequest(f"adapter: longer than {MAX_ADAPTER_CHARS} characters")
    check_size(request, limits)
    prompt_ids = render_prompt(request, tokenizer, limits.vocab_size)
    if not prompt_ids:
        raise InvalidRequest("prompt: renders to no tokens")
    max_new = request.max_new_tokens or limits.default_max_new_tokens
    if len(prompt_ids) + max_new > limits.max_context:
        raise InvalidRequest(f"max_new_tokens: prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) "
                             f"exceeds the context limit {limits.max_context}")
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    sampling = SamplingParams(temperature=request.temperature, top_p=top_p, top_k=request.top_k, seed=seed)
    params = GenerationParams(max_new_tokens=max_new, sampling=sampling, stop=tuple(request.stop),
                              ignore_eos=request.ignore_eos, adapter=request.adapter)
    return request_id, prompt_ids, params


def prepare(request: relay_pb2.GenerateRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits,
            adapters: Mapping[str, str]) -> Sequence:
    """The one way a request becomes a `Sequence`, for gRPC and HTTP alike: `InvalidRequest` or
    `UnknownAdapter` otherwise. `adapters`: loaded adapter name -> fingerprint of its files (part of the key of
    every KV block it computes, server/block_manager.py)."""
    request_id, prompt_ids, params = validate(request, tokenizer, limits)
    if params.adapter:
        if params.adapter not in adapters:
            raise UnknownAdapter(f"adapter: no adapter named {params.adapter!r} is loaded")
        params = dataclasses.replace(params, adapter_fingerprint=adapters[params.adapter])
    return Sequence(request_id, prompt_ids, params, Detokenizer(tokenizer, params.stop))
