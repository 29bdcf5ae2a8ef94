"""What the sync and asyncio clients share: request building, response conversion, connection settings.

Both clients go through these functions, so a GenerateRequest is built one way and a response reads one way;
the transport (``grpc`` vs ``grpc.aio``) is the only thing the two client classes differ in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_NEW_TOKENS = 128  # what the server uses for max_new_tokens 0 (ServeOptions.default_max_new_tokens)


@dataclass(frozen=True)
class Deadlines:
    """Default deadlines, so that a stuck or unreachable server never hangs a caller.

    A call that makes no tokens (health, tokenize, model info, adapters) gets ``connect`` seconds: enough to
    connect and answer. A generation gets ``start`` seconds (connecting, queueing for a slot, the prefill)
    plus ``per_token`` seconds for each requested new token; a stream's deadline covers the whole stream.
    ``per_token`` is generous for a model that fits its slices (tens to hundreds of ms per token on CPU).
    """

    connect: float = 30.0
    start: float = 60.0
    per_token: float = 2.0
    load_adapter: float = 300.0  # reads the adapter's weights on every slice

    def generation(self, max_new_tokens: int | None) -> float:
        """The deadline of a generation; 0 or None new tokens means the server's default (128)."""
        return self.start + self.per_token * (max_new_tokens or DEFAULT_MAX_NEW_TOKENS)

# A chat message as callers write it: {"role": ..., "content": ...} or the proto itself.
MessageLike = Mapping[str, str] | relay_pb2.ChatMessage

_FINISH_PREFIX = "FINISH_REASON_"


# --------------------------------------------------------------------------------------------- requests


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


# -------------------------------------------------------------------------------------------- responses


def finish_reason_name(value: int) -> str | None:
    """Maps the FinishReason enum to "eos" / "length" / "stop_sequence"; None while not finished."""
    if value == relay_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        name = relay_pb2.FinishReason.Name(value)
    except ValueError:  # a newer server with a reason this client does not know yet
        return f"unknown_{value}"
    return name.removeprefix(_FINISH_PREFIX).lower()


def _as_dict(obj: Any) -> dict[str, Any]:
    """Dataclass fields as plain data, leaving out the raw proto (which JSON cannot hold)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "raw":
            continue
        value = getattr(obj, f.name)
        if isinstance(value, list):
            value = [_as_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


@dataclass(frozen=True)
class Completion:
    """A whole completion; ``raw`` is the GenerateResponse it came from (None when joined from chunks)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    reasoning: str = ""  # with separate_reasoning: the <think> block's text, apart from ``text``
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose KV the server found in its prefix cache
    raw: relay_pb2.GenerateResponse | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``json.dumps``."""
        return _as_dict(self)


@dataclass(frozen=True)
class Chunk:
    """One streamed delta. finish_reason and the token counts are set on the last chunk only."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    request_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning: str = ""  # with separate_reasoning: this delta's share of the <think> block
    cached_prompt_tokens: int | None = None
    raw: relay_pb2.GenerateResponse | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``json.dumps``."""
        return _as_dict(self)


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    count: int
    raw: relay_pb2.TokenizeResponse | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class SliceInfo:
    """Where one layer slice runs; mirrors relay.proto's SliceInfo (layers inclusive)."""

    index: int
    first_layer: int
    last_layer: int
    has_embeddings: bool
    has_lm_head: bool
    actor_id: str
    node_id: str
    device: str
    cache_entries: int
    weight_bytes: int
    peak_rss_bytes: int
    healthy: bool = True  # False: the slice did not answer the gateway's stats call
    restarts: int = 0  # times the slice was restarted since the gateway started


@dataclass(frozen=True)
class ModelInfo:
    """The served model; fields a newer server adds are still reachable through ``raw``."""

    model_id: str
    dtype: str
    num_layers: int
    max_context: int
    vocab_size: int
    max_new_tokens_cap: int
    max_batch_size: int
    slices: list[SliceInfo]
    kv_capacity_tokens: int = 0  # tokens the KV cache holds (the same on every slice)
    kv_block_size: int = 0
    kv_blocks_free: int = 0
    prefix_cache: bool = False
    prefix_cache_hit_rate: float = 0.0  # prompt tokens found in the cache / prompt tokens, since start
    preemptions: int = 0
    raw: relay_pb2.ModelInfo | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded LoRA adapter; mirrors relay.proto's AdapterInfo (layers are global indices)."""

    name: str
    path: str
    r: int
    alpha: float
    target_modules: list[str]
    layers: list[int]
    base_model: str
    raw: relay_pb2.AdapterInfo | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _copy_fields(cls: type, message: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("raw", *skip)]
    return {name: getattr(message, name) for name in names}


def completion_from_response(response: relay_pb2.GenerateResponse) -> Completion:
    return Completion(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason_name(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        request_id=response.request_id,
        reasoning=response.reasoning,
        cached_prompt_tokens=response.usage.cached_prompt_tokens,
        raw=response,
    )


def chunk_from_response(response: relay_pb2.GenerateResponse) -> Chunk:
    has_usage = response.HasField("usage")
    return Chunk(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason_name(response.finish_reason),
        request_id=response.request_id,
        prompt_tokens=response.usage.prompt_tokens if has_usage else None,
        completion_tokens=response.usage.completion_tokens if has_usage else None,
        reasoning=response.reasoning,
        cached_prompt_tokens=response.usage.cached_prompt_tokens if has_usage else None,
        raw=response,
    )


def tokenize_result_from_response(response: relay_pb2.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(token_ids=list(response.token_ids), count=response.count, raw=response)


def model_info_from_response(response: relay_pb2.ModelInfo) -> ModelInfo:
    slices = [SliceInfo(**_copy_fields(SliceInfo, s)) for s in response.slices]
    return ModelInfo(**_copy_fields(ModelInfo, response, skip=("slices",)), slices=slices, raw=response)


def adapter_info_from_response(response: relay_pb2.AdapterInfo) -> AdapterInfo:
    fields = _copy_fields(AdapterInfo, response, skip=("target_modules", "layers"))
    return AdapterInfo(**fields, target_modules=list(response.target_modules), layers=list(response.layers),
                       raw=response)


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    """The status as its name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN): readable in logs and CLIs."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class CompletionBuilder:
    """Joins stream chunks into one Completion, so a streamed reply reads like a unary one."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._token_ids: list[int] = []
        self._finish_reason: str | None = None
        self._request_id = ""
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._cached_prompt_tokens = 0

    def add(self, chunk: Chunk) -> None:
        self._text.append(chunk.text)
        self._reasoning.append(chunk.reasoning)
        self._token_ids.extend(chunk.token_ids)
        self._request_id = self._request_id or chunk.request_id
        if chunk.finish_reason is not None:
            self._finish_reason = chunk.finish_reason
        if chunk.prompt_tokens is not None:
            self._prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self._completion_tokens = chunk.completion_tokens
        if chunk.cached_prompt_tokens is not None:
            self._cached_prompt_tokens = chunk.cached_prompt_tokens

    @property
    def text(self) -> str:
        return "".join(self._text)

    def build(self) -> Completion:
        """The completion so far; without a usage chunk the counts fall back to what was seen."""
        return Completion(
            text=self.text,
            token_ids=list(self._token_ids),
            finish_reason=self._finish_reason,
            prompt_tokens=self._prompt_tokens or 0,
            completion_tokens=(
                self._completion_tokens if self._completion_tokens is not None else len(self._token_ids)
            ),
            request_id=self._request_id,
            reasoning="".join(self._reasoning),
            cached_prompt_tokens=self._cached_prompt_tokens,
        )


def completion_from_chunks(chunks: Iterable[Chunk]) -> Completion:
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.build()


def describe_rpc_error(err: grpc.RpcError) -> str:
    """``"INVALID_ARGUMENT: top_p must lie in (0, 1]"``: the status code and message, for people to read."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code is not None else 'UNKNOWN'}: {details}"


# ------------------------------------------------------------------------------------------- connection


def channel_credentials(
    tls: bool = False,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS setting is given, else None (plaintext).

    ``tls=True`` alone trusts the system roots; ``root_certificates`` pins a CA (a self-signed server);
    ``private_key`` + ``certificate_chain`` add a client certificate (mutual TLS) and only work as a pair.
    """
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate, mutual TLS)")
    if not (tls or root_certificates is not None or private_key is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def call_metadata(
    auth_token: str | None, extra: Iterable[tuple[str, str]] | None = None
) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token rides on every call (plaintext or TLS alike)."""
    metadata = [(key.lower(), value) for key, value in (extra or ())]
    if auth_token:
        metadata.append(("authorization", f"Bearer {auth_token}"))
    return tuple(metadata)


class BaseClient:
    """Connection settings both clients share; subclasses only open their kind of channel.

    Args:
        target: ``host:port`` of the gateway.
        timeout: one deadline in seconds for every call (a stream's deadline covers the whole stream), in place
            of ``deadlines``; ``math.inf`` waits forever. Each method takes ``timeout=`` to override it per call.
        deadlines: the default deadlines when ``timeout`` is None (see ``Deadlines``).
        tls: use TLS with the system roots even when no certificate is given.
        root_certificates / private_key / certificate_chain: PEM bytes for ``grpc.ssl_channel_credentials``.
        server_name_override: the name to check the server certificate against (a test certificate issued
            to "localhost" while dialling 127.0.0.1).
        auth_token: sent as ``authorization: Bearer <token>`` on every call.
        metadata: extra ``(key, value)`` pairs sent on every call.
        options: extra channel options, e.g. ``[("grpc.max_receive_message_length", ...)]``.
        wait_for_ready: queue calls while the server is not up yet instead of failing with UNAVAILABLE.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        deadlines: Deadlines = Deadlines(),
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name_override: str | None = None,
        auth_token: str | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        wait_for_ready: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.deadlines = deadlines
        self._credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
        self._options = list(options or ())
        if server_name_override:
            self._options.append(("grpc.ssl_target_name_override", server_name_override))
        self._metadata = call_metadata(auth_token, metadata)
        self._wait_for_ready = wait_for_ready
        logger.debug("opening channel to %s (tls=%s)", target, self._credentials is not None)
        self._channel = self._open_channel()
        # Generated stubs work over sync and aio channels alike; ``stub`` is the raw API for what the
        # wrapper methods do not cover.
        self.stub = relay_pb2_grpc.TextGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.admin = relay_pb2_grpc.AdapterAdminStub(self._channel)  # LoRA adapter management

    @property
    def channel(self) -> Any:
        return self._channel

    @property
    def secure(self) -> bool:
        return self._credentials is not None

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _call_kwargs(self, timeout: float | None, default: float | None = None) -> dict[str, Any]:
        """Keyword arguments of one call: its deadline is ``timeout``, else the client's ``timeout``, else
        ``default`` (the ``Deadlines`` value for this kind of call), else ``deadlines.connect``."""
        chosen = next(t for t in (timeout, self.timeout, default, self.deadlines.connect) if t is not None)
        return {
            "timeout": None if math.isinf(chosen) else chosen,
            "metadata": self._metadata,
            "wait_for_ready": self._wait_for_ready,
        }

    def _generation_kwargs(self, request: relay_pb2.GenerateRequest, timeout: float | None) -> dict[str, Any]:
        return self._call_kwargs(timeout, self.deadlines.generation(request.max_new_tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, tls={self.secure})"
