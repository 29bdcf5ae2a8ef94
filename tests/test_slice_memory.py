"""A slice reads only its own share of the checkpoint: its peak memory while loading is its weights, not the
whole model's (shards/loader.py).

The memory is measured in a fresh subprocess, as the peak resident set of its own address space (`VmHWM`, reset
just before loading where the kernel allows). Not `ru_maxrss`: Linux carries that across fork and exec, so a
child started from this big test process would report the parent's peak. Safetensors memory-maps the file, so
the child touches every weight (and runs a forward) before it reads its peak.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc"),
              pytest.mark.slow]  # subprocesses that load a checkpoint

MIB = 1 << 20
MARGIN = 64 * MIB  # allocator slack, the forward's activations and KV cache, import-time noise
BIG_LAYERS = 8
SLICE = (3, 5)  # a middle slice of the big model: two layers, no embeddings, no LM head

CHILD = r"""
import json, math, sys

import torch
import transformers  # noqa: F401
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.kv_cache import CacheShape, KVCache
from qwen_relay.shards.loader import load_slice
from qwen_relay.shards.step_inputs import StepMetadata
from qwen_relay.shards.runner import peak_rss_bytes as peak  # VmHWM: this address space's, fresh at exec

model, first, end, prepack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(1)
with torch.inference_mode():  # warm up torch's kernels and allocator so they are not counted as the slice's
    torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 1, 2, 8, 16)).sum(dtype=torch.float64)
    torch.nn.Linear(64, 64)(torch.randn(8, 64))
try:  # start the peak from here (Linux >= 4.0; a container may refuse it: then the peak since exec)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = peak()
part = load_slice(model, first, end, torch.float32, torch.device("cpu"), prepack)
with torch.inference_mode():
    # Every page of every weight (a prepacked one was written whole when it was made).
    touched = sum(float(p.sum()) for p in part.parameters() if not p.is_mkldnn)
    config = part.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = KVCache(end - first, CacheShape(num_blocks=1, block_size=16, num_slots=1), config.num_key_value_heads,
                    head_dim, torch.float32, torch.device("cpu"))
    batch = StepBatch(slots=[0], starts=[0], token_ids=[[1] * 8], blocks=[[0]], sampling=[SamplingParams()])
    hidden = None if part.is_first else torch.randn(8, 1, config.hidden_size)  # 8 packed tokens
    out = part(StepMetadata.build(batch, torch.device("cpu"), cache.block_size, cache.scratch), hidden, cache)
after = peak()
names = [n for n, _ in part.named_parameters()]
print(json.dumps({"before": before, "after": after, "names": names,
                  "weight_bytes": sum(p.nbytes for p in part.parameters()),
                  "finite": math.isfinite(touched) and bool(torch.isfinite(out).all())}))
"""


def _tensor_bytes(folder: Path) -> dict[str, int]:
    """Every tensor's size in bytes, from the safetensors headers alone."""
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                sizes[name] = end - start
    return sizes


def _layer_bytes(sizes: dict[str, int], first: int, end: int) -> int:
    return sum(n for name, n in sizes.items()
               if name.startswith("model.layers.") and first <= int(name.split(".")[2]) < end)


@pytest.fixture(scope="session")
def big_model(tmp_path_factory) -> Path:
    """~0.5 GB of fp32 weights in 8 layers (tied embeddings, tiny vocabulary): weights dominate memory."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("big"), "tiny", hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=BIG_LAYERS, num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.parametrize("prepack", [False, True], ids=["dense", "prepacked"])
def test_slice_peak_memory_is_its_own_share(big_model, prepack):
    sizes = _tensor_bytes(big_model)
    total = sum(sizes.values())
    assert total > 400 * MIB  # precondition: big enough that weights dominate the process's memory
    first, end = SLICE
    slice_bytes = _layer_bytes(sizes, first, end)
    assert slice_bytes < total / 3

    done = subprocess.run([sys.executable, "-c", CHILD, str(big_model), str(first), str(end), str(int(prepack))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert not any("embed_tokens" in n or "lm_head" in n for n in report["names"]), report["names"]
    assert report["weight_bytes"] == slice_bytes  # exactly its two layers, nothing else

    grew = report["after"] - report["before"]
    # The measurement is real: touching the weights made them resident.
    assert grew >= 0.9 * slice_bytes, (grew / MIB, slice_bytes / MIB)
    # ...and it is this slice's share, not the model's.
    assert grew < 0.5 * total, (grew / MIB, total / MIB)
    assert grew <= 1.5 * slice_bytes + MARGIN, (grew / MIB, slice_bytes / MIB)


def test_tied_model_slices_hold_only_their_tensors(tiny_model):
    import torch

    from qwen_relay.shards.loader import load_slice
    from qwen_relay.shards.runner import SliceRunner, SliceSpec

    sizes = _tensor_bytes(tiny_model)
    assert "lm_head.weight" not in sizes  # a tied checkpoint: the LM head is the embedding
    embed = sizes["model.embed_tokens.weight"]
    num_layers = 5  # conftest.NUM_LAYERS

    middle = load_slice(str(tiny_model), 1, 3, torch.float32, torch.device("cpu"))
    names = [n for n, _ in middle.named_parameters(remove_duplicate=False)]
    assert not any("embed_tokens" in n or "lm_head" in n or n == "model.norm.weight" for n in names), names
    assert sum(p.nbytes for p in middle.parameters()) == _layer_bytes(sizes, 1, 3)

    def weight_bytes(first: int, end: int, prepack: bool = True) -> int:
        spec = SliceSpec(model=str(tiny_model), first=first, end=end, dtype="float32", device="cpu", max_slots=1,
                         max_len=8, prepack=prepack)
        return SliceRunner(spec).stats().weight_bytes

    assert weight_bytes(1, 3) == _layer_bytes(sizes, 1, 3)  # what GetModelInfo reports: no embedding
    assert weight_bytes(0, 2) == _layer_bytes(sizes, 0, 2) + embed
    # The last slice reads the embedding as its LM head (its own copy: it is on another actor).
    assert weight_bytes(3, num_layers) == _layer_bytes(sizes, 3, num_layers) + sizes["model.norm.weight"] + embed
    # A single slice holds the tied tensor once, dense; twice when the LM head is prepacked for oneDNN (the
    # embedding lookup still needs the dense rows), and the stats say so.
    assert weight_bytes(0, num_layers, prepack=False) == sum(sizes.values())
    assert weight_bytes(0, num_layers) == sum(sizes.values()) + embed
