"""C++ built on first use with the system's compiler and kept per machine: the paged attention kernel
(shards/paged_attention.py) and the packed linear's operator (shards/packed.py).

Each library is keyed by its source, compiler, flags and CPU (what `-march=native` compiles for), so one built
on one CPU model never loads on another, and is installed by an atomic rename, so slices building at once each
install a whole library. Where no compiler works the caller keeps its Python path; `build` logs why once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 180  # a torch-linked library takes ~10 s on 2 cores


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen-relay" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def torch_flags() -> tuple[str, ...]:
    """What a library that registers torch operators compiles and links with: the running torch's headers and
    libraries (and its C++ ABI), found again at load time through the rpath."""
    root = Path(torch.__file__).parent
    return (f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10")


def build(name: str, source: str, flags: Sequence[str]) -> Path | None:
    """The shared library `name` compiled from `source`, built now or found in the cache; None (logged) where
    there is no compiler, the machine is not x86-64 (the flags and CPUs measured) or the build fails."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("%s: no C++ compiler or not x86-64; the Python path stays", name)
        return None
    parts = (source, compiler, *flags, _cpu_signature(), torch.__version__)
    path = cache_dir() / f"{name}_{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / f"{name}.cpp"
            src.write_text(source)
            built = Path(tmp) / path.name
            log.info("%s: compiling (once per machine, cached in %s)", name, path.parent)
            subprocess.run([compiler, str(src), "-o", str(built), *flags], check=True, capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT_S)
            os.replace(built, path)
    except (OSError, subprocess.SubprocessError) as e:
        detail = str(getattr(e, "stderr", None) or e)
        errors = [line for line in detail.splitlines() if "error" in line]
        log.warning("%s could not be built (%s); the Python path stays", name, "; ".join(errors[:3]) or detail[-500:])
        return None
    return path
