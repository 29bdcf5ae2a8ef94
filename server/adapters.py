"""LoRA adapters in the gateway: the registry requests are checked against (the AdapterAdmin service over it:
server/admin.py).

The registry is the gateway's truth about adapters: the servicer answers NOT_FOUND for an unknown `adapter` from
it without asking any slice, and a restarted slice gets its adapters back from the pipeline. An adapter becomes
visible to requests only once every slice holds it, and stops being visible before any slice drops it, so no
step ever names an adapter some slice lacks. An adapter a restarted slice cannot load again is forgotten
(`forget`, subscribed to the engine's `adapter_lost` event), so it cannot wedge the engine. The registry asks
the engine only through `AdapterEngine`; the slices' adapters are the pipeline's (`PipelineAdapters`).

Loading over the API reads folders on the gateway's and the slices' machines, so it is confined
(`AdapterPolicy`): the folder and each file read from it must resolve (symlinks followed) under an allowed root,
and a path outside every root gets the same answer whether or not it exists. The number and size of loaded
adapters are bounded. Adapters given on the command line (`serve --adapter`) come from the operator and skip
the root check, not the limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PretrainedConfig

from qwen_relay.shards.adapters import (
    ADAPTER_FILES,
    WEIGHTS_FILE,
    AdapterError,
    AdapterSpec,
    check_name,
    inspect_adapter,
)

from .events import Signal

log = logging.getLogger(__name__)


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


class AdapterEngine(Protocol):
    """What the registry needs of the engine, and all it may ask: the engine owns the pipeline and its requests."""

    @property
    def ready(self) -> bool: ...

    adapter_lost: Signal[str]  # an adapter the slices dropped (a restarted slice could not load it again)

    def adapter_users(self, name: str) -> int: ...

    async def load_adapter(self, name: str, path: str, fingerprint: str) -> None: ...

    async def unload_adapter(self, name: str) -> list[int]: ...


class AdapterRegistry:
    """Loaded adapters by name; `name in registry` is what request validation asks."""

    def __init__(self, config: PretrainedConfig, model_id: str, engine: AdapterEngine,
                 policy: AdapterPolicy | None = None) -> None:
        self.config = config
        self.model_id = model_id
        self.engine = engine  # has the slices load and drop adapters; knows which requests use one
        self.policy = policy or AdapterPolicy()
        self.specs: dict[str, AdapterSpec] = {}
        self._busy: set[str] = set()  # names being loaded or unloaded
        engine.adapter_lost.subscribe(self.forget)

    @property
    def ready(self) -> bool:
        """Whether the slices are up, so adapters can be loaded."""
        return self.engine.ready

    def _inside(self, path: Path) -> None:
        """Refuse `path` (resolved) outside every root, in the same words whether or not it exists."""
        if not any(path.is_relative_to(root) for root in self.policy.roots):
            raise AdapterForbidden("path: not under an allowed adapter root (serve --adapter-root)")

    def _folder(self, path: str, trusted: bool) -> Path:
        """The adapter folder `path` names, refused unless it and every file read from it resolve under an
        allowed root (a folder inside whose files link outside is outside), unless `trusted`."""
        folder = Path(os.path.realpath(Path(path).expanduser()))
        if not trusted:
            if not self.policy.roots:
                raise AdapterForbidden("path: loading adapters over the API is off (start serve with --adapter-root)")
            self._inside(folder)
            for file in ADAPTER_FILES:  # before anything about them is looked at, their size included
                self._inside(Path(os.path.realpath(folder / file)))
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
            await self.engine.load_adapter(name, spec.path, spec.fingerprint)
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
        # From the count to the engine withdrawing the adapter (the first thing `unload_adapter` does) there is no
        # await: a request is either counted here or refused at admission (`Engine.generate`).
        users = self.engine.adapter_users(name)
        if users:
            raise AdapterInUse(f"adapter {name!r} is in use by {users} request(s); unload it once they finish")
        del self.specs[name]  # new requests get NOT_FOUND from here on, whatever the slices answer
        self._busy.add(name)
        try:
            failed = await self.engine.unload_adapter(name)
        finally:
            self._busy.discard(name)
        if failed:
            log.warning("adapter %r unloaded, but slice(s) %s could not free it; the next load under this name, or "
                        "the slice's restart, frees it", name, ", ".join(map(str, failed)))
        else:
            log.info("adapter %r unloaded", name)
