"""What bench/gpu.sh's run needs, checked in seconds before any checkpoint is built.

A GPU is lent rarely and briefly, with no network and no Ray, and its image is not this project's
environment: a run that fails ten minutes in on a missing package wastes the whole loan. This checks every
package the `--no-ray` path imports (version floors included), imports the project modules that path runs
(which catches anything the list misses), checks that none of them pulled in Ray, and with `--device cuda`
that a GPU is visible with room for the run. Every problem is reported, each with what to do; exit status 1
if there is any.

`--wheels-needed DIR` instead prints the wheel files in DIR that would fix a missing or too-old package
(gpu.sh installs those before the full check). Only the standard library is imported before the checks, so
this file also runs where torch itself is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    module: str  # what is imported
    dist: str  # the pip distribution that provides it
    minimum: tuple[int, ...] = ()
    below: tuple[int, ...] = ()  # exclusive upper bound; () for none
    why: str = ""
    wheel: str = ""  # file name prefix of the wheel in bench/wheels (make gpu-wheels) that provides it; "" if none


REQUIREMENTS = [
    Requirement("torch", "torch", (2, 4), why="the model and the slices"),
    Requirement("transformers", "transformers", (5, 0), (6,), why="the model code and generate()"),
    Requirement("accelerate", "accelerate", (1, 0), why="generate()'s model on the GPU (device_map)"),
    Requirement("safetensors", "safetensors", (0, 4), why="the checkpoint's weights"),
    Requirement("tokenizers", "tokenizers", (0, 20), why="the checkpoint's tokenizer"),
    Requirement("huggingface_hub", "huggingface-hub", (0, 30), why="transformers' loading"),
    Requirement("peft", "peft", (0, 17), why="the slices' adapter support (imported by every slice)"),
    Requirement("grpc", "grpcio", (1, 85, 1), why="the gateway; the generated stubs refuse an older grpcio",
                wheel="grpcio-"),
    Requirement("google.protobuf", "protobuf", (7, 35, 1), (8,),
                why="the generated messages (gencode 7.35.1 needs a 7.x runtime at least as new)",
                wheel="protobuf-"),
    Requirement("grpc_health", "grpcio-health-checking", (1, 85, 1), why="the gateway's health service",
                wheel="grpcio_health_checking-"),
    Requirement("grpc_reflection", "grpcio-reflection", (1, 85, 1), why="the gateway's reflection service",
                wheel="grpcio_reflection-"),
    Requirement("prometheus_client", "prometheus-client", (0, 20), why="the gateway's metrics",
                wheel="prometheus_client-"),
    Requirement("matplotlib", "matplotlib", (3, 5), why="the report's plots"),
]
# The project modules the --no-ray run imports (bench/relay.py and what its relay and hf subprocess load).
PROJECT_MODULES = ["qwen_relay.bench.relay", "qwen_relay.checkpoints.synthetic", "qwen_relay.server.app",
                   "qwen_relay.server.pipeline", "qwen_relay.shards.runner", "qwen_relay.client.aio",
                   "qwen_relay.v1.relay_pb2_grpc"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def problem(req: Requirement) -> str | None:
    """Why `req` is not met (from the installed metadata, importing nothing), or None."""
    try:
        installed = importlib.metadata.version(req.dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    v = _version(installed)
    if req.minimum and v < req.minimum:
        return f"{installed} is older than {_dotted(req.minimum)}"
    if req.below and v >= req.below:
        return f"{installed} is not below {_dotted(req.below)}"
    return None


def spec(req: Requirement) -> str:
    bounds = [f">={_dotted(req.minimum)}"] if req.minimum else []
    bounds += [f"<{_dotted(req.below)}"] if req.below else []
    return req.dist + ",".join(bounds)


def wheels_needed(folder: Path) -> list[Path]:
    """The carried wheels that fix the unmet requirements, one per requirement."""
    wheels = []
    for req in REQUIREMENTS:
        if req.wheel and problem(req):
            wheels += sorted(folder.glob(f"{req.wheel}*.whl"))[-1:]
    return wheels


def check_packages(wheels: Path) -> list[str]:
    errors = []
    for req in REQUIREMENTS:
        why = problem(req)
        if why is None:
            try:
                importlib.import_module(req.module)
                continue
            except Exception as e:  # noqa: BLE001 - any failure to import is the finding
                why = f"installed but does not import: {e!r}"
        fix = (f"bench/gpu.sh installs it from {wheels}: is the {req.wheel}*.whl there, for this Python? (git "
               "ignores the wheels: `make gpu-wheels` before copying the tree, and copy bench/wheels with it)"
               if req.wheel else
               f"use a Python that has it (PYTHON=...), or carry its wheel: pip install '{spec(req)}'")
        errors.append(f"{req.module} ({spec(req)}; {req.why}): {why}. Fix: {fix}")
    return errors


def check_project() -> list[str]:
    errors = []
    for name in PROJECT_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the finding
            missing = getattr(e, "name", None)
            errors.append(f"{name} does not import: {e!r}" + (
                f" (the package {missing!r} is needed and missing)" if isinstance(e, ImportError) and missing else ""))
    if sys.modules.get("ray") is not None:  # the GPU image has no Ray: --no-ray must not need it (None: blocked)
        errors.append("importing the --no-ray path imported ray, which the GPU image lacks: make that import lazy")
    return errors


def check_device(device: str, shape: str, dtype: str, relays: int, cache: Path) -> tuple[list[str], list[str]]:
    """(errors, notes): the GPU is visible and has room for hf plus `relays` relays, the disk for the build."""
    import torch

    from qwen_relay.checkpoints.synthetic import SHAPES

    notes = [f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    errors = []
    params = _params(SHAPES[shape]) if shape in SHAPES else 0
    item = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    if device == "cuda":
        if not torch.cuda.is_available():
            return [f"--device cuda but torch {torch.__version__} sees no GPU (CUDA {torch.version.cuda}); "
                    "run on the GPU machine, or DEVICE=cpu for a dry run"], notes
        free, total = torch.cuda.mem_get_info(0)
        need = params * item * (1 + relays) * 1.2  # hf and each relay hold the weights; 20% for caches
        notes.append(f"GPU 0: {torch.cuda.get_device_name(0)}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free; "
                     f"the run needs ~{need / 2**30:.0f} GiB")
        if need > free:
            errors.append(f"{shape} needs ~{need / 2**30:.0f} GiB on the GPU (hf + {relays} relays), "
                          f"{free / 2**30:.0f} GiB free: a smaller SHAPE or fewer SHARDS")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            errors.append("this GPU has no bf16: DTYPE=float16")
    cache.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(cache).free
    if params * item > disk:
        errors.append(f"the {shape} checkpoint needs ~{params * item / 1e9:.0f} GB, {cache} has {disk / 1e9:.0f} GB "
                      "free: MODEL_CACHE=...")
    return errors, notes


def _params(shape) -> int:
    """Parameters of a Qwen2-style shape (embedding, layers, norm, untied head)."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * shape.intermediate_size + 2 * h
    vocab = shape.vocab_size or 0
    return vocab * h * (1 if shape.tie_word_embeddings else 2) + shape.num_hidden_layers * layer + h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, default=Path(__file__).resolve().parent / "wheels")
    p.add_argument("--wheels-needed", action="store_true", help="print the wheels to install, one a line; exit")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--relays", type=int, default=2, help="relays loaded beside hf")
    p.add_argument("--model-cache", type=Path, default=Path.home() / ".cache/qwen-relay/bench")
    args = p.parse_args(argv)
    if args.wheels_needed:
        for wheel in wheels_needed(args.wheels):
            print(wheel)
        return 0
    errors = check_packages(args.wheels)
    notes: list[str] = []
    if not errors:  # the project's imports and the device need the packages
        errors += check_project()
    if not errors:
        more, notes = check_device(args.device, args.shape, args.dtype, args.relays, args.model_cache.expanduser())
        errors += more
    for line in notes:
        print(f"precheck: {line}")
    for line in errors:
        print(f"precheck: MISSING {line}", file=sys.stderr)
    if errors:
        print(f"precheck: {len(errors)} problem(s); nothing was run", file=sys.stderr)
        return 1
    versions = ", ".join(f"{r.dist} {importlib.metadata.version(r.dist)}" for r in REQUIREMENTS)
    print(f"precheck: every import of the run is here ({versions}); no Ray imported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
