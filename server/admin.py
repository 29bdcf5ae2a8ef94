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
from .frontend import ERRORS, ErrorTable, Status, describe
from .pipeline import SliceLost

log = logging.getLogger(__name__)

T = TypeVar("T")


def adapter_info(spec: AdapterSpec) -> relay_pb2.AdapterInfo:
    return relay_pb2.AdapterInfo(name=spec.name, path=spec.path, r=spec.r, alpha=spec.alpha,
                                 target_modules=list(spec.target_modules), layers=list(spec.layers),
                                 base_model=spec.base_model)


ADAPTER_ERRORS: ErrorTable = (  # rows of frontend.ERRORS' kind; most specific first: AdapterMismatch is an AdapterError
    (AdapterNotFound, Status(grpc.StatusCode.NOT_FOUND, 404, "adapter_not_found")),
    (AdapterForbidden, Status(grpc.StatusCode.PERMISSION_DENIED, 403, "forbidden")),
    (AdapterLimit, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "adapter_limit")),
    (SliceLost, Status(grpc.StatusCode.UNAVAILABLE, 503, "unavailable")),
    (AdapterExists, Status(grpc.StatusCode.ALREADY_EXISTS, 409, "adapter_exists")),
    (AdapterInUse, Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "adapter_in_use")),
    (AdapterMismatch, Status(grpc.StatusCode.FAILED_PRECONDITION, 400, "adapter_mismatch")),
    (AdapterError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_value")),
    *ERRORS,
)


class AdapterAdminServicer(relay_pb2_grpc.AdapterAdminServicer):
    """`ready` raises until the slices are loaded (`Frontend.check_ready`)."""

    def __init__(self, registry: AdapterRegistry, ready: Callable[[], object]) -> None:
        self.registry = registry
        self.ready = ready

    async def _call(self, context: grpc.aio.ServicerContext, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action`, answering each error with its status code."""
        try:
            self.ready()
            return await action()
        except Exception as e:  # noqa: BLE001 - mapped to a status code, never raised into gRPC
            status, message = describe(e, "adapter operation", ADAPTER_ERRORS)
            await context.abort(status.grpc, message)

    async def LoadAdapter(self, request, context):  # noqa: N802 - gRPC method names
        return adapter_info(await self._call(context, lambda: self.registry.load(request.name, request.path)))

    async def UnloadAdapter(self, request, context):  # noqa: N802
        await self._call(context, lambda: self.registry.unload(request.name))
        return relay_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # noqa: N802
        return relay_pb2.ListAdaptersResponse(adapters=[adapter_info(s) for s in self.registry.list()])
