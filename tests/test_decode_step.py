"""The static decode step (`DecodeInputs` in shards/step_inputs.py, `ModelSlice.decode`) and the attention paths
(shards/attention.py).

The contract is the same as everywhere: greedy tokens are `generate()`'s on the whole fp32 model, here with
every decode step through the static path, eager and compiled with `torch.compile(fullgraph=True)` (a graph
break fails the compile, so passing proves the step traces whole)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import pytest
import torch
from kv_blocks import runner_batch
from test_slices_parity import PROMPTS, greedy

from qwen_relay.shards.attention import additive_mask, choose_attention, expanded, folded
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.fused import FUSE_MIN_TOKENS
from qwen_relay.shards.kv_cache import CacheShape, KVCache
from qwen_relay.shards.runner import SliceRunner, SliceSpec
from qwen_relay.shards.step_inputs import CONTEXT_FLOOR, DecodeInputs, bucket, is_decode

MAX_NEW = 10
FUSED_GRAPHS = 3  # rms_norm, silu_mul, the family's rotary


def _runners(model, ranges, decode: str, block_size: int = 16, max_len: int = 64) -> list[SliceRunner]:
    runners = [SliceRunner(SliceSpec(model=str(model), first=a, end=b, device="cpu", max_slots=4, max_len=max_len,
                                     num_blocks=256, block_size=block_size, decode=decode)) for a, b in ranges]
    for runner in runners:
        runner.reset()  # a fresh cache refuses steps until the gateway opens it
    return runners


def _count_static(runners: list[SliceRunner]) -> list[int]:
    """Wrap each runner's static step so the test can see it ran (and was not silently bypassed)."""
    calls = [0] * len(runners)
    for i, runner in enumerate(runners):
        step = runner._decode

        def counted(*args, _i=i, _step=step):
            calls[_i] += 1
            return _step(*args)

        runner._decode = counted
    return calls


def _assert_static_parity(reference: Callable, model, ranges, decode: str, prompts: list[list[int]],
                          block_size: int = 16, max_len: int = 64) -> None:
    runners = _runners(model, ranges, decode, block_size, max_len)
    assert all(r.decode_mode == decode for r in runners)
    calls = _count_static(runners)
    got = greedy(runners, prompts, MAX_NEW)
    assert calls == [MAX_NEW - 1] * len(runners)  # every decode step, none of the prefills
    assert all(r.decode_mode == decode for r in runners)  # a compile failure would have fallen back to eager
    expected = [reference(model, p, MAX_NEW) for p in prompts]
    assert all(len(e) >= MAX_NEW // 2 for e in expected)
    for tokens, want in zip(got, expected, strict=True):
        assert tokens[: len(want)] == want


@pytest.mark.parametrize("ranges", [[(0, 5)], [(0, 3), (3, 5)]], ids=["1-slice", "2-slices"])
def test_static_decode_parity(reference, tiny_model, ranges):
    _assert_static_parity(reference, tiny_model, ranges, "static", PROMPTS)  # 4 rows of 1 to 11 tokens
    _assert_static_parity(reference, tiny_model, ranges, "static", PROMPTS[:3])  # 3 rows: one padded row in bucket 4
    # Blocks of 4 positions: rows span several blocks, and the context bucket's table is mostly scratch.
    _assert_static_parity(reference, tiny_model, ranges, "static", PROMPTS, block_size=4)


def test_static_decode_parity_without_the_paged_kernel(reference, tiny_model, monkeypatch):
    """Where the paged kernel cannot be built (no C++ compiler), decode attention gathers keys for SDPA."""
    from qwen_relay.shards import model as model_module

    monkeypatch.setattr(model_module, "paged_attention", lambda *_: False)
    _assert_static_parity(reference, tiny_model, [(0, 3), (3, 5)], "static", PROMPTS)


def test_static_decode_parity_qwen3(reference, qwen3_model):
    _assert_static_parity(reference, qwen3_model, [(0, 2), (2, 5)], "static", PROMPTS)


@pytest.mark.slow  # inductor's C++ compile: ~13 s on the 2-core machine with a cold cache
def test_compiled_decode_parity(reference, tmp_path):
    """`torch.compile(fullgraph=True)` of the CPU decode step: no graph break, same greedy tokens. Two slices
    compile both kinds of step graph (hidden states out; the head and its logits out); a whole-model slice is the
    two in one. One layer each: the compile's cost grows with the layers, what it proves does not. A prompt of
    80 tokens makes the prefill long enough for the fused norms, activation and rotary (shards/fused.py)."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    model = build_checkpoint(tmp_path, "tiny", num_hidden_layers=2)
    long = [(7 * i) % 500 + 3 for i in range(80)]
    assert len(long) + sum(map(len, PROMPTS[:2])) >= FUSE_MIN_TOKENS
    _assert_static_parity(reference, model, [(0, 1), (1, 2)], "compiled", [*PROMPTS[:2], long], max_len=128)


@pytest.mark.slow  # an inductor compile: a few seconds
def test_a_compiled_step_writes_the_cache_in_place():
    """A compiled step's cache write touches its tokens' positions only. Written through the layer's view
    (`k[layer, blocks, offsets] = ...`), inductor copied the layer's whole cache on every step: 24 such
    copies made a compiled 0.5B decode step 12x slower than the eager one."""
    from torch._inductor.utils import run_and_get_code

    cache = KVCache(num_layers=2, shape=CacheShape(num_blocks=300, block_size=16, num_slots=4), num_kv_heads=2,
                    head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    layer_elements = cache.k[1].numel()  # 301 blocks (the scratch one too) x 16 x 2 x 8

    def step(blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.write(1, blocks, offsets, k, v)
        keys, values = cache.gather(1, blocks[:, None])
        return keys.sum() + values.sum()

    blocks, offsets = torch.tensor([5, 9]), torch.tensor([3, 15])
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    with torch.inference_mode():
        _, code = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), blocks, offsets, k, v)
    loop_bounds = [int(n) for n in re.findall(r"<static_cast<int64_t>\((\d+)L\);", "\n".join(code))]
    assert loop_bounds and max(loop_bounds) < layer_elements  # no kernel walks a layer's whole cache
    assert torch.equal(cache.k[1, blocks, offsets], k) and torch.equal(cache.v[1, blocks, offsets], v)
    assert not cache.k[0].any() and cache.k[1].count_nonzero() == k.count_nonzero()  # nothing else written


@pytest.mark.slow  # two inductor compiles of a one-layer slice
def test_a_compiled_cpu_step_compiles_at_warm_up_only(tmp_path):
    """Warm-up compiles the CPU step for one row and for several; no later step compiles again, whatever its
    rows or context bucket (one graph per bucket took 38-52 s each on the 0.5B shape, 25 buckets)."""
    from torch._dynamo.utils import counters

    from qwen_relay.checkpoints.synthetic import build_checkpoint

    model = build_checkpoint(tmp_path, "tiny", num_hidden_layers=2)
    runners = [SliceRunner(SliceSpec(model=str(model), first=a, end=a + 1, device="cpu", max_slots=8,
                                     max_len=512, num_blocks=256, decode="compiled")) for a in (0, 1)]
    torch._dynamo.reset()
    counters.clear()
    for runner in runners:  # two slices: the first takes token ids, the last hidden states
        runner.warmup()
        runner.reset()
    graphs = 4 + FUSED_GRAPHS  # one row and several, for each slice; the fused prompt kernels, shared
    assert counters["stats"]["unique_graphs"] == graphs
    cases = [(1, 20), (3, 20), (8, 20), (1, 300), (5, 300), (2, 500), (2, 20)]
    for i, (rows, context) in enumerate(cases):
        slots = list(range(rows))
        for start, tokens in [(0, [[3] * (context - 1)] * rows), (context - 1, [[4]] * rows)]:  # prefill, decode
            hidden = runners[0].step(runner_batch(runners[0], slots, [start] * rows, tokens))
            if i % 2:  # as Ray delivers it: a plain tensor, not the inference tensor the first slice made
                hidden = hidden.clone()
            runners[1].step(runner_batch(runners[1], slots, [start] * rows, tokens), hidden)
    assert all(r.decode_mode == "compiled" for r in runners) and counters["stats"]["unique_graphs"] == graphs


def test_static_decode_samples_non_greedy_rows_like_the_dynamic_path(tiny_model):
    """A seeded draw takes the logits of the static step: the same token as the dynamic path's."""
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=7)]
    tokens = {}
    for mode in ("dynamic", "static"):
        (runner,) = _runners(tiny_model, [(0, 5)], mode)
        runner.step(runner_batch(runner, [0, 1], [0, 0], [[5, 6, 7], [8, 9]], sampling))
        tokens[mode] = runner.step(runner_batch(runner, [0, 1], [3, 2], [[11], [12]], sampling))
    assert tokens["static"] == tokens["dynamic"]


def test_auto_compiles_a_cpu_slice_only_when_it_is_big_enough(tiny_model, monkeypatch):
    """A tiny slice would wait longer for its compile than it could win back: it steps eagerly."""
    from qwen_relay.shards import runner as runner_module

    (small,) = _runners(tiny_model, [(0, 5)], "auto")
    assert small.decode_mode == "static"
    monkeypatch.setattr(runner_module, "COMPILE_MIN_BYTES", small.weight_bytes())
    (big,) = _runners(tiny_model, [(0, 5)], "auto")
    assert big.decode_mode == "compiled"


def test_moe_and_adapters_keep_the_dynamic_path(qwen3_moe_model, tiny_model):
    (moe,) = _runners(qwen3_moe_model, [(0, 5)], "static")
    assert moe.decode_mode == "dynamic"
    (dense,) = _runners(tiny_model, [(0, 5)], "static")
    step = StepBatch([0], [0], [[3]], [[0]], [SamplingParams()])
    assert dense._static(step)
    assert not dense._static(StepBatch([0], [0], [[3, 4]], [[0]], [SamplingParams()]))  # a prefill
    assert not dense._static(StepBatch([0], [0], [[3]], [[0]], [SamplingParams()], adapters=["a"]))
    with pytest.raises(ValueError, match="decode 'fast'"):
        _runners(tiny_model, [(0, 5)], "fast")


def test_decode_inputs_pad_to_buckets_and_the_scratch_block():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(3, 6) == 4 and bucket(5, 6) == 6  # the cap is the last bucket
    assert bucket(1, 2048, CONTEXT_FLOOR) == CONTEXT_FLOOR and bucket(129, 2048, CONTEXT_FLOOR) == 256
    # Blocks of 64: row 1 ends at 131, so its table has 3 blocks; the others 1. Tables are any blocks.
    blocks = [[40], [9, 3, 17], [5]]
    batch = StepBatch(slots=[2, 0, 3], starts=[7, 130, 1], token_ids=[[5], [6], [7]], blocks=blocks,
                      sampling=[SamplingParams()] * 3)
    assert is_decode(batch) and not is_decode(StepBatch([0], [0], [[1, 2]], [[0]], [SamplingParams()]))
    inputs = DecodeInputs.build(batch, torch.device("cpu"), max_rows=8, max_len=1024, block_size=64, scratch=99)
    assert inputs.ids[:, 0].tolist() == [5, 6, 7, 0]
    assert inputs.positions[:, 0].tolist() == [7, 130, 1, 0]
    # The context bucket is 256 positions = 4 blocks per row; padding (table entries and the padded row) is
    # the scratch block.
    assert inputs.tables.tolist() == [[40, 99, 99, 99], [9, 3, 17, 99], [5, 99, 99, 99], [99, 99, 99, 99]]
    assert inputs.rows == 3
    assert inputs.pad(torch.ones(3, 1, 4)).tolist() == [[[1.0] * 4]] * 3 + [[[0.0] * 4]]
    # A block bigger than the context floor: one block per row, no narrower than the block.
    small = DecodeInputs.build(batch, torch.device("cpu"), max_rows=8, max_len=1024, block_size=256, scratch=99)
    assert small.tables.tolist() == [[40], [9], [5], [99]]


# ------------------------------------------------------------------------------------------- attention


def reference_attention(q, k, v, mask):
    """Plain math: K/V repeated per query head, softmax over visible keys."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("attend", [expanded, folded], ids=["expanded", "folded"])
@pytest.mark.parametrize(("heads", "kv_heads", "width"), [(4, 2, 1), (14, 2, 1), (4, 2, 5), (8, 8, 3)])
def test_attention_paths_match_the_reference(attend, heads, kv_heads, width):
    torch.manual_seed(0)
    bsz, length, dim = 3, 19, 16
    q = torch.randn(bsz, width, heads, dim).transpose(1, 2)  # the layout the slice makes (a transposed view)
    k, v = torch.randn(2, bsz, kv_heads, length, dim)
    starts = torch.tensor([0, 6, 13])[:, None] + torch.arange(width)[None, :]  # rows of different lengths
    mask = (torch.arange(length)[None, None, :] <= starts[:, :, None])[:, None]
    torch.testing.assert_close(attend(q, k, v, additive_mask(mask, q.dtype)), reference_attention(q, k, v, mask))


def test_a_prompt_step_makes_each_mask_additive_once(tiny_model):
    """A boolean mask would be converted by SDPA in every layer (twice); the slice converts each group's once."""
    (runner,) = _runners(tiny_model, [(0, 5)], "dynamic")
    batch = runner_batch(runner, [0, 1, 2], [0, 0, 0], [[5, 6, 7], [8, 9, 10, 11], [12]], [SamplingParams()] * 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step(batch)
    wheres = sum(event.count for event in prof.key_averages() if event.key == "aten::where")
    # Two groups need a mask (three where the paged kernel is not built: the one-token row is read in place);
    # converted in each of the 5 layers, that alone would be 20 calls.
    assert runner.slice.num_attention_layers == 5
    assert 0 < wheres < 10


def test_attention_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="qwen_relay.shards.attention"):
        choice = choose_attention(torch.device("cpu"), torch.float32, 14, 2, 64)
    assert choice.attend is expanded  # generate()'s layout, as fast as folded in fp32 on the CPU
    (record,) = caplog.records
    assert "expanded layout (14 query heads on 2 KV heads)" in record.getMessage()
    assert choice.backend in record.getMessage()


def test_cpu_bf16_attention_is_folded():
    """bf16 SDPA with `enable_gqa` on the CPU is 5-17x slower than the folded layout at decode."""
    assert choose_attention(torch.device("cpu"), torch.bfloat16, 14, 2, 64).attend is folded


@pytest.mark.slow  # three small inductor compiles
def test_fused_prompt_kernels_compute_what_the_modules_do():
    """shards/fused.py against HF's own RMSNorm, SiLU gate and rotary at a prompt step's shapes (fp32, the
    slices that fuse): the same operations in another order."""
    dtype = torch.float32
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    from qwen_relay.shards.fused import norm, rotary, silu_mul

    torch.manual_seed(0)
    module = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
    module.weight.data.normal_()
    n = FUSE_MIN_TOKENS + 5
    x = torch.randn(n, 1, 64, dtype=dtype)
    gate, up = torch.randn(n, 1, 128, dtype=dtype), torch.randn(n, 1, 128, dtype=dtype)
    q, k = torch.randn(n, 4, 1, 16, dtype=dtype), torch.randn(n, 2, 1, 16, dtype=dtype)
    cos, sin = torch.randn(n, 1, 16, dtype=dtype), torch.randn(n, 1, 16, dtype=dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    with torch.inference_mode():
        torch.testing.assert_close(norm(module, x, True), module(x), **tol)
        assert torch.equal(norm(module, x, False), module(x))
        torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up, **tol)
        for got, want in zip(rotary(apply_rotary_pos_emb)(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin),
                             strict=True):
            torch.testing.assert_close(got, want, **tol)
