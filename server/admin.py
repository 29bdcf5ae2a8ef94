"""LoRA adapters in the gateway: the registry requests are checked against, and the AdapterAdmin service.

The registry is the gateway's truth about adapters: the servicer answers NOT_FOUND for an unknown `adapter` from
it without asking any slice, and a restarted slice gets its adapters back from the pipeline. An adapter becomes
visible to requests only once every slice holds it, and stops being visible before any slice drops it, so no
step ever names an adapter some slice lacks. An adapter a restarted slice cannot load again is forgotten
(`forget`, called by the engine), so it cannot wedge the engine.

Loading over the API reads folders on the gateway's and the slices' machines, so it is confined
(`AdapterPolicy`): paths must resolve (symlinks followed) under an allowed root, and a path outside every root
gets the same answer whether or not it exists. The number and size of loaded adapters are bounded. Adapters
given on the command line (`serve --adapter`) come from the operator and skip the root check, not the limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from transformers import PretrainedConfig

from qwen_relay.shards.adapters import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterMismatch,
    AdapterSpec,
    check_name,
    inspect_adapter,
)
from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .engine import Engine
from .pipeline import SliceLost
from .servicer import public_message

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


class AdapterForbidden(PermissionError):
    """PERMISSION_DENIED: the path is outside every allowed root (or loading over the API is off)."""


class AdapterLimit(RuntimeError):
    """RESOURCE_EXHAUSTED: too many adapters, or one too large."""


@dataclass(frozen=True)
class AdapterPolicy:
    roots: tuple[str, ...] = ()  # LoadAdapter paths must lie under one of these; none: LoadAdapter is off
    max_adapters: int = 16
    max_bytes: int = 1 << 30  # of one adapter's weights file

    def __post_init__(self) -> None:
        object.__setattr__(self, "roots", tuple(os.path.realpath(Path(r).expanduser()) for r in self.roots))


class AdapterRegistry:
    """Loaded adapters by name; `name in registry` is what request validation asks."""

    def __init__(self, config: PretrainedConfig, model_id: str, engine: Engine,
                 policy: AdapterPolicy | None = None) -> None:
        self.config = config
        self.model_id = model_id
        self.engine = engine  # its pipeline holds the slices' adapters; it knows which requests use one
        self.policy = policy or AdapterPolicy()
        self.specs: dict[str, AdapterSpec] = {}
        self._busy: set[str] = set()  # names being loaded or unloaded

    def _folder(self, path: str, trusted: bool) -> Path:
        """The adapter folder `path` names, refused outside the allowed roots unless `trusted`."""
        folder = Path(os.path.realpath(Path(path).expanduser()))
        if not trusted:
            if not self.policy.roots:
                raise AdapterForbidden("path: loading adapters over the API is off (start serve with --adapter-root)")
            if not any(folder.is_relative_to(root) for root in self.policy.roots):
                raise AdapterForbidden("path: not under an allowed adapter root (serve --adapter-root)")
        if not folder.is_dir():
            raise AdapterError(f"path: {path} is not a folder on the gateway's machine")
        weights = folder / WEIGHTS_FILE
        if weights.is_file() and weights.stat().st_size > self.policy.max_bytes:
            raise AdapterLimit(f"path: {WEIGHTS_FILE} is {weights.stat().st_size} bytes, over the limit of "
                               f"{self.policy.max_bytes} (serve --max-adapter-mib)")
        return folder

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def fingerprints(self) -> dict[str, str]:
        """Loaded adapter name -> the fingerprint of its files (what validation and the prefix cache key on)."""
        return {name: spec.fingerprint for name, spec in self.specs.items()}

    def list(self) -> list[AdapterSpec]:
        return [self.specs[n] for n in sorted(self.specs)]

    async def load(self, name: str, path: str, *, trusted: bool = False) -> AdapterSpec:
        """Check the adapter against the served model here, then have every slice load its share.

        `trusted`: the operator named it on the command line, so the allowed roots do not apply."""
        check_name(name)
        if name in self.specs or name in self._busy:
            raise AdapterExists(f"name: an adapter named {name!r} is already loaded")
        if len(self.specs) + len(self._busy) >= self.policy.max_adapters:
            raise AdapterLimit(f"name: {self.policy.max_adapters} adapters are loaded or loading, the limit "
                               f"(serve --max-adapters); unload one first")
        if not path:
            raise AdapterError("path: required (a PEFT adapter folder)")
        self._busy.add(name)
        try:
            folder = self._folder(path, trusted)
            spec = await asyncio.to_thread(inspect_adapter, name, folder, self.config, self.model_id)
            await self.engine.pipeline.load_adapter(name, spec.path, spec.fingerprint)
            self.specs[name] = spec
        finally:
            self._busy.discard(name)
        log.info("adapter %r loaded from %s (r=%d, layers %s, fingerprint %s)", name, spec.path, spec.r,
                 ",".join(map(str, spec.layers)), spec.fingerprint[:12])
        return spec

    def forget(self, name: str) -> None:
        """The pipeline dropped the adapter (a restarted slice could not load it again): stop serving it."""
        if self.specs.pop(name, None) is not None:
            log.error("adapter %r is no longer served: a restarted slice could not load it again", name)

    async def unload(self, name: str) -> None:
        if name not in self.specs:
            raise AdapterNotFound(f"name: no adapter named {name!r} is loaded")
        users = self.engine.adapter_users(name)
        if users:
            raise AdapterInUse(f"adapter {name!r} is in use by {users} request(s); unload it once they finish")
        del self.specs[name]  # new requests get NOT_FOUND from here on, whatever the slices answer
        self._busy.add(name)
        try:
            failed = await self.engine.pipeline.unload_adapter(name)
        finally:
            self._busy.discard(name)
        if failed:
            log.warning("adapter %r unloaded, but slice(s) %s could not free it; the next load under this name, or "
                        "the slice's restart, frees it", name, ", ".join(map(str, failed)))
        else:
            log.info("adapter %r unloaded", name)


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
        if not self.registry.engine.ready:
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
