"""Requests are parsed inside the call, not by gRPC's deserializer, so a body protobuf refuses is the client's
error: INVALID_ARGUMENT with protobuf's reason.

A proto3 string must be UTF-8; a client in a language that sends other bytes (a lone surrogate encoded as
"UTF-8") made gRPC's deserializer raise `DecodeError` before any handler ran, which gRPC answers UNKNOWN and logs
at ERROR with a traceback, as it would a server bug.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)


async def _parse(parse: Callable[[bytes], Any], raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return parse(raw)
    except DecodeError as e:
        log.info("refused a request protobuf cannot parse: %s", e)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: cannot be parsed ({e})")


class ParseInCallInterceptor(grpc.aio.ServerInterceptor):
    """Hands gRPC a handler that takes the request's bytes and parses them itself (unary requests: every RPC of
    the relay's services, health and reflection included, takes one). Install it last, nearest the handlers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        if handler.response_streaming:
            behavior = handler.unary_stream

            async def streaming(raw: bytes, context: grpc.aio.ServicerContext):
                result = behavior(await _parse(parse, raw, context), context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a coroutine that writes with context.write()
                    await result

            return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=handler.response_serializer)
        behavior = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            response = behavior(await _parse(parse, raw, context), context)
            return await response if inspect.isawaitable(response) else response

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
