"""Python client for the qwen_relay.v1 gRPC API.

``RelayClient`` (blocking) and ``AsyncRelayClient`` (asyncio) return small dataclasses rather than protos;
failed calls raise ``grpc.RpcError`` untouched so callers can branch on ``.code()``.
"""

from .aio import AsyncRelayClient
from .base import DEFAULT_TARGET, Deadlines, describe_rpc_error
from .client import RelayClient
from .requests import build_generate_request, build_tokenize_request
from .results import (
    AdapterInfo,
    Chunk,
    Completion,
    CompletionBuilder,
    ModelInfo,
    SliceInfo,
    TokenizeResult,
    completion_from_chunks,
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
