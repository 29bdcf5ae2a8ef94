"""What a call returns: small dataclasses made from the responses, so a response reads one way whatever the
transport, and a stream joins into the same Completion a unary call returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health_pb2

from qwen_relay.v1 import relay_pb2

_FINISH_PREFIX = "FINISH_REASON_"


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
