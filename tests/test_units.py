"""Fast unit tests of the pure-Python parts, no Ray and no gRPC server: layout, validation, slot accounting and
scheduling, sampling, the KV cache, step batches, and UTF-8-safe streaming detokenization."""

from __future__ import annotations

import asyncio
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from qwen_relay.server.block_manager import BlockManager
from qwen_relay.server.detokenizer import REPLACEMENT, Detokenizer
from qwen_relay.server.engine import Engine, EngineConfig
from qwen_relay.server.layout import LAYER_OVERHEAD, ModelCosts, balanced_split, describe, model_costs, parse_layers
from qwen_relay.server.scheduler import Row, Scheduler
from qwen_relay.server.sequence import GenerationParams, Sequence
from qwen_relay.server.servicer import from_grpc
from qwen_relay.server.slots import SlotAllocator
from qwen_relay.server.validation import (
    MAX_ADAPTER_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    InvalidRequest,
    Limits,
    validate,
)
from qwen_relay.shards import packed as packed_module
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.dtypes import cpu_bf16_fast, resolve_dtype
from qwen_relay.shards.kv_cache import CacheMismatch, CacheShape, KVCache, RecurrentShape
from qwen_relay.shards.packed import (
    GROUPS,
    PackedHead,
    PackedLinear,
    bind_group_biases,
    can_prepack,
    grouped,
    packing_groups,
    prepack_group,
)
from qwen_relay.shards.paged_attention import paged_attention, paged_decode_attention
from qwen_relay.shards.sampler import NO_TOKEN, greedy, gumbel, sample
from qwen_relay.shards.step_inputs import StepMetadata
from qwen_relay.v1 import relay_pb2

TURKISH = "Merhaba! Nasıl yardımcı olabilirim? DOĞAL ĞÜŞİÖÇ ’"
IM_START, IM_END, ENDOFTEXT = 1022, 1023, 1021


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


# ------------------------------------------------------------------------------------------------ layout


def uniform(layers: int) -> ModelCosts:
    return ModelCosts(layers=(1.0,) * layers, embed=0.0, head=0.0)


@pytest.mark.parametrize(("layers", "shards", "expected"), [
    (5, 1, [(0, 5)]),
    (5, 2, [(0, 3), (3, 5)]),
    (5, 3, [(0, 2), (2, 4), (4, 5)]),
    (5, 4, [(0, 2), (2, 3), (3, 4), (4, 5)]),
    (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    (24, 4, [(0, 6), (6, 12), (12, 18), (18, 24)]),
    (28, 3, [(0, 10), (10, 19), (19, 28)]),
])
def test_equal_costs_split_evenly(layers, shards, expected):
    ranges = balanced_split(uniform(layers), shards)
    assert ranges == expected
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier slices take the extra layers


@pytest.mark.parametrize("shards", [0, -1, 6])
def test_balanced_split_refuses_impossible_counts(shards):
    with pytest.raises(ValueError, match="shards"):
        balanced_split(uniform(5), shards)


def _slice_costs(costs: ModelCosts, ranges: list[tuple[int, int]]) -> list[float]:
    out = [sum(costs.layers[a:b]) for a, b in ranges]
    out[0] += costs.embed
    out[-1] += costs.head
    return out


def test_balanced_split_is_optimal_against_every_split():
    """Exhaustive over all cut points: the costliest slice is the cheapest possible, then the sum of squares."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        costs = ModelCosts(tuple(rng.choice([1.0, 2.0, 3.0, rng.random() * 4]) for _ in range(n)),
                           embed=rng.random(), head=rng.choice([0.0, 1.0, 9.0, rng.random() * 10]))
        shards = rng.randint(1, n)
        got = _slice_costs(costs, balanced_split(costs, shards))
        best = min((max(c), sum(x * x for x in c))
                   for cuts in itertools.combinations(range(1, n), shards - 1)
                   for c in [_slice_costs(costs, list(zip((0, *cuts), (*cuts, n), strict=True)))])
        assert max(got) == pytest.approx(best[0])
        assert sum(x * x for x in got) == pytest.approx(best[1])


def test_lm_head_counts_as_layers_of_work():
    """Qwen2.5-0.5B's shape: the 151936 x 896 head is ~6.8 layers' worth (a layer counts its parameters and its
    non-matmul overhead), so the head's slice gets fewer layers."""
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    costs = model_costs(config)
    layer = 896 * 896 * 2 + 896 * 128 * 2 + (896 + 128 * 2) + 3 * 896 * 4864 + 2 * 896  # q,o; k,v; biases; MLP; norms
    assert costs.layers == pytest.approx((layer * (1 + LAYER_OVERHEAD),) * 24)
    assert costs.head == 151936 * 896 + 896 and costs.embed == 896
    assert balanced_split(costs, 2) == [(0, 15), (15, 24)]
    assert balanced_split(costs, 3) == [(0, 10), (10, 20), (20, 24)]
    even = _slice_costs(costs, [(0, 12), (12, 24)])
    balanced = _slice_costs(costs, balanced_split(costs, 2))
    assert max(even) / (sum(even) / 2) > 1.2 and max(balanced) / (sum(balanced) / 2) < 1.05
    assert balanced_split(costs, 24) == [(i, i + 1) for i in range(24)]  # one layer each: nothing to move


@pytest.mark.parametrize(("spec", "expected"), [
    ("0-4", [(0, 5)]),
    ("0-2,3-4", [(0, 3), (3, 5)]),
    ("0-0,1-3,4-4", [(0, 1), (1, 4), (4, 5)]),
    ("0,1-3,4", [(0, 1), (1, 4), (4, 5)]),  # a single layer may be written alone
    (" 0-1 , 2-4 ", [(0, 2), (2, 5)]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 5) == expected
    assert parse_layers(describe(expected), 5) == expected


@pytest.mark.parametrize("spec", [
    "",  # nothing
    "0-2",  # does not reach the last layer
    "0-2,3-5",  # beyond the last layer
    "1-4",  # does not start at 0
    "0-1,3-4",  # gap
    "0-2,2-4",  # overlap
    "0-2,4-3",  # reversed range
    "3-4,0-2",  # out of order
    "a-b",  # not numbers
    "0-2,,3-4",  # empty part
    "0-4,",  # trailing comma
    "-1-4",  # negative
    "0-2-4",  # two dashes
    "0:2,3:4",  # wrong separator
])
def test_parse_layers_refuses_bad_specs(spec):
    with pytest.raises(ValueError, match="--layers"):
        parse_layers(spec, 5)


# -------------------------------------------------------------------------------------------- validation

LIMITS = Limits(vocab_size=1024, max_context=64, default_max_new_tokens=16, max_new_tokens_cap=32)


def _validate(request: relay_pb2.GenerateRequest, tokenizer, limits: Limits):
    """Validation of a gRPC request, as the servicer does it: converted to the request record, then checked."""
    return validate(from_grpc(request), tokenizer, limits)


def _request(**fields) -> relay_pb2.GenerateRequest:
    fields.setdefault("prompt", "Merhaba")
    return relay_pb2.GenerateRequest(**fields)


def _invalid(tokenizer, request, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as info:
        _validate(request, tokenizer, limits)
    return str(info.value)


def test_validate_defaults(tokenizer):
    request_id, prompt_ids, params = _validate(_request(), tokenizer, LIMITS)
    assert request_id and len(request_id) <= MAX_REQUEST_ID_CHARS  # made up when empty
    assert prompt_ids == tokenizer.encode("Merhaba", add_special_tokens=False)
    assert params.max_new_tokens == LIMITS.default_max_new_tokens
    assert params.sampling.greedy
    assert params.sampling.top_p == 1.0 and params.sampling.top_k == 0
    assert params.stop == () and not params.ignore_eos and params.adapter == ""
    # No seed given: each request draws its own.
    seeds = {_validate(_request(temperature=1.0), tokenizer, LIMITS)[2].sampling.seed for _ in range(4)}
    assert len(seeds) > 1


def test_validate_keeps_what_was_asked(tokenizer):
    request = _request(request_id="abc", max_new_tokens=5, temperature=0.7, top_p=0.5, top_k=3, seed=42,
                       stop=["x", "yz"], ignore_eos=True, adapter="a")
    request_id, _, params = _validate(request, tokenizer, LIMITS)
    assert request_id == "abc"
    assert params == GenerationParams(
        max_new_tokens=5, sampling=SamplingParams(temperature=pytest.approx(0.7), top_p=0.5, top_k=3, seed=42),
        stop=("x", "yz"), ignore_eos=True, adapter="a")


def test_validate_inputs(tokenizer):
    ids = _validate(relay_pb2.GenerateRequest(prompt_token_ids=[0, 5, 1023]), tokenizer, LIMITS)[1]
    assert ids == [0, 5, 1023]
    messages = [relay_pb2.ChatMessage(role=r, content="hi") for r in ("system", "user", "assistant", "tool")]
    ids = _validate(relay_pb2.GenerateRequest(messages=messages), tokenizer,
                   Limits(vocab_size=1024, max_context=512))[1]
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "messages": [relay_pb2.ChatMessage(role="user", content="b")]}, "messages"),
    ({"prompt": "a", "prompt_token_ids": [5]}, "prompt_token_ids"),
    ({"prompt": "", "messages": [relay_pb2.ChatMessage(role="user", content="b")], "prompt_token_ids": [5]},
     "prompt_token_ids"),
    ({"prompt": "", "messages": [relay_pb2.ChatMessage(role="user", content="b"),
                                 relay_pb2.ChatMessage(role="robot", content="c")]}, "messages[1].role"),
    ({"prompt": "", "messages": [relay_pb2.ChatMessage(role="", content="b")]}, "messages[0].role"),
    ({"prompt": "", "prompt_token_ids": [5, -1]}, "prompt_token_ids[1]"),
    ({"prompt": "", "prompt_token_ids": [1024]}, "prompt_token_ids[0]"),
    ({"prompt": "", "prompt_token_ids": [2**62]}, "prompt_token_ids[0]"),
    ({"prompt": "", "prompt_token_ids": [5] * 65}, "prompt_token_ids"),
    ({"max_new_tokens": 33}, "max_new_tokens"),
    ({"prompt": "", "prompt_token_ids": [5] * 40, "max_new_tokens": 25}, "max_new_tokens"),  # 65 > 64
    ({"prompt": "", "prompt_token_ids": [5] * 64}, "prompt"),  # no room left for the default either
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": 1e-7}, "temperature"),  # below the sampler's float32 safety floor
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": -0.1}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.01}, "top_p"),
    ({"temperature": 1.0, "top_p": math.nan}, "top_p"),
    ({"request_id": "r" * (MAX_REQUEST_ID_CHARS + 1)}, "request_id"),
    ({"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}, "stop"),
    ({"stop": ["ok", ""]}, "stop[1]"),
    ({"stop": ["s" * (MAX_STOP_CHARS + 1)]}, "stop[0]"),
    ({"adapter": "a" * (MAX_ADAPTER_CHARS + 1)}, "adapter"),
    ({"prompt": "a" * (64 * 64 + 1)}, "prompt"),
    ({"prompt": "", "messages": [relay_pb2.ChatMessage(role="user", content="a" * (64 * 64))]}, "messages"),
])
def test_validate_refuses(tokenizer, fields, field):
    message = _invalid(tokenizer, _request(**fields))
    assert message.startswith(field), message


def test_validate_accepts_the_boundaries(tokenizer):
    def params(**fields) -> GenerationParams:
        return _validate(relay_pb2.GenerateRequest(**fields), tokenizer, LIMITS)[2]

    assert params(prompt="Merhaba", max_new_tokens=32).max_new_tokens == 32  # at the cap
    _, ids, at_context = _validate(relay_pb2.GenerateRequest(prompt_token_ids=[5] * 32, max_new_tokens=32),
                                  tokenizer, LIMITS)
    assert len(ids) + at_context.max_new_tokens == LIMITS.max_context  # exactly fills the context
    # Unset, the default (16) is held to the room left: 14, not an error about a parameter never sent.
    assert params(prompt_token_ids=[5] * 50).max_new_tokens == 14
    assert params(prompt_token_ids=[5] * 63).max_new_tokens == 1
    assert _validate(relay_pb2.GenerateRequest(prompt_token_ids=[1023]), tokenizer, LIMITS)[1] == [1023]  # last id
    top = params(prompt="Merhaba", temperature=1.0, top_p=1.0).sampling
    assert (top.temperature, top.top_p) == (1.0, 1.0)
    assert 0 < params(prompt="Merhaba", temperature=1e-5).sampling.temperature  # the floor (float32 on the wire)
    stops = ["s" * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES
    assert params(prompt="Merhaba", stop=stops).stop == tuple(stops)


def test_validate_refuses_a_prompt_that_renders_to_nothing():
    class Silent:
        def encode(self, text, add_special_tokens=False):
            return []

    with pytest.raises(InvalidRequest, match="^prompt"):
        _validate(_request(prompt="\u200b"), Silent(), LIMITS)


# ------------------------------------------------------------------------------------ slots and scheduling


def test_slot_allocator_hands_out_lowest_free_slot():
    slots = SlotAllocator(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    assert slots.num_free == 0
    with pytest.raises(RuntimeError):
        slots.allocate()
    slots.free(1)
    slots.free(0)
    assert slots.num_free == 2
    assert slots.allocate() == 0  # reuse, lowest first
    assert slots.allocate() == 1
    with pytest.raises(ValueError):
        slots.free(5)  # never existed
    slots.free(2)
    with pytest.raises(ValueError):
        slots.free(2)  # double free


def _seq(name: str, prompt_len: int, max_new: int = 8) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), GenerationParams(max_new_tokens=max_new),
                    Detokenizer(None))


def _sched(num_slots: int = 4, max_step_tokens: int = 100, num_blocks: int = 256, block_size: int = 4,
           depth: int = 1) -> Scheduler:
    """A scheduler without the prefix cache (the prompts of `_seq` all begin alike): tests/test_blocks.py
    tests the prefix cache."""
    return Scheduler(num_slots, BlockManager(num_blocks, block_size, prefix_cache=False), max_step_tokens, depth)


def _counts(rows: list[Row]) -> list[tuple[Sequence, int]]:
    return [(r.seq, r.count) for r in rows]


def _stepped(sched: Scheduler, rows: list[Row], token: int = 7) -> None:
    """What the engine does after a step: the rows' tokens are cached, and a row that reached its sequence's
    last token appends one (a chunk of a prompt appends nothing)."""
    complete = [r.seq for r in rows if r.completes]
    sched.done(rows)
    for seq in complete:
        seq.tokens.append(token)


def test_scheduler_prefill_then_decode():
    sched = _sched()
    a, b = _seq("a", 5), _seq("b", 3)
    sched.add(a)
    sched.add(b)
    assert len(sched) == 2
    rows = sched.schedule()
    assert _counts(rows) == [(a, 5), (b, 3)]  # one prefill step for both
    assert all(r.completes for r in rows) and [r.tokens for r in rows] == [a.tokens, b.tokens]
    assert [s.slot for s in (a, b)] == [0, 1]
    assert [len(s.block_table) for s in (a, b)] == [2, 1]  # blocks of 4 for positions 0..4 and 0..2
    assert all(s in sched.running for s in (a, b))
    _stepped(sched, rows)
    assert (a.num_cached, b.num_cached) == (5, 3)
    rows = sched.schedule()
    assert _counts(rows) == [(a, 1), (b, 1)]  # a decode step: one pending token each
    assert [r.tokens for r in rows] == [[7], [7]]
    assert [len(s.block_table) for s in (a, b)] == [2, 1]  # position 5 and 3 fit the blocks they hold


def test_scheduler_new_request_prefills_beside_the_running_decodes():
    """Continuous batching: a new prompt does not make the running sequences wait a step."""
    sched = _sched()
    a = _seq("a", 4)
    sched.add(a)
    _stepped(sched, sched.schedule())
    c = _seq("c", 6)
    sched.add(c)
    rows = sched.schedule()
    assert _counts(rows) == [(a, 1), (c, 6)]  # decodes first, then the prompt
    _stepped(sched, rows)
    assert _counts(sched.schedule()) == [(a, 1), (c, 1)]


def test_scheduler_step_token_budget_chunks_prompts():
    sched = _sched(max_step_tokens=10)
    a, b, c = _seq("a", 6), _seq("b", 6), _seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    rows = sched.schedule()
    assert _counts(rows) == [(a, 6), (b, 4)]  # b's first chunk fills the budget
    assert [r.completes for r in rows] == [True, False]  # b's row samples nothing that counts
    assert list(sched.waiting) == [c]  # order kept: c does not overtake b
    _stepped(sched, rows)
    assert b.num_cached == 4 and b.tokens == b.prompt_ids  # no token for a chunk
    rows = sched.schedule()
    assert _counts(rows) == [(a, 1), (b, 2), (c, 4)]  # a decodes, b's rest, then c
    assert [r.completes for r in rows] == [True, True, True]
    _stepped(sched, rows)
    # A prompt longer than the whole budget runs in chunks beside the decodes, each step within the budget.
    big = _seq("big", 25)
    sched.add(big)
    chunks = []
    while True:
        rows = sched.schedule()
        assert sum(r.count for r in rows) <= 10
        assert _counts(rows)[:3] == [(a, 1), (b, 1), (c, 1)]  # the running streams keep producing
        (row,) = [r for r in rows if r.seq is big]
        chunks.append((row.count, row.completes))  # before the step is done: `completes` reads num_cached
        _stepped(sched, rows)
        if chunks[-1][1]:
            break
    assert chunks == [(7, False), (7, False), (7, False), (4, True)]
    assert big.num_cached == 25 and len(big.tokens) == 26


def test_scheduler_max_step_tokens_must_exceed_the_running_sequences():
    with pytest.raises(ValueError, match="must exceed"):
        Scheduler(4, BlockManager(16, 4), max_step_tokens=4)


def test_scheduler_slot_reuse_and_finish():
    sched = _sched(num_slots=2)
    a, b, c = _seq("a", 2), _seq("b", 2), _seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    assert _counts(sched.schedule()) == [(a, 2), (b, 2)]  # only two slots
    assert c in sched.waiting and c.slot is None and c.block_table == []
    _stepped(sched, [Row(a, 2), Row(b, 2)])
    rows = sched.schedule()
    assert _counts(rows) == [(a, 1), (b, 1)]  # still no slot for c: it keeps waiting, the others decode
    _stepped(sched, rows)
    free = sched.blocks.num_free
    assert sched.finish(a) is None  # nothing to tell the slices: the gateway owns the blocks
    assert a.slot is None and a not in sched.running and a.block_table == []
    assert sched.slots.num_free == 1 and sched.blocks.num_free == free + 1
    assert _counts(sched.schedule()) == [(b, 1), (c, 2)]
    assert c.slot == 0  # the freed slot is reused
    sched.finish(c)
    # Finishing a sequence that never started (cancelled while waiting) frees nothing.
    d = _seq("d", 2)
    sched.add(d)
    sched.add(e := _seq("e", 2))
    sched.finish(b)
    assert _counts(sched.schedule()) == [(d, 2), (e, 2)]
    f = _seq("f", 2)
    sched.add(f)
    sched.finish(f)
    assert f not in sched.waiting and len(sched) == 2
    assert sched.slots.num_free == 0


def test_scheduler_rebuilds_lost_caches_as_a_prefill():
    sched = _sched()
    a, b = _seq("a", 3), _seq("b", 2)
    sched.add(a)
    sched.add(b)
    _stepped(sched, sched.schedule())
    _stepped(sched, sched.schedule())
    sched.caches_lost()  # a slice restarted: every cache is gone
    assert a.block_table == b.block_table == [] and a.num_cached == b.num_cached == 0
    assert sched.blocks.num_free == sched.blocks.num_blocks
    rows = sched.schedule()
    assert _counts(rows) == [(a, 5), (b, 4)]
    assert [r.tokens for r in rows] == [a.tokens, b.tokens]  # prompt + everything generated
    assert all(r.completes for r in rows)
    assert a.slot == 0 and b.slot == 1  # slots are kept: the recurrent state is rebuilt from position 0


def test_scheduler_rebuilds_within_the_step_budget_before_admitting_anyone():
    sched = _sched(max_step_tokens=10)
    a, b, c = _seq("a", 5), _seq("b", 5), _seq("c", 3)
    for seq in (a, b, c):
        sched.add(seq)
    _stepped(sched, sched.schedule())  # a + b (10 tokens)
    _stepped(sched, sched.schedule())  # a, b decode; c
    sched.caches_lost()  # 7 + 7 + 4 tokens to rebuild
    late = _seq("late", 2)
    sched.add(late)
    rows = sched.schedule()
    assert _counts(rows) == [(a, 7), (b, 3)]  # b's 7 would pass the budget of 10: a chunk
    assert list(sched.waiting) == [late]
    _stepped(sched, rows)
    rows = sched.schedule()
    assert _counts(rows) == [(a, 1), (b, 4), (c, 4), (late, 1)]  # the replays first; the newcomer gets the rest
    assert [r.completes for r in rows] == [True, True, True, False]
    assert list(sched.waiting) == []


def test_scheduler_steps_a_suspect_alone():
    sched = _sched()
    a, b = _seq("a", 3), _seq("b", 3)
    sched.add(a)
    sched.add(b)
    _stepped(sched, sched.schedule())
    b.lost_steps = 2  # in two lost steps: maybe what kills the slice
    assert _counts(sched.schedule()) == [(b, 1)]
    b.lost_steps = 0  # the engine clears it once b gets through a step alone
    assert _counts(sched.schedule()) == [(a, 1), (b, 1)]


def test_scheduler_idle_is_empty():
    assert _sched(num_slots=2, max_step_tokens=10).schedule() == []


# ----------------------------------------------------------------------------------------------- sampler


def _logits(rows: int = 4, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    tokens = sample(logits, [SamplingParams()] * 4, [1, 2, 3, 4])
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_breaks_ties_as_argmax_and_keeps_rows_whose_sum_is_large(dtype):
    """bf16 logits tie often: the first maximum wins, as in `generate()`. A healthy fp16 row whose logits sum
    past fp16's range (65504) still gets its token: finiteness is judged on a float32 sum."""
    logits = torch.zeros(3, 151936, dtype=dtype)
    logits[0, [5, 100000]] = 1
    logits[1, [150000, 77]] = 2
    logits[2] = 7  # sums to ~1.06e6
    assert greedy(logits).tolist() == logits.argmax(-1).tolist() == [5, 77, 0]


def test_a_non_finite_row_gets_no_token_and_spares_the_rest():
    logits = _logits()
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams()]
    tokens = sample(logits, params, [1, 2, 3, 4]).tolist()
    assert tokens[1] == tokens[2] == NO_TOKEN
    assert [tokens[0], tokens[3]] == logits[[0, 3]].argmax(-1).tolist()


def test_engine_fails_only_the_request_without_a_token(tokenizer):
    """A step whose last slice could not pick a token for one row ends that request; its neighbours go on."""

    class OneRowBroken:
        depth = 1

        async def step(self, batch: StepBatch) -> list[int]:
            return [NO_TOKEN if slot == 0 else 5 for slot in batch.slots]

    async def run() -> tuple[list, list, tuple[int, int]]:
        pipeline = OneRowBroken()
        engine = Engine(EngineConfig(max_batch=2, max_context=64, eos_ids=frozenset(), num_blocks=8, block_size=8))
        engine.start(pipeline)
        seqs = [Sequence(f"r{i}", [1, 2, 3], GenerationParams(max_new_tokens=3), Detokenizer(tokenizer, ()))
                for i in range(2)]

        async def collect(seq: Sequence) -> list:
            try:
                return [d.token_ids async for d in engine.generate(seq)]
            except RuntimeError as e:
                return [str(e)]

        try:
            results = await asyncio.gather(*(collect(s) for s in seqs))
        finally:
            await engine.stop()
        return results[0], results[1], (engine.blocks.num_free, engine.scheduler.slots.num_free)

    broken, healthy, free = asyncio.run(run())
    assert broken == ["the model produced non-finite logits (NaN or inf) for this request"]
    assert healthy == [[5], [5], [5]]
    assert free == (8, 2)  # every block and both slots handed back, with no message to any slice


def test_seeded_draws_are_reproducible_per_seed_and_position():
    logits = _logits(rows=1, vocab=1000)
    p = SamplingParams(temperature=1.5, seed=1234)
    draws = [int(sample(logits.clone(), [p], [pos])[0]) for pos in range(40)]
    assert draws == [int(sample(logits.clone(), [p], [pos])[0]) for pos in range(40)]
    assert len(set(draws)) > 10  # positions give different draws from the same distribution
    other = [int(sample(logits.clone(), [SamplingParams(temperature=1.5, seed=1235)], [pos])[0])
             for pos in range(40)]
    assert other != draws
    # A row's draw depends on its own (seed, position) only, not on the rest of the batch: greedy neighbours,
    # sampled ones, and ones whose top-k/top-p filter sends the whole batch through the sort.
    batch = torch.cat([_logits(rows=3, vocab=1000, seed=9), logits])
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=5), SamplingParams(), p]
    assert int(sample(batch, params, [3, 17, 2, 21])[3]) == draws[21]
    params[0] = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=6)
    assert int(sample(batch, params, [3, 17, 2, 21])[3]) == draws[21]
    # A huge seed (uint64 on the wire) is fine.
    big = SamplingParams(temperature=1.0, seed=2**64 - 1)
    assert sample(logits.clone(), [big], [3]).tolist() == sample(logits.clone(), [big], [3]).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(rows=8, vocab=500)
    greedy = logits.argmax(-1).tolist()
    for seed in range(5):
        top_k = [SamplingParams(temperature=2.0, top_k=1, seed=seed)] * 8
        assert sample(logits.clone(), top_k, list(range(8))).tolist() == greedy
        top_p = [SamplingParams(temperature=2.0, top_p=1e-6, seed=seed)] * 8
        assert sample(logits.clone(), top_p, list(range(8))).tolist() == greedy


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]])
    top_k = {int(sample(logits.clone(), [SamplingParams(temperature=5.0, top_k=2, seed=s)], [0])[0])
             for s in range(200)}
    assert top_k == {0, 1}
    # Probabilities at temperature 1: ~0.66, 0.24, 0.09, ...; top_p 0.8 keeps the first two.
    top_p = {int(sample(logits.clone(), [SamplingParams(temperature=1.0, top_p=0.8, seed=s)], [0])[0])
             for s in range(200)}
    assert top_p == {0, 1}
    anything = {int(sample(logits.clone(), [SamplingParams(temperature=50.0, seed=s)], [0])[0])
                for s in range(200)}
    assert anything == set(range(6))


def test_gumbel_noise_is_finite_at_the_extremes():
    """All-ones and all-zero bits (and everything between) give finite noise: an infinite one would pick its
    token whatever the logits, or make a filtered-out token NaN."""
    bits = torch.tensor([-1, 0, 1, 2**63 - 1, -(2**63), 2**62])
    assert torch.isfinite(gumbel(bits)).all()


def test_seeded_draws_follow_the_tempered_distribution():
    """Across positions, the draws' frequencies are softmax(logits / temperature) over the kept candidates:
    the hashed Gumbel noise is unbiased. Rows of one batch, each its own position."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    for params, want in ((SamplingParams(temperature=1.0, seed=42), torch.softmax(logits[0], -1)),
                         (SamplingParams(temperature=2.0, top_k=3, seed=7),
                          torch.cat([torch.softmax(logits[0, :3] / 2, -1), torch.zeros(1)]))):
        tokens = sample(logits, [params] * 4000, list(range(4000)))
        freq = torch.bincount(tokens, minlength=4) / 4000
        assert torch.allclose(freq, want, atol=0.03), (freq, want)


# ---------------------------------------------------------------------------------------------- KV cache


def _cache(slots: int = 4, blocks: int = 8, block_size: int = 4) -> KVCache:
    return KVCache(num_layers=2, shape=CacheShape(blocks, block_size, slots), num_kv_heads=2, head_dim=3,
                   dtype=torch.float32, device=torch.device("cpu"))


def test_a_fresh_cache_refuses_steps_until_reset():
    """A restarted actor's cache holds nothing the gateway's tables point to: it refuses every step (the
    gateway recovers, which resets it and replays) instead of reading zeros as someone's keys."""
    cache = _cache()
    assert not cache.live
    with pytest.raises(CacheMismatch):
        cache.check([0], [[0, 1]], [5])
    with pytest.raises(CacheMismatch):
        cache.check([0], [[0]], [1])  # a prefill too: nothing is accepted before the reset
    cache.reset()
    assert cache.live
    cache.check([0, 1], [[0, 1], [2]], [5, 2])
    cache.reset()  # again: harmless
    cache.check([0], [[3]], [4])


def test_cache_check_refuses_a_step_it_cannot_hold():
    cache = _cache()
    cache.reset()
    cache.check([0, 3], [[7, 0], [5]], [8, 1])  # any blocks, in any order; a table may be longer than needed
    cache.check([1], [[2, 3, 4]], [9])
    with pytest.raises(ValueError, match="cannot hold"):
        cache.check([0], [[0, 1]], [9])  # 2 blocks of 4 hold positions 0..7, not 8
    with pytest.raises(ValueError, match="cannot hold"):
        cache.check([0], [[]], [1])
    with pytest.raises(ValueError, match="outside"):
        cache.check([0], [[0, 8]], [5])  # block 8 is the scratch block: nobody's
    with pytest.raises(ValueError, match="outside"):
        cache.check([0], [[-1]], [1])
    with pytest.raises(ValueError, match="slot"):
        cache.check([4], [[0]], [1])  # no such slot
    with pytest.raises(ValueError, match="cannot hold"):
        cache.check([0, 1], [[0, 1], [2]], [5, 6])  # one row out of bounds is enough
    with pytest.raises(ValueError):
        cache.check([0, 1], [[0]], [1, 1])  # a row without a table


def test_cache_writes_go_to_their_blocks_and_gather_reads_tables_in_order():
    cache = _cache(blocks=6, block_size=4)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    assert cache.k.shape == (2, 6 + 1, 4, 2, 3)  # + the scratch block
    assert cache.scratch == 6

    # Writes land at (block, offset) pairs and nowhere else.
    before = cache.k.clone()
    k = torch.full((2, 2, 3), 9.0)
    cache.write(0, torch.tensor([2, 5]), torch.tensor([3, 0]), k, k)
    assert torch.equal(cache.k[0, 2, 3], k[0]) and torch.equal(cache.k[0, 5, 0], k[1])
    assert torch.equal(cache.v[0, 2, 3], k[0])
    changed = (cache.k != before).nonzero().tolist()
    assert {(layer, block, offset) for layer, block, offset, _, _ in changed} == {(0, 2, 3), (0, 5, 0)}

    # A row's positions 0 .. W * block_size - 1 come from its table's blocks in order; padding is scratch.
    tables = torch.tensor([[4, 1, 6], [0, 3, 2]])
    keys, values = cache.gather(1, tables)
    assert keys.shape == values.shape == (2, 2, 12, 3)  # [B, kv_heads, W * block_size, head_dim]
    for row, table in enumerate(tables.tolist()):
        for position in range(12):
            block, offset = table[position // 4], position % 4
            assert torch.equal(keys[row, :, position], cache.k[1, block, offset])
            assert torch.equal(values[row, :, position], cache.v[1, block, offset])


def test_cache_recurrent_state_is_per_slot_and_fresh_rows_start_from_zeros():
    recurrent = RecurrentShape(layers=1, conv_dim=2, conv_kernel=3, heads=1, key_dim=2, value_dim=2)
    cache = KVCache(num_layers=0, shape=CacheShape(4, 4, 3), num_kv_heads=1, head_dim=2, dtype=torch.float32,
                    device=torch.device("cpu"), recurrent=recurrent)
    assert cache.conv.shape == (1, 3, 2, 3) and cache.state.shape == (1, 3, 1, 2, 2)  # no scratch slot
    slots = torch.tensor([2, 0])
    cache.write_state(0, slots, torch.ones(2, 2, 3), torch.full((2, 1, 2, 2), 5.0))
    conv, state = cache.read_state(0, torch.tensor([0, 2, 1]), torch.tensor([False, True, False]))
    assert conv[0].eq(1).all() and conv[1].eq(0).all() and conv[2].eq(0).all()  # slot 2 read as fresh: zeros
    assert state[0].eq(5).all() and state[1].eq(0).all()
    assert cache.conv[0, 2].eq(1).all()  # reading never clears


@pytest.mark.skipif(not paged_attention(torch.device("cpu"), torch.float32, 64), reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(14, 2, 64), (16, 8, 128), (4, 2, 16), (10, 1, 32), (9, 9, 48)])
def test_paged_decode_attention_matches_sdpa_over_the_gathered_blocks(dtype, heads, kv_heads, dim):
    """The kernel reads each row's keys through its block table up to its own position, as SDPA does over the
    gathered, masked blocks; G and D the kernel specialises (7/64, 2/128) and ones it does not (2/16, 10/32, 1/48),
    a row of one key, rows ending mid-block and on a block's edge, padding past a row's last block."""
    torch.manual_seed(0)
    block_size, blocks, layers, width = 16, 24, 2, 6
    k = torch.randn(layers, blocks + 1, block_size, kv_heads, dim, dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in range(5)])
    positions = torch.tensor([[0], [15], [16], [47], [95]])
    tables[0, 1:] = blocks  # a short row's unused entries name the scratch block
    q = torch.randn(5, heads, 1, dim, dtype=dtype)
    lengths = positions[:, 0] + 1
    out = paged_decode_attention(q, k, v, 1, tables, lengths)
    keys = k[1, tables].view(5, width * block_size, kv_heads, dim).transpose(1, 2)
    values = v[1, tables].view(5, width * block_size, kv_heads, dim).transpose(1, 2)
    mask = torch.arange(width * block_size)[None, None, None, :] <= positions[:, None, :, None]
    want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True)
    assert out.shape == q.shape and out.dtype == dtype
    # fp32: summed in another order; bf16: the fp32 result rounded once to bf16, as SDPA's bf16 kernel rounds.
    tol = {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 4e-3}
    torch.testing.assert_close(out.float(), want, **tol)
    # A row's output does not depend on the other rows of the step (batched decoding stays unbatched's).
    assert torch.equal(paged_decode_attention(q[3:4], k, v, 1, tables[3:4], lengths[3:4])[0], out[3])
    with pytest.raises(ValueError, match="int64 tables"):  # the operator checks, it does not read past memory
        paged_decode_attention(q, k, v, 1, tables.int(), lengths)
    with pytest.raises(ValueError, match="for every query row"):
        paged_decode_attention(q, k, v, 1, tables[:4], lengths[:4])


# ------------------------------------------------------------------------------------------------- batch


needs_onednn = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32), reason="no oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_linear_matches_dense_and_is_batch_invariant(dtype):
    if not can_prepack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} kernels on this CPU")
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 200, dtype=dtype)
    packed = PackedLinear(dense, dense.weight)
    head = torch.nn.Linear(96, 40_000, bias=False, dtype=dtype)  # more rows than one block: packed in 3 blocks
    packed_head = PackedHead(head, head.weight.split(16384))
    assert len(packed_head.blocks) == 3
    assert packed.weight.dtype == dtype
    x = torch.randn(2, 40, 96, dtype=dtype)  # [B, T, H], as slices call it
    # bf16: the same products summed in fp32 by either kernel, rounded once to bf16 (8 mantissa bits).
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    with torch.inference_mode():
        for fast, slow in ((packed, dense), (packed_head, head)):
            out = fast(x)
            assert out.shape == slow(x).shape and out.dtype == dtype
            torch.testing.assert_close(out, slow(x), **tol)
            # A row's result does not depend on what else is in the batch, bit for bit: batched greedy
            # decoding stays identical to unbatched.
            rows = x.reshape(-1, 96)
            assert all(torch.equal(fast(rows[:m])[0], fast(rows[:1])[0]) for m in (2, 3, 4, 16, 80))
            # Fewer rows than MIN_ROWS run padded: the same shapes and values as the dense layer, 2-D or 3-D.
            for small in (x[:1, :1], x[:1, :2], x[:1, :3], rows[:2]):
                assert fast(small).shape == slow(small).shape
                torch.testing.assert_close(fast(small), slow(small), **tol)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_native_packed_linear_is_the_python_operator_bit_for_bit(dtype):
    """What a compiled step calls where the C++ operator builds: the same oneDNN call and padding as the Python
    operator, so a step's tokens do not depend on which one it got; a freed weight is an error, not a read."""
    if not can_prepack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} kernels on this CPU")
    if not packed_module.load_native():
        pytest.skip("no C++ compiler for the native operator here")
    torch.manual_seed(0)
    dense = torch.nn.Linear(4864, 96, dtype=dtype)  # a long reduction: kernels for 1 and 4+ rows sum apart
    packed = PackedLinear(dense, dense.weight)  # packed after loading: registered at packing
    x = torch.randn(2, 3, 4864, dtype=dtype)
    with torch.inference_mode():
        for xs in (x[:1, :1], x[:1, :2], x[:1, :3], x[0], x):
            want = torch.ops.qwen_relay.packed_linear(xs, packed.handle, packed.bias, 96)
            got = torch.ops.qwen_relay.packed_linear_native(xs, packed.handle, packed.bias, 96,
                                                              packed_module.MIN_ROWS)
            assert got.shape == want.shape and torch.equal(got, want)
        handle = packed.handle
        del packed
        gc.collect()
        with pytest.raises(RuntimeError, match="not registered or was freed"):
            torch.ops.qwen_relay.packed_linear_native(x, handle, None, 96, packed_module.MIN_ROWS)


@needs_onednn
def test_a_packed_group_matches_its_linears_called_together_or_one_by_one(monkeypatch):
    """q/k/v packed as one weight: the group's call, and each member called on its own (as an adapter's wrapper
    calls its base layer), give each linear's own output, and one input costs one oneDNN call either way."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=b) for n, b in ((64, True), (16, False), (16, True))]
    names = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"]
    root = torch.nn.Module()
    root.attn = torch.nn.Module()
    for name, linear in zip(("q_proj", "k_proj", "v_proj"), linears, strict=True):
        setattr(root.attn, name, linear)
    assert packing_groups(root, names + ["attn.o_proj.weight"]) == [names]
    assert packing_groups(root, names[:2]) == []  # a group packs only whole
    prepack_group(root, names, [linear.weight.detach() for linear in linears])
    for name, linear in zip(("q_proj", "k_proj", "v_proj"), linears, strict=True):
        getattr(root.attn, name).bias = linear.bias  # what the loader does after packing
    bind_group_biases(root)
    group = grouped(root.attn, GROUPS[0])
    assert group is not None and sum(p.numel() for p in root.parameters()) == group.weight.numel() + 64 + 16
    calls = []
    real = packed_module._forward
    monkeypatch.setattr(packed_module, "_forward", lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    with torch.inference_mode():
        expected = [linear(x) for linear in linears]
        for got, want in zip(group(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        one_by_one = [root.attn.q_proj(x), root.attn.k_proj(x), root.attn.v_proj(x)]
        assert len(calls) == 2 and group._kept is None  # every member served: nothing held between steps
        for got, want in zip(one_by_one, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # A new input is computed afresh, not served from the last one.
        torch.testing.assert_close(root.attn.k_proj(y), linears[1](y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(root.attn.k_proj(y), linears[1](y), rtol=1e-5, atol=1e-5)


def test_auto_dtype_on_cpu_keeps_the_checkpoints_own():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, torch.float32) == torch.float32  # the fp32 test checkpoints stay fp32
    assert resolve_dtype("auto", cpu, torch.bfloat16) == (torch.bfloat16 if cpu_bf16_fast() else torch.float32)
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32  # no fast fp16 CPU kernels
    assert resolve_dtype("auto", cpu) == torch.float32  # nothing stored named (training)
    assert resolve_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16  # asked for: converted
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp8", cpu)


def test_step_batch_padded():
    batch = StepBatch(slots=[3, 0], starts=[0, 7], token_ids=[[11, 12, 13], [14]], blocks=[[5], [2, 9, 4]],
                      sampling=[SamplingParams(), SamplingParams()])
    assert len(batch) == 2 and batch.num_tokens == 4
    assert batch.ends() == [3, 8]
    ids, positions, valid = batch.padded(torch.device("cpu"))
    assert ids.tolist() == [[11, 12, 13], [14, 0, 0]]
    assert ids.dtype == torch.long
    assert positions.tolist() == [[0, 1, 2], [7, 8, 9]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]

    # Block tables padded with the scratch block, or cut to the width asked for.
    assert batch.tables(3, 99, torch.device("cpu")).tolist() == [[5, 99, 99], [2, 9, 4]]
    assert batch.tables(2, 99, torch.device("cpu")).tolist() == [[5, 99], [2, 9]]
    assert batch.tables(3, 99, torch.device("cpu")).dtype == torch.long

    decode = StepBatch(slots=[0, 1], starts=[5, 9], token_ids=[[1], [2]], blocks=[[0, 1], [2, 3, 4]],
                       sampling=[SamplingParams()] * 2)
    ids, positions, valid = decode.padded(torch.device("cpu"))
    assert ids.tolist() == [[1], [2]] and positions.tolist() == [[5], [9]] and valid.all()


def test_step_metadata_groups_one_token_rows_and_each_longer_row():
    """Attention runs per group, so a prompt chunk beside decodes does not pad them to its width; every token
    is in exactly one group, and each group reads keys only up to its own longest row."""
    batch = StepBatch(slots=[0, 1, 2, 3], starts=[40, 0, 3, 0], token_ids=[[7], [1, 2, 3], [8], [4, 5]],
                      blocks=[[0, 1, 2], [3], [4], [5]], sampling=[SamplingParams()] * 4)
    meta = StepMetadata.build(batch, torch.device("cpu"), block_size=16, scratch=99)
    decode, first, second = meta.groups
    assert (decode.width, decode.tokens.tolist(), decode.tables.tolist()) == (1, [0, 4], [[0, 1, 2], [4, 99, 99]])
    assert decode.mask.shape == (2, 1, 1, 48)
    assert decode.mask[0, 0, 0].sum() == 41 and decode.mask[1, 0, 0].sum() == 4  # positions 0..40 and 0..3
    assert (first.width, first.tokens.tolist(), first.tables.tolist()) == (3, [1, 2, 3], [[3]])
    assert first.mask[0, 0].tolist() == [[j <= i for j in range(16)] for i in range(3)]  # causal
    assert (second.width, second.tokens.tolist(), second.tables.tolist()) == (2, [5, 6], [[5]])
    assert sorted(t for g in meta.groups for t in g.tokens.tolist()) == list(range(batch.num_tokens))


# ---------------------------------------------------------------------------------------- detokenization


def _feed(detok: Detokenizer, ids: list[int]) -> list[str]:
    """Chunks for `ids` fed one at a time, up to a stop (the engine feeds nothing after one)."""
    chunks = []
    for t in ids:
        chunks.append(detok.add(t))
        if detok.stopped:
            break
    return chunks


def test_detokenizer_streams_whole_characters(tokenizer):
    ids = tokenizer.encode(TURKISH, add_special_tokens=False)
    # Precondition: the tokenizer really splits some characters ('Ğ', '’') into byte tokens.
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids)
    detok = Detokenizer(tokenizer)
    chunks = _feed(detok, ids)
    chunks.append(detok.flush())
    assert all(REPLACEMENT not in c for c in chunks), chunks
    assert "".join(chunks) == TURKISH
    assert not detok.stopped
    # Every prefix emitted so far is a prefix of the text: nothing is reordered or emitted early.
    emitted = ""
    for c in chunks:
        emitted += c
        assert TURKISH.startswith(emitted)


def test_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("Merhaba!", add_special_tokens=False)
    detok = Detokenizer(tokenizer)
    chunks = _feed(detok, [ids[0], IM_END, ids[1], ENDOFTEXT])
    assert "".join(chunks) + detok.flush() == "Merhaba!"


def test_detokenizer_backend_decode_matches_the_tokenizers(tokenizer):
    """The fast path (the Rust decoder called directly) streams what `tokenizer.decode` would, chunk for chunk."""

    class SlowOnly:  # a tokenizer without `backend_tokenizer`: `decode` is all the detokenizer can call
        def decode(self, ids: list[int], **kwargs: object) -> str:
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode(TURKISH, add_special_tokens=False)
    ids = [*ids[:5], IM_END, *ids[5:], ENDOFTEXT]
    fast, slow = Detokenizer(tokenizer), Detokenizer(SlowOnly())
    assert fast.backend is not None and slow.backend is None
    assert _feed(fast, ids) + [fast.flush()] == _feed(slow, ids) + [slow.flush()]


def test_detokenizer_stop_split_across_tokens(tokenizer):
    text = "Merhaba! Nasıl yardımcı olabilirim?"
    ids = tokenizer.encode(text, add_special_tokens=False)  # Merhaba | ! | Nasıl | yardımcı | ...
    stop = "ıl yard"
    detok = Detokenizer(tokenizer, (stop,))
    first = _feed(detok, ids[:3])
    assert "".join(first) == "Merhaba! Nas"  # "ıl" could start the stop: held back
    assert not detok.stopped
    out = detok.add(ids[3])
    assert detok.stopped
    assert "".join(first) + out == "Merhaba! Nas"
    assert detok.flush() == ""  # nothing after a stop


def test_detokenizer_releases_a_ruled_out_prefix(tokenizer):
    text = "Merhaba! Nasıl yardımcı olabilirim?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer, ("ıl yok",))
    assert "".join(_feed(detok, ids[:3])) == "Merhaba! Nas"
    # "ıl y" then "a" rules the stop out, so "ıl" goes; the final "ı" could start the stop again: held.
    assert detok.add(ids[3]) == "ıl yardımc"
    assert detok.add(ids[4]) == "ı olabilirim"
    assert "".join(_feed(detok, ids[5:])) + detok.flush() == "?"
    assert not detok.stopped


def test_detokenizer_stop_inside_a_multibyte_character(tokenizer):
    ids = tokenizer.encode(TURKISH, add_special_tokens=False)
    detok = Detokenizer(tokenizer, ("Ğ",))
    chunks = _feed(detok, ids)
    assert detok.stopped
    assert "".join(chunks) == TURKISH[: TURKISH.index("Ğ")]
    assert all(REPLACEMENT not in c and "Ğ" not in c for c in chunks)


def test_detokenizer_earliest_stop_wins_and_stop_at_start(tokenizer):
    ids = tokenizer.encode("Merhaba! Nasıl yardımcı", add_special_tokens=False)
    detok = Detokenizer(tokenizer, ("yardım", "Nas"))
    out = "".join(_feed(detok, ids[:4]))
    assert detok.stopped and out == "Merhaba! "
    detok = Detokenizer(tokenizer, ("Merhaba",))
    assert detok.add(ids[0]) == "" and detok.stopped


def test_detokenizer_flush_releases_what_is_held(tokenizer):
    ids = tokenizer.encode("a!!", add_special_tokens=False)
    detok = Detokenizer(tokenizer, ("!!!",))
    assert "".join(_feed(detok, ids)) == "a"  # "!!" might become the stop
    assert detok.flush() == "!!"  # generation ended (EOS or length): it was never a stop
    # Ending inside a character: add() holds it back, flush() gives what there is.
    ids = tokenizer.encode("DOĞ", add_special_tokens=False)
    detok = Detokenizer(tokenizer)
    chunks = _feed(detok, ids[:-1])
    assert "".join(chunks) == "DO"
    assert detok.flush() == REPLACEMENT


def test_scheduler_splits_a_burst_of_prompts_across_the_steps_in_flight():
    """16 prompts of 64 tokens at once, 2 steps in flight: two prefill steps of 8, so the second slice runs the
    first half while the first slice prefills the second; with one step in flight, one step of all 16."""
    for depth, sizes in ((2, [8, 8]), (1, [16])):
        sched = _sched(num_slots=16, max_step_tokens=4096, num_blocks=1024, depth=depth)
        for i in range(16):
            sched.add(_seq(f"s{i}", 64))
        steps = []
        while rows := sched.schedule(room=depth - len(steps)):
            assert all(r.count == 64 and r.completes for r in rows)  # whole prompts: the budget holds them
            for row in rows:
                row.seq.in_flight = True
            steps.append(rows)
        assert [len(b) for b in steps] == sizes
        assert not sched.waiting


def test_scheduler_sends_a_lone_prompt_whole_whatever_the_room():
    """One prompt with room for 2 steps: its chunks cannot overlap (each needs the one before it cached), so
    halving it only adds steps (a 200-token prompt took 8: 100, 50, 25, ...); it goes in one."""
    sched = _sched(num_slots=4, max_step_tokens=512, num_blocks=256, depth=2)
    sched.add(_seq("alone", 200))
    rows = sched.schedule(room=2)
    assert [r.count for r in rows] == [200] and rows[0].completes
    rows[0].seq.in_flight = True
    assert sched.schedule(room=1) == []  # nothing else to send while it is in the pipe


# ------------------------------------------------------------------------------------- threads and depth


@pytest.mark.parametrize(("options", "gpu", "threads", "in_flight"), [
    ({}, False, "cores", 1),  # slices share this machine's cores: each gets them all, one step at a time
    ({"threads": 1}, False, 1, 0),  # threads set: one step per slice, as on devices of their own
    ({"max_in_flight": 2}, False, "half", 2),  # pipelined on shared cores: the cores split, never oversubscribed
    ({}, True, 0, 0),  # a GPU each: pipelined
], ids=["shared-cores", "threads-set", "in-flight-set", "gpus"])
def test_serve_policy_for_threads_and_steps_in_flight(tiny_model, options, gpu, threads, in_flight):
    import os

    from qwen_relay.server.app import Relay, ServeOptions

    relay = Relay(ServeOptions(model=str(tiny_model), shards=2, use_ray=False, **options))
    cores = os.cpu_count() or 1
    assert relay._in_flight(gpu) == in_flight
    assert relay._threads(gpu) == {"cores": cores, "half": max(1, cores // 2)}.get(threads, threads)
