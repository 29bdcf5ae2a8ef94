"""Validation at the edge: a request becomes a prompt and `GenerationParams`, or an error naming the field.

Nothing invalid reaches the engine; slices assume valid batches.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from qwen_relay.shards.batch import SamplingParams

from .detokenizer import Detokenizer
from .request import GenerationRequest
from .sequence import GenerationParams, Sequence

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
DEFAULT_MAX_NEW_TOKENS = 128
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one request (gRPC message, HTTP body) and one gRPC reply
MAX_ADAPTER_CHARS = 64  # adapter names are 1-64 characters (shards/adapters.py NAME_PATTERN)
# Below this, logits / temperature can overflow float32 to inf, and the last slice's draw no longer follows the
# logits (vLLM's sampling epsilon is the same).
MIN_TEMPERATURE = 1e-5
ECHO_CHARS = 40  # error messages quote at most this much of a value: gRPC trailers are limited to 8-16 KiB
# Chat-template options a request may set, with the JSON type each takes. An allow-list: templates are code,
# and a free map would let callers steer any variable a template reads (tools, documents, date strings...).
CHAT_TEMPLATE_OPTIONS: dict[str, type] = {"enable_thinking": bool}


class InvalidRequest(ValueError):
    """Maps to INVALID_ARGUMENT: "PATH: DETAIL", PATH naming the offending field ("messages[2].role")."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail

    @property
    def field(self) -> str:
        """The request record's field, without indices ("messages" for "messages[2].role")."""
        return self.path.partition("[")[0].partition(".")[0]


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


def _float32(value: float) -> float:
    """`value` at float32 precision, as gRPC carries sampling numbers: the same request gives the same tokens over
    either API."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: infinite, as protobuf stores it
        return math.copysign(math.inf, value)


def template_options(request: GenerationRequest) -> dict[str, object]:
    """`chat_template_kwargs`, each checked against `CHAT_TEMPLATE_OPTIONS`."""
    options: dict[str, object] = {}
    for name, value in sorted(request.chat_template_kwargs.items()):
        kind = CHAT_TEMPLATE_OPTIONS.get(name)
        if kind is None:
            raise InvalidRequest("chat_template_kwargs", f"{_quote(name)} is not an allowed option (allowed: "
                                 f"{', '.join(sorted(CHAT_TEMPLATE_OPTIONS))})")
        if type(value) is not kind:
            raise InvalidRequest("chat_template_kwargs", f"{name} must be a {kind.__name__}")
        options[name] = value
    if options and not request.messages:
        raise InvalidRequest("chat_template_kwargs", "only applies to messages (the chat template renders them)")
    return options


def render_prompt(request: GenerationRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """The prompt's token ids from whichever single input the request carries."""
    token_ids = list(request.prompt_token_ids)
    given = [name for name, present in
             (("prompt", bool(request.prompt)), ("messages", len(request.messages) > 0),
              ("prompt_token_ids", len(token_ids) > 0)) if present]
    if not given:
        raise InvalidRequest("prompt", "no input given (set exactly one of prompt, messages, prompt_token_ids)")
    if len(given) > 1:
        raise InvalidRequest(given[1], f"only one input is allowed, but {' and '.join(given)} are set")
    options = template_options(request)
    if request.prompt:
        return tokenizer.encode(request.prompt, add_special_tokens=False)
    if token_ids:
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocab_size:
                raise InvalidRequest(f"prompt_token_ids[{i}]", f"token id {token} is outside the vocabulary "
                                     f"[0, {vocab_size})")
        return token_ids
    messages = []
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"unknown role {_quote(message.role)} "
                                 f"(expected one of {', '.join(sorted(ROLES))})")
        messages.append({"role": message.role, "content": message.content})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **options)
    return tokenizer.encode(text, add_special_tokens=False)


def check_size(request: GenerationRequest, limits: Limits) -> None:
    """Refuse input that cannot fit the context before tokenizing it: tokenizing runs on the event loop."""
    if len(request.prompt) > limits.max_context * 64:
        raise InvalidRequest("prompt", f"{len(request.prompt)} characters cannot fit the context limit "
                             f"{limits.max_context} tokens")
    chars = sum(len(m.role) + len(m.content) for m in request.messages)
    if chars > limits.max_context * 64:
        raise InvalidRequest("messages", f"{chars} characters cannot fit the context limit {limits.max_context} "
                             f"tokens")
    if len(request.prompt_token_ids) > limits.max_context:
        raise InvalidRequest("prompt_token_ids", f"{len(request.prompt_token_ids)} tokens cannot fit the context "
                             f"limit {limits.max_context}")


def validate(request: GenerationRequest, tokenizer: PreTrainedTokenizerBase,
             limits: Limits) -> tuple[str, list[int], GenerationParams]:
    """Request id, prompt token ids and generation parameters, or `InvalidRequest`."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    request_id = request.request_id or secrets.token_hex(8)
    # Cheap checks first, so a huge prompt with a bad number is refused before tokenizing it.
    temperature = _float32(request.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {temperature}")
    # float32: 1e-5 becomes 9.99999974e-06; 7 significant digits give back what was sent.
    if 0 < float(f"{temperature:.7g}") < MIN_TEMPERATURE:
        raise InvalidRequest("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}")
    top_p = 1.0 if request.top_p is None else _float32(request.top_p)
    if not 0.0 < top_p <= 1.0:  # also false for NaN
        raise InvalidRequest("top_p", f"must lie in (0, 1], got {top_p}")
    if request.max_new_tokens > limits.max_new_tokens_cap:
        raise InvalidRequest("max_new_tokens", f"{request.max_new_tokens} is above the server cap "
                             f"{limits.max_new_tokens_cap}")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(request.stop)}")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters long")
    if len(request.adapter) > MAX_ADAPTER_CHARS:
        raise InvalidRequest("adapter", f"longer than {MAX_ADAPTER_CHARS} characters")
    check_size(request, limits)
    prompt_ids = render_prompt(request, tokenizer, limits.vocab_size)
    if not prompt_ids:
        raise InvalidRequest("prompt", "renders to no tokens")
    room = limits.max_context - len(prompt_ids)
    if room < 1:
        raise InvalidRequest("prompt", f"{len(prompt_ids)} tokens leave no room for a new token in the context "
                             f"limit {limits.max_context}")
    # The default is held to the room left (as OpenAI and vLLM do): an error naming max_new_tokens would be about
    # a parameter the client never sent. A value the client did send stays an error when it does not fit.
    max_new = request.max_new_tokens or min(limits.default_max_new_tokens, room)
    if max_new > room:
        raise InvalidRequest("max_new_tokens", f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) "
                             f"exceeds the context limit {limits.max_context}")
    seed = secrets.randbits(63) if request.seed is None else request.seed
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=request.top_k, seed=seed)
    params = GenerationParams(max_new_tokens=max_new, sampling=sampling, stop=tuple(request.stop),
                              ignore_eos=request.ignore_eos, adapter=request.adapter)
    return request_id, prompt_ids, params


def prepare(request: GenerationRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits,
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
