"""LoRA adapters in the gateway: the registry requests are checked against, and the AdapterAdmin service.

The registry is the gateway's truth about adapters (DESIGN.md, decision 1): the servicer answers NOT_FOUND for
an unknown `adapter` from it without asking any slice, and a restarted slice gets its adapters back from the
pipeline. An adapter becomes visible to requests only once every slice holds it, and stops being visible
before any slice drops it, so no step ever names an adapter some slice lacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from transformers import PretrainedConfig

from qwen_relay.shards.adapters import AdapterError, AdapterMismatch, AdapterSpec, check_name, inspect_adapter
from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")


class AdapterNotFound(KeyError):
    """NOT_FOUND."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterExists(ValueError):
    """ALREADY_EXISTS."""


class AdapterInUse(RuntimeError):
    """FAILED_PRECONDITION: requests still use the adapter."""


class AdapterRegistry:
    """Loaded adapters by name; `name in registry` is what request validation asks."""

    def __init__(self, config: PretrainedConfig, model_id: str, engine: Engine) -> None:
        self.config = config
        self.model_id = model_id
        self.engine = engine  # its pipeline holds the slices' adapters; it knows which requests use one
        self.specs: dict[str, AdapterSpec] = {}
        self._busy: set[str] = set()  # names being loaded or unloaded

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def list(self) -> list[AdapterSpec]:
        return [self.specs[n] for n in sorted(self.specs)]

    async def load(self, name: str, path: str) -> AdapterSpec:
        """Check the adapter against the served model here, then have every slice load its share."""
        check_name(name)
        if name in self.specs or name in self._busy:
            raise AdapterExists(f"name: an adapter named {name!r} is already loaded")
        if not path:
            raise AdapterError("path: required (a PEFT adapter folder)")
        if not Path(path).expanduser().is_dir():
            raise AdapterError(f"path: {path} is not a folder on the gateway's machine")
        self._busy.add(name)
        try:
            spec = await asyncio.to_thread(inspect_adapter, name, path, self.config, self.model_id)
            await self.engine.pipeline.load_adapter(name, spec.path)
            self.specs[name] = spec
        finally:
            self._busy.discard(name)
        log.info("adapter %r loaded from %s (r=%d, layers %s)", name, spec.path, spec.r,
                 ",".join(map(str, spec.layers)))
        return spec

    async def unload(self, name: str) -> None:
        if name not in self.specs:
            raise AdapterNotFound(f"name: no adapter named {name!r} is loaded")
        users = self.engine.adapter_users(name)
        if users:
            raise AdapterInUse(f"adapter {name!r} is in use by {users} request(s); unload it once they finish")
        spec = self.specs.pop(name)  # new requests get NOT_FOUND from here on
        self._busy.add(name)
        try:
            await self.engine.pipeline.unload_adapter(name)
        except BaseException:
            self.specs[name] = spec
            raise
        finally:
            self._busy.discard(name)
        log.info("adapter %r unloaded", name)


def adapter_info(spec: AdapterSpec) -> relay_pb2.AdapterInfo:
    return relay_pb2.AdapterInfo(name=spec.name, path=spec.path, r=spec.r, alpha=spec.alpha,
                                 target_modules=list(spec.target_modules), layers=list(spec.layers),
                                 base_model=spec.base_model)


STATUS = [  # most specific first: AdapterMismatch is an AdapterError
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
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
        if not self.registry.engine.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        try:
            return await action()
        except Exception as e:  # noqa: BLE001 - mapped to a status code, never raised into gRPC
            for kind, code in STATUS:
                if isinstance(e, kind):
                    await context.abort(code, str(e))
            log.exception("adapter admin call failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"adapter operation failed: {e}")

    async def LoadAdapter(self, request, context):  # noqa: N802 - gRPC method names
        return adapter_info(await self._call(context, lambda: self.registry.load(request.name, request.path)))

    async def UnloadAdapter(self, request, context):  # noqa: N802
        await self._call(context, lambda: self.registry.unload(request.name))
        return relay_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # noqa: N802
        return relay_pb2.ListAdaptersResponse(adapters=[adapter_info(s) for s in self.registry.list()])
