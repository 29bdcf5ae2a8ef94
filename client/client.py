"""Blocking client for the qwen_relay.v1 API.

Errors are not translated: a failed call raises ``grpc.RpcError`` so callers can branch on ``.code()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from qwen_relay.v1 import relay_pb2

from .base import BaseClient
from .requests import MessageLike, build_generate_request, build_tokenize_request
from .results import (
    AdapterInfo,
    Chunk,
    Completion,
    ModelInfo,
    TokenizeResult,
    adapter_info_from_response,
    chunk_from_response,
    completion_from_response,
    health_status_name,
    model_info_from_response,
    tokenize_result_from_response,
)

logger = logging.getLogger(__name__)


class RelayClient(BaseClient):
    """Sync client over one ``grpc`` channel; use it as a context manager or call ``close()``.

    Constructor arguments are ``BaseClient``'s: ``target``, then keyword-only ``timeout``, TLS material,
    ``auth_token``, extra ``metadata``/``options``, ``wait_for_ready``. Every call has a deadline
    (``Deadlines``: 30 s for calls that make no tokens, 60 s + 2 s per new token for generations) unless
    ``timeout`` says otherwise.
    Generation parameters (``**params``) are those of ``build_generate_request``: max_new_tokens,
    temperature, top_p, top_k, seed, stop, ignore_eos, adapter, request_id, chat_template_kwargs,
    separate_reasoning.
    """

    def _open_channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self._options)
        return grpc.secure_channel(self.target, self._credentials, options=self._options)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Completion:
        """Generates a whole completion from exactly one of prompt, messages or prompt_token_ids."""
        request = build_generate_request(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, **params
        )
        response = self.stub.Generate(request, **self._generation_kwargs(request, timeout))
        return completion_from_response(response)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[Chunk]:
        """Yields deltas as the server sends them; the last one carries finish_reason and usage.

        The request is built (and checked) now, the RPC starts on the first ``next()``. Leaving the loop
        early, or closing the iterator, cancels the RPC so the server stops generating for nobody.
        """
        request = build_generate_request(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, **params
        )
        return self._stream(request, timeout)

    def _stream(self, request: relay_pb2.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        call = self.stub.GenerateStream(request, **self._generation_kwargs(request, timeout))
        try:
            for response in call:
                yield chunk_from_response(response)
        finally:
            call.cancel()  # a no-op once the stream has ended

    def chat(self, messages: Iterable[MessageLike], **params: Any) -> Completion:
        """Generates the assistant's next turn for a list of ``{"role", "content"}`` messages."""
        return self.generate(messages=messages, **params)

    def tokenize(
        self,
        prompt: str | None = None,
        messages: Iterable[MessageLike] | None = None,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        """Token ids as the server's tokenizer (and chat template, for messages) makes them."""
        request = build_tokenize_request(prompt, messages, chat_template_kwargs)
        response = self.stub.Tokenize(request, **self._call_kwargs(timeout))
        return tokenize_result_from_response(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response = self.stub.GetModelInfo(relay_pb2.GetModelInfoRequest(), **self._call_kwargs(timeout))
        return model_info_from_response(response)

    def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        """Loads the PEFT LoRA adapter folder ``path`` (as the server sees it) under ``name``."""
        request = relay_pb2.LoadAdapterRequest(name=name, path=str(path))
        kwargs = self._call_kwargs(timeout, self.deadlines.load_adapter)
        return adapter_info_from_response(self.admin.LoadAdapter(request, **kwargs))

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Unloads an adapter; FAILED_PRECONDITION while requests still use it."""
        request = relay_pb2.UnloadAdapterRequest(name=name)
        self.admin.UnloadAdapter(request, **self._call_kwargs(timeout))

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        request = relay_pb2.ListAdaptersRequest()
        response = self.admin.ListAdapters(request, **self._call_kwargs(timeout))
        return [adapter_info_from_response(a) for a in response.adapters]

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check; "" asks about the whole server. Returns e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(self._health.Check(request, **self._call_kwargs(timeout)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
