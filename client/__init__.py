"""Python client for the qwen_relay.v1 gRPC API.

``RelayClient`` (blocking) and ``AsyncRelayClient`` (asyncio) return small dataclasses rather than protos;
failed calls raise ``grpc.RpcError`` untouched so callers can branch on ``.code()``.
"""

from .aio import AsyncRelayClient
from .client import RelayClient
from .common import (
    DEFAULT_TARGET,
    AdapterInfo,
    Chunk,
    Completion,
    CompletionBuilder,
    Deadlines,
    ModelInfo,
    SliceInfo,
    TokenizeResult,
    build_generate_request,
    build_tokenize_request,
    completion_from_chunks,
    describe_rpc_error,
)

__all__ = [
    "DEFAULT_TARGET",
    "AdapterInfo",
    "AsyncRelayClient",
    "Chunk",
    "Completion",
    "CompletionBuilder",
    "Deadlines",
    "ModelInfo",
    "RelayClient",
    "SliceInfo",
    "TokenizeResult",
    "build_generate_request",
    "build_tokenize_request",
    "completion_from_chunks",
    "describe_rpc_error",
]
