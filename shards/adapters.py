"""LoRA adapters on a layer slice, with PEFT doing all of the LoRA math.

A slice's parameter names mirror the checkpoint (`model.layers.<global idx>.self_attn.q_proj`), so a PEFT
adapter saved for the whole model maps onto a slice by name: PEFT's own target matching (`target_modules`,
`layers_to_transform`, regexes) runs over the slice's module tree, which holds only the slice's layers, so it
can only ever pick this slice's share. Each slice reads just the adapter tensors of its own modules (safetensors
`safe_open`), and a slice that holds none of an adapter's layers injects nothing: it costs that slice nothing.

Mixed batches (rows with different adapters, or none) use PEFT's mixed-batch forward: every LoRA layer takes
`adapter_names=[...]`, one per row, with `"__base__"` for the base model. `SliceAdapters.routed` passes those
names for one forward through forward pre-hooks, as PEFT's `_enable_peft_forward_hooks` does. Outside of it no
adapter is active, so a plain forward is exactly the base model.

Names: the API allows "." in adapter names ("v1.2"), but PEFT keeps adapters in `nn.ModuleDict`s, whose keys
cannot contain ".". Inside PEFT an adapter goes by `peft_name(name)` ("." -> ":", a character no valid name
has, so two names never collide); everywhere else by its own name.

Identity: an adapter is its files, not its path. The gateway fingerprints them (`fingerprint`) when it loads
an adapter, and a slice refuses a folder whose files no longer match, so a slice restarted after the folder was
retrained in place cannot silently serve other weights than its neighbours.

Base-model check (`inspect_adapter`, run by the gateway before any slice is asked): the adapter is injected
into a meta-device copy of the whole served model (no memory, no weights read), and the tensor names and
shapes PEFT expects there are compared with the ones in the adapter file. That catches every adapter that
cannot run on the served model: another hidden size or head layout (shapes differ), layers the model does not
have, modules it does not have. `base_model_name_or_path` is only compared for a warning: the same base is
routinely named by a hub id at training time and a local snapshot path at serving time, so a name
difference alone says nothing, while a shape difference is certain.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from .kv_cache import CacheMismatch
from .model import ModelSlice

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # every file read from an adapter folder
MAX_CONFIG_BYTES = 1 << 20  # a LoRA config is a few KiB; nothing larger is read
SAVED_PREFIX = "base_model.model."  # PeftModel.save_pretrained's prefix; slice names start after it
BASE = "__base__"  # PEFT's row name for "no adapter" in a mixed batch
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class AdapterError(ValueError):
    """The adapter folder is unreadable, not a LoRA adapter, or uses a feature the relay cannot serve."""


class AdapterMismatch(AdapterError):
    """The adapter was made for a different base model than the one served (the message says what differs)."""


class AdapterMissing(CacheMismatch):
    """A step names an adapter this slice does not hold: the actor restarted (Ray rebuilt it from its spec
    alone) after the adapter was loaded. Like a lost cache, the gateway must restore the slice and replay."""


@dataclass(frozen=True)
class AdapterSpec:
    """What the gateway knows about a loaded adapter (AdapterInfo on the wire)."""

    name: str
    path: str
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]  # global layer indices with adapter weights
    base_model: str  # base_model_name_or_path from adapter_config.json ("" when unset)
    fingerprint: str = ""  # of the files the gateway checked (`fingerprint`); every slice must read the same
    size_bytes: int = 0  # of the weights file


def peft_name(name: str) -> str:
    """The adapter's key inside PEFT's ModuleDicts, which refuse "." (see module doc)."""
    return name.replace(".", ":")


def fingerprint(folder: str | Path) -> str:
    """sha256 over the adapter's config and weights files: the same adapter byte for byte, wherever it is read."""
    digest = hashlib.sha256()
    for file in ADAPTER_FILES:
        with open(Path(folder) / file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def check_name(name: str) -> None:
    if name == BASE or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(f"name: {name!r} is not a valid adapter name (1-64 of A-Z a-z 0-9 . _ -, starting "
                           f"with a letter or digit)")


def read_config(path: Path) -> LoraConfig:
    """The adapter's LoraConfig, refusing what the mixed-batch forward cannot serve."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"path: {path} is not a PEFT adapter folder (no {CONFIG_FILE})")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"path: {path} has no {WEIGHTS_FILE} (only safetensors adapters are served)")
    try:
        with open(config_file, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)  # bounded: the file may be anything
    except OSError as e:
        raise AdapterError(f"path: cannot read {config_file}: {e}") from e
    if len(text) > MAX_CONFIG_BYTES:
        raise AdapterError(f"path: {CONFIG_FILE} is over the limit of {MAX_CONFIG_BYTES} bytes")
    try:
        saved = json.loads(text)
    except ValueError as e:
        raise AdapterError(f"path: cannot read {config_file}: {e}") from e
    if not isinstance(saved, dict) or saved.get("peft_type") != "LORA":
        peft_type = saved.get("peft_type") if isinstance(saved, dict) else None
        raise AdapterError(f"path: {path} is a {peft_type} adapter; only LORA adapters are served")
    saved.pop("runtime_config", None)  # as LoraConfig.from_pretrained does, from the text read once here
    config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**saved))
    if config.use_dora:
        raise AdapterError("path: DoRA adapters cannot be mixed in a batch (PEFT's mixed-batch forward refuses "
                           "them); merge it or train plain LoRA")
    if config.bias != "none":
        raise AdapterError(f"path: bias={config.bias!r} adapters change the base model's biases, which every "
                           f"request shares; only bias='none' adapters are served")
    if config.modules_to_save or config.trainable_token_indices:
        raise AdapterError("path: adapters with modules_to_save or trainable tokens replace whole base modules "
                           "and are not served; keep only LoRA weights")
    if getattr(config, "target_parameters", None):
        raise AdapterError("path: adapters on parameters (target_parameters, such as fused MoE experts) are not "
                           "served; target linear modules")
    config.inference_mode = True  # frozen weights, as PeftModel.from_pretrained makes them
    return config


def saved_key(key: str) -> str:
    """A key of adapter_model.safetensors as a slice parameter name (adapter name not yet inserted)."""
    return key.removeprefix(SAVED_PREFIX)


def module_of(key: str) -> str:
    """`model.layers.3.self_attn.q_proj.lora_A.weight` -> `model.layers.3.self_attn.q_proj`."""
    return key.rsplit(".lora_", 1)[0]


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header only (nothing is read into memory)."""
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        return {saved_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _layer_span(layers: set[int]) -> str:
    return ", ".join(str(i) for i in sorted(layers))


def inspect_adapter(name: str, path: str | Path, config: PretrainedConfig, served: str) -> AdapterSpec:
    """The gateway's base-model check: does this adapter fit the served model exactly? (See module doc.)

    Raises `AdapterError` for a bad folder and `AdapterMismatch`, naming what differs, for a wrong base.
    """
    check_name(name)
    folder = Path(path).expanduser().resolve()
    lora = read_config(folder)
    shapes = saved_shapes(folder)
    if not shapes:
        raise AdapterError(f"path: {folder / WEIGHTS_FILE} holds no tensors")
    base = lora.base_model_name_or_path or ""
    with init_empty_weights():
        whole = ModelSlice(config, 0, config.num_hidden_layers)
    num_layers = config.num_hidden_layers
    beyond = {int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k)) and int(m.group(1)) >= num_layers}
    if beyond:
        raise AdapterMismatch(f"adapter {name!r} has weights for layer(s) {_layer_span(beyond)}, but the served "
                              f"model {served!r} has {num_layers} layers (0-{num_layers - 1}); it was made for "
                              f"{base or 'another model'!r}")
    try:
        inject_adapter_in_model(copy.deepcopy(lora), whole, adapter_name=peft_name(name), low_cpu_mem_usage=True)
    except ValueError as e:
        raise AdapterMismatch(f"adapter {name!r} does not fit the served model {served!r}: {e}") from e
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(whole, adapter_name=peft_name(name)).items()}
    convs = sorted({module_of(k).rsplit(".", 1)[-1] for k in expected if ".conv1d." in k})
    if convs:  # shards/deltanet.py runs Qwen3.5's short convolution from its weight, past any LoRA wrapper
        raise AdapterError(f"adapter {name!r} adapts {convs[0]}, which the relay cannot serve with LoRA; Qwen3.5's "
                           f"linear-attention layers take LoRA on in_proj_qkv, in_proj_z, in_proj_a, in_proj_b and "
                           f"out_proj")

    problems = []
    for key in sorted(shapes.keys() - expected.keys()):
        problems.append(f"{key} is in the adapter but the served model has no such LoRA target")
    for key in sorted(expected.keys() - shapes.keys()):
        problems.append(f"{key} is targeted by the adapter's config but missing from its weights")
    for key in sorted(shapes.keys() & expected.keys()):
        if shapes[key] != expected[key]:
            problems.append(f"{key} has shape {list(shapes[key])}, the served model needs {list(expected[key])} "
                            f"({_describe_target(whole, key)})")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterMismatch(f"adapter {name!r} was made for a different base model ({base or 'unnamed'!r}) than "
                              f"the served {served!r} (hidden_size {config.hidden_size}, {num_layers} layers): "
                              f"{'; '.join(problems[:3])}{more}")
    if base and not _same_base(base, served, config):
        log.warning("adapter %r names base model %r, the served model is %r; its shapes fit, so it is loaded",
                    name, base, served)
    layers = sorted({int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))})
    targets = lora.target_modules
    target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets or ()))
    return AdapterSpec(name=name, path=str(folder), r=lora.r, alpha=float(lora.lora_alpha),
                       target_modules=target_modules, layers=tuple(layers), base_model=base,
                       fingerprint=fingerprint(folder), size_bytes=(folder / WEIGHTS_FILE).stat().st_size)


def _describe_target(model: nn.Module, key: str) -> str:
    module = model.get_submodule(module_of(key))
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if isinstance(base, nn.Linear):
        return f"its {module_of(key).rsplit('.', 1)[-1]} maps {base.in_features} -> {base.out_features} features"
    return f"its target is a {type(base).__name__}"


def _same_base(base: str, served: str, config: PretrainedConfig) -> bool:
    """Loose name match: the last path component (`Qwen2.5-0.5B-Instruct`) of any name the served model has."""
    names = {served, getattr(config, "_name_or_path", "") or ""}
    tail = Path(base.rstrip("/")).name.lower()
    return any(n and Path(n.rstrip("/")).name.lower() == tail for n in names)


@dataclass(frozen=True)
class HeldAdapter:
    path: str
    fingerprint: str
    modules: tuple[str, ...]  # LoRA-wrapped modules of this slice carrying this adapter (empty: costs nothing)
    layers: tuple[int, ...]


def _inject_names(module: nn.Module, args: tuple, kwargs: dict[str, Any], *, names: list[str]) -> tuple:
    kwargs["adapter_names"] = names
    return args, kwargs


class SliceAdapters:
    """The adapters one slice holds. Not thread-safe: the runner serialises loads, unloads and steps."""

    def __init__(self, module: ModelSlice, split: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.module = module
        self.split = split  # a tensor-parallel rank's share of each adapter tensor (shards/tensor_parallel.py)
        self.held: dict[str, HeldAdapter] = {}
        self.configs: dict[str, LoraConfig] = {}
        self._lora_layers: list[LoraLayer] = []

    def load(self, name: str, path: str, expected: str = "") -> dict:
        """Inject this slice's share of the adapter at `path` (nothing, if it holds none of its modules).

        Loading the same adapter again is a no-op (the gateway re-sends adapters after a restart). With
        `expected`, the files must have that fingerprint. A different adapter held under the same name (a
        leftover of an unload that failed here) is replaced: the gateway only loads names it does not serve.
        """
        held = self.held.get(name)
        if held is not None and held.path == path and held.fingerprint == (expected or held.fingerprint):
            return self._info(name)
        check_name(name)
        folder = Path(path)
        lora = read_config(folder)
        actual = fingerprint(folder)
        if expected and actual != expected:
            raise AdapterMismatch(f"adapter {name!r}: the files at {path} changed since the gateway loaded it "
                                  f"(fingerprint {actual[:12]}, expected {expected[:12]}); load it again under a "
                                  f"new name")
        if held is not None:
            self.unload(name)
        own = set(dict(self.module.named_modules()))
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
            keys = [k for k in f.keys() if module_of(saved_key(k)) in own]
            tensors = {saved_key(k): f.get_tensor(k) for k in keys}
        if self.split is not None:
            tensors = {k: self.split(k, t) for k, t in tensors.items()}
        if not tensors:
            self.held[name] = HeldAdapter(path=path, fingerprint=actual, modules=(), layers=())
            log.info("adapter %r targets none of layers %d-%d: nothing to load here", name, self.module.first,
                     self.module.end - 1)
            return self._info(name)
        try:
            with torch.no_grad():
                self._inject(peft_name(name), lora, tensors)
        except Exception:
            self._remove(peft_name(name))
            raise
        modules = tuple(sorted({module_of(k) for k in tensors}))
        layers = tuple(sorted({int(m.group(1)) for k in modules if (m := LAYER_KEY.match(k + "."))}))
        self.held[name] = HeldAdapter(path=path, fingerprint=actual, modules=modules, layers=layers)
        log.info("adapter %r: %d tensors on %d modules of layers %s", name, len(tensors), len(modules),
                 _layer_span(set(layers)) or "(none: embeddings/head)")
        return self._info(name)

    def _inject(self, name: str, lora: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        if hasattr(self.module, "peft_config"):
            del self.module.peft_config  # else PEFT warns about (and adds to) it; we keep the full dict below
        inject_adapter_in_model(lora, self.module, adapter_name=name)
        self.configs[name] = lora
        self.module.peft_config = dict(self.configs)  # set_peft_model_state_dict reads the adapter's config here
        result = set_peft_model_state_dict(self.module, tensors, adapter_name=name)
        own = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(name)}(\.|$)")
        missing = [k for k in result.missing_keys if own.search(k)]
        if missing or result.unexpected_keys:
            raise AdapterMismatch(f"adapter {name!r} does not match layers {self.module.first}-"
                                  f"{self.module.end - 1}: missing {missing[:3]}, unexpected "
                                  f"{list(result.unexpected_keys)[:3]}")
        self._refresh()

    def unload(self, name: str) -> None:
        """Drop the adapter's LoRA weights; a module left with no adapter is unwrapped back to its base layer.

        Unloading an adapter this slice does not hold is a no-op, so cleanup after a failed load is simple."""
        if self.held.pop(name, None) is not None or peft_name(name) in self.configs:
            self._remove(peft_name(name))
            log.info("adapter %r unloaded from layers %d-%d", name, self.module.first, self.module.end - 1)

    def _remove(self, name: str) -> None:
        self.configs.pop(name, None)
        self.module.peft_config = dict(self.configs)
        for path, layer in list(self.module.named_modules()):
            if not isinstance(layer, LoraLayer):
                continue
            layer.delete_adapter(name)
            if not layer._all_available_adapter_names():
                parent, _, attr = path.rpartition(".")
                setattr(self.module.get_submodule(parent), attr, layer.get_base_layer())
        self._refresh()

    @property
    def injected(self) -> bool:
        """Whether any LoRA layer wraps this slice's modules (the static decode step serves plain slices)."""
        return bool(self._lora_layers)

    def _refresh(self) -> None:
        """No adapter active outside `routed` (a plain forward is the base model); dropout off (eval)."""
        self._lora_layers = [m for m in self.module.modules() if isinstance(m, LoraLayer)]
        for layer in self._lora_layers:
            layer.set_adapter([], inference_mode=True)
        self.module.eval().requires_grad_(False)

    @contextmanager
    def routed(self, adapters: list[str] | None) -> Iterator[None]:
        """For one forward: row i of the input goes through adapter `adapters[i]` ("" or None: the base model).

        Checks every named adapter is held here, even one this slice carries no weights of, so a restarted
        slice (which lost its adapters) fails loudly instead of silently serving the base model.
        """
        if not adapters or not any(adapters):
            yield
            return
        unknown = {a for a in adapters if a} - self.held.keys()
        if unknown:
            raise AdapterMissing(f"layers {self.module.first}-{self.module.end - 1} do not hold adapter(s) "
                                 f"{sorted(unknown)}")
        if not self._lora_layers:
            yield  # no LoRA weights on this slice at all: nothing to route
            return
        hook = partial(_inject_names, names=[peft_name(a) if a else BASE for a in adapters])
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self._lora_layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _info(self, name: str) -> dict:
        held = self.held[name]
        return {"name": name, "layers": list(held.layers), "modules": len(held.modules),
                "first": self.module.first, "end": self.module.end}
