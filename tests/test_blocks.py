"""KV blocks owned by the gateway (server/block_manager.py), the token-budget scheduler (server/scheduler.py),
and the engine over in-process slices with both: prefix hits, preemption and chunked prompts never change a
token. Outputs are compared with `generate()` (greedy, fp32), as everywhere."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from qwen_relay.server.block_manager import BlockManager
from qwen_relay.server.detokenizer import Detokenizer
from qwen_relay.server.engine import Engine, EngineConfig
from qwen_relay.server.layout import balanced_split, model_costs
from qwen_relay.server.pipeline import LocalPipeline, SliceLost
from qwen_relay.server.scheduler import Row, Scheduler
from qwen_relay.server.sequence import GenerationParams, Sequence
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.runner import SliceSpec

# ------------------------------------------------------------------------------------------ block manager


def _seq(tokens: list[int], fingerprint: str = "", adapter: str = "", max_new: int = 8) -> Sequence:
    params = GenerationParams(max_new_tokens=max_new, adapter=adapter, adapter_fingerprint=fingerprint)
    return Sequence("r", list(tokens), params, Detokenizer(None))


def _computed(bm: BlockManager, seq: Sequence, end: int | None = None) -> None:
    """What a step does for a sequence: blocks for its tokens up to `end`, cached once the step is back, full
    blocks indexed."""
    end = len(seq.tokens) if end is None else end
    assert bm.reserve(seq, end)
    seq.num_cached = end
    bm.register(seq)


PROMPT = list(range(100, 110))  # 10 tokens: with blocks of 4, two full blocks and a partial one


def test_a_second_sequence_with_the_same_first_blocks_takes_them():
    bm = BlockManager(16, 4)
    first = _seq(PROMPT)
    bm.admit(first)
    assert first.block_table == [] and first.num_cached == 0  # nothing cached yet
    _computed(bm, first)
    assert len(first.block_table) == 3 and len(first.block_keys) == 2  # the partial block has no key
    second = _seq(PROMPT[:8] + [7, 7, 7])  # the same two first blocks, then other tokens
    bm.admit(second)
    assert second.block_table == first.block_table[:2] and second.num_cached == 8
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert bm.reserve(second, len(second.tokens))
    assert second.block_table[2] not in first.block_table  # its own block for what differs
    # A sequence whose tokens differ in the first block finds nothing, even if the second block matches.
    other = _seq([1] + PROMPT[1:])
    bm.admit(other)
    assert other.block_table == [] and other.num_cached == 0


def test_no_hit_across_adapter_fingerprints():
    """The key is the adapter's files, not its name: another version under the same name misses, the same
    files under another name hit."""
    bm = BlockManager(16, 4)
    tuned = _seq(PROMPT, fingerprint="f1", adapter="a")
    bm.admit(tuned)
    _computed(bm, tuned)
    for fingerprint, adapter in (("", ""), ("f2", "a")):
        miss = _seq(PROMPT, fingerprint=fingerprint, adapter=adapter)
        bm.admit(miss)
        assert miss.num_cached == 0 and miss.block_table == [], (fingerprint, adapter)
    same_files = _seq(PROMPT, fingerprint="f1", adapter="b")
    bm.admit(same_files)
    assert same_files.num_cached == 8


def test_the_last_token_is_always_left_to_compute():
    """A step must produce the logits the next token comes from: a prompt wholly in the cache still computes
    its last token, in the block after the cached prefix."""
    bm = BlockManager(16, 4)
    first = _seq(PROMPT[:8] + [1, 2, 3, 4])  # three full blocks
    bm.admit(first)
    _computed(bm, first)
    assert len(first.block_keys) == 3
    for n in (12, 9, 8, 5, 4, 1):
        again = _seq(first.tokens[:n])
        bm.admit(again)
        assert again.num_cached == (n - 1) // 4 * 4 < n, n
        assert len(again.pending()) >= 1
        bm.release(again)


def test_register_indexes_only_full_blocks_whose_step_is_back():
    bm = BlockManager(16, 4)
    seq = _seq(PROMPT)
    bm.admit(seq)
    assert bm.reserve(seq, 10)
    bm.register(seq)
    assert seq.block_keys == [] and not bm.index  # nothing computed yet (num_cached == 0)
    seq.num_cached = 6  # a chunk of 6 came back: one full block
    bm.register(seq)
    assert len(seq.block_keys) == 1 and bm.blocks[seq.block_table[0]].key == seq.block_keys[0]
    assert bm.blocks[seq.block_table[1]].key is None  # half filled
    seq.num_cached = 10
    bm.register(seq)
    assert len(seq.block_keys) == 2 and bm.blocks[seq.block_table[2]].key is None
    seq.tokens += [11, 12]  # two generated tokens fill the third block
    assert bm.reserve(seq, 12)
    seq.num_cached = 12
    bm.register(seq)
    assert len(seq.block_keys) == 3 and len(bm.index) == 3
    # With the prefix cache off nothing is ever indexed.
    off = BlockManager(16, 4, prefix_cache=False)
    seq = _seq(PROMPT)
    off.admit(seq)
    _computed(off, seq)
    assert seq.block_keys == [] and not off.index
    again = _seq(PROMPT)
    off.admit(again)
    assert again.num_cached == 0


def test_lru_eviction_takes_free_blocks_keyless_first_then_prefix_tails():
    bm = BlockManager(6, 4)
    a = _seq(PROMPT)  # blocks 0, 1 (keyed) and 2 (partial: no key)
    bm.admit(a)
    _computed(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.release(a)
    assert a.block_table == [] and a.num_cached == 0 and a.block_keys == []
    # The keyless block goes first, then blocks never used, then the prefix from its tail: its beginning
    # is what the next turn of a conversation (or any request with the same system prompt) needs most.
    assert list(bm.free) == [2, 3, 4, 5, 1, 0]
    assert bm.num_free == 6 and len(bm.index) == 2
    b = _seq([1] * 16)
    bm.admit(b)
    assert bm.reserve(b, 16) and b.block_table == [2, 3, 4, 5]
    c = _seq([2] * 3)
    bm.admit(c)
    assert bm.reserve(c, 3) and c.block_table == [1]  # the prefix's tail, evicted from the index
    assert len(bm.index) == 1
    again = _seq(PROMPT)
    bm.admit(again)
    assert again.block_table == [0] and again.num_cached == 4  # the prefix's first block is still there
    # Blocks somebody holds are never taken: none are free now, so nothing is taken at all.
    d = _seq([3] * 3)
    bm.admit(d)
    assert bm.num_free == 0 and not bm.reserve(d, 3) and d.block_table == []
    bm.release(c)
    assert bm.reserve(d, 3) and d.block_table == [1]


def test_a_shared_block_goes_back_only_when_its_last_holder_releases_it():
    bm = BlockManager(8, 4)
    a, b = _seq(PROMPT), _seq(PROMPT)
    bm.admit(a)
    _computed(bm, a)
    bm.admit(b)
    assert bm.reserve(b, 10)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    bm.release(a)
    assert all(bm.blocks[i].ref_count == 1 and i not in bm.free for i in shared)
    bm.release(b)
    assert all(bm.blocks[i].ref_count == 0 and i in bm.free for i in shared)
    assert bm.num_free == 8


def test_reset_forgets_every_holder_and_every_prefix():
    bm = BlockManager(8, 4)
    a = _seq(PROMPT)
    bm.admit(a)
    _computed(bm, a)
    bm.reset()
    assert bm.num_free == 8 and not bm.index and all(b.ref_count == 0 and b.key is None for b in bm.blocks)
    again = _seq(PROMPT)
    bm.admit(again)
    assert again.num_cached == 0


def test_usage_counts_each_sequence_once():
    bm = BlockManager(16, 4)
    a = _seq(PROMPT)
    bm.admit(a)
    bm.count_admitted(a)
    _computed(bm, a)
    b = _seq(PROMPT)
    bm.admit(b)
    bm.count_admitted(b)
    assert b.cached_tokens == 8 and a.cached_tokens == 0
    bm.release(b)
    bm.admit(b)  # preempted and back: not counted again
    bm.count_admitted(b)
    assert (bm.usage.prompt_tokens, bm.usage.hit_tokens) == (20, 8)
    stats = bm.stats(preemptions=3)
    assert stats.hit_rate == pytest.approx(0.4) and (stats.prompt_tokens, stats.hit_tokens) == (20, 8)
    assert (stats.capacity_tokens, stats.blocks_free + stats.blocks_used, stats.preemptions) == (64, 16, 3)
    bm.reset()  # a recovery empties the cache, not the counters
    assert bm.stats(0).hit_rate == pytest.approx(0.4)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


# ---------------------------------------------------------------------------------------------- scheduler


def _named(name: str, prompt_len: int, first: int) -> Sequence:
    return Sequence(name, list(range(first, first + prompt_len)), GenerationParams(max_new_tokens=64),
                    Detokenizer(None))


def _done(sched: Scheduler, rows: list[Row], token: int = 7) -> None:
    """The engine's postprocessing: rows cached, full blocks indexed, a token for each completed row."""
    complete = [r.seq for r in rows if r.completes]
    sched.done(rows)
    for seq in complete:
        seq.tokens.append(token)


def test_step_budget_takes_decodes_first_then_chunks_of_prompts():
    sched = Scheduler(4, BlockManager(64, 4), max_step_tokens=8)
    runners = [_named(f"d{i}", 2, 100 * i + 1) for i in range(3)]
    for seq in runners:
        sched.add(seq)
    _done(sched, sched.schedule())  # 6 prompt tokens in one step
    long = _named("long", 20, 500)
    sched.add(long)
    seen = []
    while long.num_cached < 20:
        rows = sched.schedule()
        assert sum(r.count for r in rows) <= 8
        assert [(r.seq, r.count) for r in rows[:3]] == [(s, 1) for s in runners]  # decodes first
        (row,) = rows[3:]
        assert row.seq is long
        seen.append((row.count, row.completes))
        _done(sched, rows)
    assert seen == [(5, False), (5, False), (5, False), (5, True)]
    assert len(long.tokens) == 21  # one token, from the last chunk only


def test_nothing_runs_past_max_batch():
    sched = Scheduler(2, BlockManager(64, 4), max_step_tokens=100)
    seqs = [_named(f"s{i}", 3, 100 * i + 1) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    finished = 0
    while len(sched):
        rows = sched.schedule()
        assert 0 < len(rows) <= 2 and len(sched.running) <= 2
        assert len({r.seq.slot for r in rows}) == len(rows)
        _done(sched, rows)
        for seq in [s for s in sched.running if s.num_generated >= 3]:
            sched.finish(seq)
            finished += 1
    assert finished == 5 and sched.slots.num_free == 2 and sched.blocks.num_free == 64


def test_the_newest_running_sequence_is_preempted_and_comes_back_first():
    """Blocks run out while both decode: the newer one goes back to the head of the queue without blocks or
    slot, keeping its tokens, and is prefilled again (prompt + generated) before anyone who came later."""
    sched = Scheduler(3, BlockManager(5, 4, prefix_cache=False), max_step_tokens=100)
    old, new = _named("old", 7, 1), _named("new", 7, 101)
    sched.add(old)
    sched.add(new)
    _done(sched, sched.schedule())  # 2 blocks each; 1 left
    _done(sched, sched.schedule())  # position 7 fits the second blocks
    rows = sched.schedule()  # position 8: old takes the last block, new needs one too
    assert [(r.seq, r.count) for r in rows] == [(old, 1)]
    assert sched.preemptions == 1
    assert new not in sched.running and list(sched.waiting) == [new]
    assert new.block_table == [] and new.slot is None and new.num_cached == 0
    assert new.tokens == list(range(101, 108)) + [7, 7]  # prompt + generated: nothing is lost
    later = _named("later", 2, 201)
    sched.add(later)
    _done(sched, rows)
    sched.finish(old)
    rows = sched.schedule()
    assert [(r.seq, r.count) for r in rows] == [(new, 9), (later, 2)]  # new first, all its tokens again
    assert all(r.completes for r in rows)


def test_preemption_skips_sequences_in_flight():
    sched = Scheduler(3, BlockManager(4, 4, prefix_cache=False), max_step_tokens=100)
    a, b = _named("a", 8, 1), _named("b", 8, 101)
    sched.add(a)
    sched.add(b)
    _done(sched, sched.schedule())  # every block taken
    b.in_flight = True  # its step is in the pipe: its blocks are in use
    assert sched.schedule() == []  # a needs a block; only a itself could go, which frees nothing for it
    assert sched.preemptions == 1 and list(sched.waiting) == [a] and b in sched.running


# ------------------------------------------------------------------------------------- engine, in process

MAX_NEW = 10
PROMPTS = [[5, 17, 300, 42, 7, 99, 3, 8, 250, 11, 12, 13, 14], [8, 1, 2, 3], [400, 401, 402, 403, 404, 405, 406],
           [77, 66, 55, 44, 33, 22, 11, 9, 8, 7, 6]]


def _ranges(model: Path, shards: int) -> list[tuple[int, int]]:
    config = AutoConfig.from_pretrained(model)
    return balanced_split(model_costs(config), shards)


class Harness:
    """An engine over in-process slices whose cache matches the engine's: blocks, block size, slots."""

    def __init__(self, model: Path, shards: int = 2, **config) -> None:
        config = {"max_batch": 4, "max_context": 64, "eos_ids": frozenset(), "num_blocks": 64, "block_size": 4,
                  **config}
        self.config = EngineConfig(**config)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        specs = [SliceSpec(model=str(model), first=a, end=b, device="cpu", max_slots=self.config.max_batch,
                           max_len=self.config.max_context, num_blocks=self.config.num_blocks,
                           block_size=self.config.block_size)
                 for a, b in _ranges(model, shards)]
        self.pipeline = LocalPipeline(specs)
        self.batches: list[StepBatch] = []
        self.recoveries = 0
        self.health: list[bool] = []
        step, recover = self.pipeline.step, self.pipeline.recover

        async def recording(batch: StepBatch) -> list[int]:
            self.batches.append(batch)
            return await step(batch)

        async def counted():
            self.recoveries += 1
            return await recover()

        self.pipeline.step, self.pipeline.recover = recording, counted

        async def on_health(serving: bool) -> None:
            self.health.append(serving)

        self.on_health = on_health
        self.engine: Engine | None = None

    def seq(self, rid: str, ids: list[int], max_new: int = MAX_NEW, sampling: SamplingParams | None = None
            ) -> Sequence:
        params = GenerationParams(max_new_tokens=max_new, ignore_eos=True, sampling=sampling or SamplingParams())
        return Sequence(rid, list(ids), params, Detokenizer(self.tokenizer, ()))

    async def start(self) -> None:
        self.engine = Engine(self.config)
        self.engine.health_changed.subscribe(self.on_health)
        self.engine.start(self.pipeline)

    async def stop(self) -> None:
        await self.engine.stop()
        await self.pipeline.close()

    async def run(self, seq: Sequence) -> list[int] | Exception:
        tokens: list[int] = []
        try:
            async for delta in self.engine.generate(seq):
                tokens += delta.token_ids
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return e
        return tokens


def _run(harness: Harness, scenario) -> object:
    async def main():
        await harness.start()
        try:
            return await scenario(harness)
        finally:
            await harness.stop()

    return asyncio.run(main())


ENGINE_MODELS = [("tiny_model", True), ("qwen3_model", True), ("qwen3_5_model", False)]


@pytest.mark.parametrize(("model_fixture", "prefix_cache"), ENGINE_MODELS,
                         ids=[m.removesuffix("_model") for m, _ in ENGINE_MODELS])
def test_a_conversation_run_twice_hits_the_prefix_cache_and_changes_nothing(request, reference, model_fixture,
                                                                            prefix_cache):
    """The same prompt twice, then the conversation's next turn (prompt + answer + more): greedy tokens are
    `generate()`'s every time, and the later runs take the cached blocks (Qwen3.5: its recurrent state is not
    in the blocks, so serve turns the prefix cache off; the engine runs it the same without one)."""
    model = request.getfixturevalue(model_fixture)
    prompt = PROMPTS[0]
    h = Harness(model, prefix_cache=prefix_cache)

    async def scenario(h: Harness):
        first = h.seq("first", prompt)
        got = [await h.run(first)]
        second = h.seq("second", prompt)
        got.append(await h.run(second))
        turn = prompt + got[0] + [21, 22, 23]
        third = h.seq("third", turn)
        got.append(await h.run(third))
        return got, [s.cached_tokens for s in (first, second, third)], turn

    (first, second, third), cached, turn = _run(h, scenario)
    assert first == reference(model, prompt, MAX_NEW)
    assert second == first
    assert third == reference(model, turn, MAX_NEW)
    if prefix_cache:
        # 13 prompt tokens in blocks of 4: 3 full blocks, all cached. The first run computed 22 positions
        # (13 + 10 generated, the last of which was never stepped): the next turn (26 tokens) finds its 5 full
        # blocks, prompt and most of the answer.
        assert cached == [0, 12, 20]
        assert h.engine.blocks.usage.hit_tokens == 32
    else:
        assert cached == [0, 0, 0]
    assert h.recoveries == 0 and h.health == []
    assert h.engine.blocks.num_free == h.config.num_blocks  # every block back (cached prefixes are free)


# Qwen3.5 too: a preempted or chunked sequence's recurrent state (per slot, not in blocks) must follow it.
POOL_MODELS = [("tiny_model", True), ("qwen3_5_model", False)]
POOL_IDS = [m.removesuffix("_model") for m, _ in POOL_MODELS]


@pytest.mark.parametrize(("model_fixture", "prefix_cache"), POOL_MODELS, ids=POOL_IDS)
def test_a_tiny_kv_pool_preempts_and_changes_no_token(request, reference, model_fixture, prefix_cache):
    """Four requests of up to 23 tokens each in 12 blocks of 4 (48 tokens): running sequences outgrow the pool,
    the newest are preempted and prefilled again later, and every output is still `generate()`'s."""
    model = request.getfixturevalue(model_fixture)
    h = Harness(model, num_blocks=12, max_context=32, prefix_cache=prefix_cache)

    async def scenario(h: Harness):
        return await asyncio.gather(*(h.run(h.seq(f"r{i}", p)) for i, p in enumerate(PROMPTS)))

    results = _run(h, scenario)
    assert results == [reference(model, p, MAX_NEW) for p in PROMPTS]
    assert h.engine.scheduler.preemptions > 0
    assert h.recoveries == 0
    assert all(max(max(t) for t in b.blocks) < 12 for b in h.batches)
    assert h.engine.blocks.num_free == 12


@pytest.mark.parametrize(("model_fixture", "prefix_cache"), POOL_MODELS, ids=POOL_IDS)
def test_chunked_prompts_change_no_token(request, reference, model_fixture, prefix_cache):
    """A step budget of 8 tokens with 4 running: prompts arrive in chunks beside the decodes."""
    model = request.getfixturevalue(model_fixture)
    h = Harness(model, max_step_tokens=8, prefix_cache=prefix_cache)

    async def scenario(h: Harness):
        return await asyncio.gather(*(h.run(h.seq(f"r{i}", p)) for i, p in enumerate(PROMPTS)))

    results = _run(h, scenario)
    assert results == [reference(model, p, MAX_NEW) for p in PROMPTS]
    assert all(b.num_tokens <= 8 for b in h.batches), [b.num_tokens for b in h.batches]
    chunks = [(s, t) for b in h.batches for s, t in zip(b.starts, b.token_ids, strict=True) if s > 0 and len(t) > 1]
    assert chunks, "no prompt was cut into chunks"  # the 13-token prompt cannot fit one step


def test_seeded_sampling_is_the_same_through_preemption_and_chunks(tiny_model):
    """A seeded draw depends on (seed, position) only: preempted, re-prefilled and chunked sequences draw the
    same tokens as with a pool and a budget that never preempt or chunk."""
    def sampled(**config) -> tuple[list, int, int]:
        h = Harness(tiny_model, max_context=32, **config)

        async def scenario(h: Harness):
            seqs = [h.seq(f"r{i}", p, sampling=SamplingParams(temperature=1.0, top_k=50, seed=100 + i))
                    for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*(h.run(s) for s in seqs))

        results = _run(h, scenario)
        chunked = sum(1 for b in h.batches for s, t in zip(b.starts, b.token_ids, strict=True) if s and len(t) > 1)
        return results, h.engine.scheduler.preemptions, chunked

    roomy, preempted, _ = sampled()
    assert preempted == 0
    tight, preempted, chunked = sampled(num_blocks=12, max_step_tokens=8, prefix_cache=False)
    assert preempted > 0 and chunked > 0
    assert tight == roomy
    assert len({tuple(r) for r in roomy}) == len(PROMPTS)  # real draws, not one degenerate answer


def test_concurrent_requests_share_a_cached_system_prompt(tiny_model, reference):
    """Requests with one long common beginning, four at a time, twice: the second wave's sequences all hold the
    same prefix blocks at once (2 steps in flight), and every output is `generate()`'s."""
    system = [300 + i for i in range(17)]
    prompts = [system + p[:3] for p in PROMPTS]
    h = Harness(tiny_model)

    async def scenario(h: Harness):
        waves = []
        for wave in range(2):
            seqs = [h.seq(f"w{wave}r{i}", p) for i, p in enumerate(prompts)]
            waves.append((await asyncio.gather(*(h.run(s) for s in seqs)), [s.cached_tokens for s in seqs]))
        return waves

    (first, _), (second, cached) = _run(h, scenario)
    expected = [reference(tiny_model, p, MAX_NEW) for p in prompts]
    assert first == expected and second == expected
    assert cached == [16] * 4  # the system prompt's 4 full blocks (the 5th holds each prompt's last token)

    def shares(batch: StepBatch) -> bool:
        prefixes = [tuple(t[:4]) for t in batch.blocks if len(t) >= 4]
        return len(set(prefixes)) < len(prefixes)

    assert any(shares(b) for b in h.batches), "no step had two rows reading the same blocks"


def test_cancelling_a_request_mid_prompt_frees_its_blocks_and_spares_its_neighbours(tiny_model, reference):
    """A long prompt arriving in chunks is cancelled between two of them, while a request sharing its first
    blocks decodes: the neighbour's output is `generate()`'s, and every block comes back."""
    system = [300 + i for i in range(16)]
    long_prompt = system + list(range(500, 540))  # 56 tokens: 7 steps of 8 at most
    short_prompt = system + [5, 6, 7]
    h = Harness(tiny_model, max_step_tokens=8, max_context=96)

    async def scenario(h: Harness):
        short = h.seq("short", short_prompt, max_new=20)
        done_short = asyncio.ensure_future(h.run(short))
        while short.num_generated < 2:  # the shared blocks are indexed, the short one decodes
            await asyncio.sleep(0.01)
        long = h.seq("long", long_prompt)
        task = asyncio.ensure_future(h.run(long))
        while long.num_cached < 24:  # the cached system prompt, then some chunks of its own
            await asyncio.sleep(0.001)
        assert long.num_generated == 0 and long.cached_tokens == 16
        task.cancel()
        result = await asyncio.gather(task, return_exceptions=True)
        return long, await done_short, result

    long, short_tokens, (cancelled,) = _run(h, scenario)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert long.block_table == [] and long.num_generated == 0
    assert short_tokens == reference(tiny_model, short_prompt, 20)
    assert h.engine.blocks.num_free == h.config.num_blocks and not h.engine.scheduler.running


def test_engine_refuses_a_pool_smaller_than_one_context_and_a_budget_of_one_decode_step():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        Engine(EngineConfig(max_batch=2, max_context=100, eos_ids=frozenset(), num_blocks=6, block_size=16))
    with pytest.raises(ValueError, match="must exceed"):
        Engine(EngineConfig(max_batch=8, max_context=64, eos_ids=frozenset(), max_step_tokens=8))
    Engine(EngineConfig(max_batch=2, max_context=96, eos_ids=frozenset(), num_blocks=6, block_size=16))


def test_a_failed_step_with_another_in_flight_fails_its_request_only(tiny_model, reference):
    """Issue #27, item 3: a step fails on slice 0 with an ordinary error while another request's step is on
    slice 1. The failed request ends with the error; the other completes with `generate()`'s tokens, with no
    recovery and no lost slice (a failed step used to leave releases that made the next step a false
    "slice lost"); a request after that is served as usual."""
    h = Harness(tiny_model)
    victim_prompt, other_prompt = PROMPTS[1], PROMPTS[2]
    runner0, runner1 = h.pipeline.runners
    other_on_slice1 = threading.Event()
    failed = threading.Event()
    step0, step1 = runner0.step, runner1.step

    victim_ids: set[int] = set()  # the requests' slots, known once the engine admits them
    other_ids: set[int] = set()

    def slice0(batch: StepBatch, hidden=None):
        rows = batch.slots
        if (not failed.is_set() and set(rows) & victim_ids and not set(rows) & other_ids
                and all(len(t) == 1 for t in batch.token_ids) and other_on_slice1.wait(0)):
            failed.set()
            raise RuntimeError("injected: slice 0 failed this step")
        return step0(batch, hidden)

    def slice1(batch: StepBatch, hidden=None):
        if set(batch.slots) & other_ids and not failed.is_set():
            other_on_slice1.set()
            try:
                time.sleep(0.2)  # hold the other request's step on slice 1 while slice 0 takes the next one
                return step1(batch, hidden)
            finally:
                other_on_slice1.clear()
        return step1(batch, hidden)

    runner0.step, runner1.step = slice0, slice1

    async def scenario(h: Harness):
        victim, other = h.seq("victim", victim_prompt, max_new=40), h.seq("other", other_prompt, max_new=40)
        tasks = [asyncio.ensure_future(h.run(victim)), asyncio.ensure_future(h.run(other))]
        while victim.slot is None or other.slot is None:
            await asyncio.sleep(0)
        victim_ids.add(victim.slot)
        other_ids.add(other.slot)
        results = await asyncio.gather(*tasks)
        after = await h.run(h.seq("after", PROMPTS[3]))
        return results, after

    (victim_result, other_result), after = _run(h, scenario)
    assert failed.is_set(), "the failure was never injected with the other request's step in flight"
    assert isinstance(victim_result, RuntimeError) and "injected" in str(victim_result)
    assert not isinstance(victim_result, SliceLost)
    assert other_result == reference(tiny_model, other_prompt, 40)
    assert after == reference(tiny_model, PROMPTS[3], MAX_NEW)
    assert h.recoveries == 0 and h.health == []  # no recovery, never NOT_SERVING
    assert h.engine.blocks.num_free == h.config.num_blocks


# ------------------------------------------------------------------------------------------- slice warm-up

WARMUP_POOLS = [(1, 64), (2, 1), (2, 2), (4, 1)]  # blocks of one position; one block of 2: both failed once


@pytest.mark.parametrize(("block_size", "num_blocks"), WARMUP_POOLS, ids=[f"{n}x{b}" for b, n in WARMUP_POOLS])
def test_a_slice_warms_up_with_any_pool_serve_accepts(tiny_model, block_size, num_blocks):
    """serve takes any --block-size >= 1 and sizes the pool (>= one context) from it: every slice must warm
    up on it (the static decode step too) and stay closed to steps until the gateway resets it."""
    from qwen_relay.shards.kv_cache import CacheMismatch
    from qwen_relay.shards.runner import SliceRunner

    runner = SliceRunner(SliceSpec(model=str(tiny_model), first=0, end=1, device="cpu", max_slots=2, max_len=4,
                                   num_blocks=num_blocks, block_size=block_size, decode="static"))
    runner.warmup()
    batch = StepBatch([0], [0], [[5]], [[0]], [SamplingParams()])
    with pytest.raises(CacheMismatch):
        runner.step(batch)  # warmed up, still shut
    runner.reset()
    assert runner.step(batch, None).shape[:2] == (1, 1)  # hidden states of the first slice


# ------------------------------------------------------------------------------------------ through gRPC


def test_a_repeated_prompt_reports_its_cached_tokens_over_grpc(client, tiny_model, reference):
    """The in-process relay (2 slices, blocks of 16): a prompt sent again is served from its cached blocks, says
    so in usage and GetModelInfo, and answers the same."""
    ids = [600 + (7 * i) % 300 for i in range(40)]  # 40 tokens no other test sends: 2 full blocks, then 8
    before = client.model_info()
    assert before.prefix_cache and before.kv_block_size == 16 and before.kv_capacity_tokens >= 512
    first = client.generate(prompt_token_ids=ids, max_new_tokens=6, ignore_eos=True)
    second = client.generate(prompt_token_ids=ids, max_new_tokens=6, ignore_eos=True)
    streamed = list(client.stream(prompt_token_ids=ids, max_new_tokens=6, ignore_eos=True))
    assert first.token_ids == second.token_ids == reference(tiny_model, ids, 6)
    assert (first.cached_prompt_tokens, second.cached_prompt_tokens) == (0, 32)
    assert [t for c in streamed for t in c.token_ids] == first.token_ids
    assert [c.cached_prompt_tokens for c in streamed if c.cached_prompt_tokens is not None][-1] == 32
    after = client.model_info()
    assert after.prefix_cache_hit_rate > 0  # since the relay started: other tests' requests count too
    assert after.kv_blocks_free * after.kv_block_size == after.kv_capacity_tokens  # nobody holds a block now
