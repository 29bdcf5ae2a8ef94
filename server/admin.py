"""The AdapterAdmin gRPC service: LoadAdapter, UnloadAdapter and ListAdapters over the gateway's adapter
registry (server/adapters.py), each adapter error answered with its status code."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from qwen_relay.shards.adapters import AdapterError, AdapterMismatch, AdapterSpec
from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .adapters import (
    AdapterExists,
    AdapterForbidden,
    AdapterInUse,
    AdapterLimit,
    AdapterNotFound,
    AdapterRegistry,
)
from .pipeline import SliceLost
from .servicer import public_message

log = logging.getLogger(__name__)

T = TypeVar("T")


def adapter_info(spec: AdapterSpec) -> relay_pb2.AdapterInfo:
    return relay_pb2.AdapterInfo(name=spec.name, path=spec.path, r=spec.r, alpha=spec.alpha,
                                 target_modules=list(spec.target_modules), layers=list(spec.layers),
                                 base_model=spec.base_model)


STATUS = [  # most specific first: AdapterMismatch is an AdapterError
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterForbidden, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterLimit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SliceLost, grpc.StatusCode.UNAVAILABLE),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
]


class AdapterAdminServicer(relay_pb2_grpc.AdapterAdminServicer):
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    async def _call(self, context: grpc.aio.ServicerContext, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action`, answering each adapter error with its status code."""
        if not self.registry.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        try:
            return await action()
        except Exception as e:  # noqa: BLE001 - mapped to a status code, never raised into gRPC
            for kind, code in STATUS:
                if isinstance(e, kind):
                    await context.abort(code, str(e))
            log.exception("adapter admin call failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"adapter operation failed: {public_message(e)}")

    async def LoadAdapter(self, request, context):  # noqa: N802 - gRPC method names
        return adapter_info(await self._call(context, lambda: self.registry.load(request.name, request.path)))

    async def UnloadAdapter(self, request, context):  # noqa: N802
        await self._call(context, lambda: self.registry.unload(request.name))
        return relay_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # noqa: N802
        return relay_pb2.ListAdaptersResponse(adapters=[adapter_info(s) for s in self.registry.list()])
