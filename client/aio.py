"""asyncio client for the qwen_relay.v1 API, the same surface as ``RelayClient`` over ``grpc.aio``.

Create it inside a running event loop: a ``grpc.aio`` channel belongs to the loop it was made on.
Errors are not translated: a failed call raises ``grpc.aio.AioRpcError`` (a ``grpc.RpcError``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping
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


class AsyncRelayClient(BaseClient):
    """Async client over one ``grpc.aio`` channel; ``async with`` it or ``await close()``.

    Constructor arguments are ``BaseClient``'s: ``target``, then keyword-only ``timeout``, TLS material,
    ``auth_token``, extra ``metadata``/``options``, ``wait_for_ready``. Every call has a deadline
    (``Deadlines``: 30 s for calls that make no tokens, 60 s + 2 s per new token for generations) unless
    ``timeout`` says otherwise.
    Generation parameters (``**params``) are those of ``build_generate_request``.
    """

    def _open_channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)

    async def generate(
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
        response = await self.stub.Generate(request, **self._generation_kwargs(request, timeout))
        return completion_from_response(response)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[Chunk]:
        """``async for chunk in client.stream(...)``: deltas as they arrive, the last with finish_reason.

        A plain method returning an async iterator, so bad arguments raise here rather than at the first
        ``__anext__``. Breaking out early cancels the RPC once the generator is closed; wrap it in
        ``contextlib.aclosing`` to make that immediate.
        """
        request = build_generate_request(
            prompt, messages=messages, prompt_token_ids=prompt_token_ids, **params
        )
        return self._stream(request, timeout)

    async def _stream(
        self, request: relay_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[Chunk]:
        call = self.stub.GenerateStream(request, **self._generation_kwargs(request, timeout))
        try:
            async for response in call:
                yield chunk_from_response(response)
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def chat(self, messages: Iterable[MessageLike], **params: Any) -> Completion:
        """Generates the assistant's next turn for a list of ``{"role", "content"}`` messages."""
        return await self.generate(messages=messages, **params)

    async def tokenize(
        self,
        prompt: str | None = None,
        messages: Iterable[MessageLike] | None = None,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        """Token ids as the server's tokenizer (and chat template, for messages) makes them."""
        request = build_tokenize_request(prompt, messages, chat_template_kwargs)
        response = await self.stub.Tokenize(request, **self._call_kwargs(timeout))
        return tokenize_result_from_response(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        request = relay_pb2.GetModelInfoRequest()
        return model_info_from_response(await self.stub.GetModelInfo(request, **self._call_kwargs(timeout)))

    async def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        """Loads the PEFT LoRA adapter folder ``path`` (as the server sees it) under ``name``."""
        request = relay_pb2.LoadAdapterRequest(name=name, path=str(path))
        kwargs = self._call_kwargs(timeout, self.deadlines.load_adapter)
        return adapter_info_from_response(await self.admin.LoadAdapter(request, **kwargs))

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Unloads an adapter; FAILED_PRECONDITION while requests still use it."""
        request = relay_pb2.UnloadAdapterRequest(name=name)
        await self.admin.UnloadAdapter(request, **self._call_kwargs(timeout))

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        request = relay_pb2.ListAdaptersRequest()
        response = await self.admin.ListAdapters(request, **self._call_kwargs(timeout))
        return [adapter_info_from_response(a) for a in response.adapters]

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check; "" asks about the whole server. Returns e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(await self._health.Check(request, **self._call_kwargs(timeout)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRelayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
