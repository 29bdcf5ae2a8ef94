"""Fault injection in-process: the engine over `LocalPipeline`s that lose steps, fail to recover, lose adapters
or return garbage on cue. No Ray, no sleeps: every fault fires on a step count or a token, so each test is
deterministic and takes about a second. Outputs are compared with `generate()` (greedy, fp32): a fault may
cost time and fail the request it is about, never change another request's tokens."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_relay.server.detokenizer import Detokenizer
from qwen_relay.server.engine import AdapterLost, Engine, EngineConfig, ReplayLimit, Unavailable
from qwen_relay.server.pipeline import LocalPipeline, Recovery, SliceLost
from qwen_relay.server.sequence import GenerationParams, Sequence
from qwen_relay.shards.batch import StepBatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec

PROMPTS = [[5, 17, 300, 42, 7, 99], [8, 1, 2, 3], [400, 401, 402, 403, 404, 405, 406], [77, 66, 55, 44, 33]]
MAX_NEW = 12
POISON = 1000  # a prompt starting with this token "kills its slice" on every prefill


class FaultyPipeline(LocalPipeline):
    """A `LocalPipeline` whose steps are lost when `kill(step_index, batch)` says so. A lost step wipes every
    runner's cache first, as the restarted actor (and the engine's reset) would."""

    def __init__(self, specs: list[SliceSpec], kill: Callable[[int, StepBatch], bool] = lambda i, b: False) -> None:
        super().__init__(specs)
        # One step in the pipe, so step indices (which step is lost) do not depend on thread timing; steps lost
        # with several in flight: tests/test_pipelining.py and tests/test_faults.py.
        self.depth = 1
        self.kill = kill
        self.batches: list[StepBatch] = []
        self.lost = 0
        self.recover_failures: list[BaseException] = []  # raised by the next recover() attempts, in order

    async def step(self, batch: StepBatch) -> list[int]:
        self.batches.append(batch)
        if len(batch) and self.kill(len(self.batches) - 1, batch):
            self.lost += 1
            for runner in self.runners:
                runner.reset()
            raise SliceLost("injected: a slice died mid-step")
        return await super().step(batch)

    async def recover(self) -> Recovery:
        if self.recover_failures:
            raise self.recover_failures.pop(0)
        return await super().recover()

    def restart(self, index: int) -> None:
        """Stand in for Ray restarting slice `index`: a fresh runner from its spec alone (no adapters)."""
        runner = SliceRunner(self.runners[index].spec)
        runner.warmup()
        self.runners[index] = runner


def _rows(batch: StepBatch) -> list[tuple[int, list[int]]]:
    return list(zip(batch.starts, batch.token_ids, strict=True))


def _specs(model: Path) -> list[SliceSpec]:
    return [SliceSpec(model=str(model), first=a, end=b, device="cpu", max_slots=8, max_len=128)
            for a, b in [(0, 3), (3, 5)]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


class Harness:
    """An engine on a pipeline, recording health reports and adapters it gave up."""

    def __init__(self, pipeline, tokenizer, **config) -> None:
        self.health: list[bool] = []
        self.lost_adapters: list[str] = []
        self.serving = asyncio.Event()
        self.tokenizer = tokenizer

        async def on_health(serving: bool) -> None:
            self.health.append(serving)
            if serving:
                self.serving.set()
            else:
                self.serving.clear()

        config = {"max_batch": 8, "max_context": 128, "eos_ids": frozenset(), **config}
        self.engine = Engine(EngineConfig(**config))
        self.engine.health_changed.subscribe(on_health)
        self.engine.adapter_lost.subscribe(self.lost_adapters.append)
        self.engine.start(pipeline)

    def seq(self, rid: str, ids: list[int], adapter: str = "", max_new: int = MAX_NEW) -> Sequence:
        params = GenerationParams(max_new_tokens=max_new, ignore_eos=True, adapter=adapter)
        return Sequence(rid, ids, params, Detokenizer(self.tokenizer, ()))

    async def run(self, seq: Sequence, progress: Callable[[int], None] = lambda n: None) -> list[int] | Exception:
        tokens: list[int] = []
        try:
            async for delta in self.engine.generate(seq):
                tokens += delta.token_ids
                progress(len(tokens))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return e
        return tokens


def test_slice_lost_mid_decode_and_again_during_replay_loses_nothing(tiny_model, tokenizer, reference):
    """Step 6 (decoding) is lost, then step 7 (the first replay step) too. Every output is still exact, and
    every step, rebuilds included, obeys the step's token budget: a long history is rebuilt in chunks."""
    budget = 16
    pipeline = FaultyPipeline(_specs(tiny_model), kill=lambda i, batch: i in (6, 7))

    async def main():
        h = Harness(pipeline, tokenizer, max_step_tokens=budget)
        try:
            return await asyncio.gather(*(h.run(h.seq(f"r{i}", p)) for i, p in enumerate(PROMPTS))), h.health
        finally:
            await h.engine.stop()

    results, health = asyncio.run(main())
    assert results == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]
    assert pipeline.lost == 2
    assert health == [False, True, False, True]
    rebuilds = [b for b in pipeline.batches[8:] if any(s == 0 and len(t) > 1 for s, t in _rows(b))]
    assert len(rebuilds) >= 3  # ~48 tokens to rebuild: several steps, not one
    assert all(b.num_tokens <= budget for b in pipeline.batches), [(len(b), b.num_tokens) for b in pipeline.batches]


def test_poison_request_fails_after_bounded_replays_while_its_neighbours_complete(tiny_model, tokenizer, reference):
    def kill(i: int, batch: StepBatch) -> bool:
        return any(s == 0 and t[0] == POISON for s, t in _rows(batch))

    pipeline = FaultyPipeline(_specs(tiny_model), kill=kill)
    poison = [POISON, 3, 4, 5]

    async def main():
        h = Harness(pipeline, tokenizer, max_lost_steps=3)
        try:
            return await asyncio.gather(*(h.run(h.seq(f"r{i}", p)) for i, p in enumerate([*PROMPTS, poison])))
        finally:
            await h.engine.stop()

    *good, bad = asyncio.run(main())
    assert isinstance(bad, ReplayLimit) and "3 steps that lost a model slice" in str(bad)
    assert pipeline.lost == 3  # together twice, then alone once: neighbours are not lost with it a third time
    assert good == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]


def test_recover_raising_is_retried_with_backoff(tiny_model, tokenizer, reference):
    pipeline = FaultyPipeline(_specs(tiny_model), kill=lambda i, b: i == 3)
    pipeline.recover_failures = [RuntimeError("reset call failed"), SliceLost("slice 1 not answering yet")]

    async def main():
        h = Harness(pipeline, tokenizer)
        try:
            return await h.run(h.seq("r", PROMPTS[0])), h.health
        finally:
            await h.engine.stop()

    tokens, health = asyncio.run(main())
    assert tokens == reference(tiny_model, PROMPTS[0], MAX_NEW)
    assert pipeline.recover_failures == [] and health == [False, True]


def test_slices_not_back_in_time_fail_calls_unavailable_refuse_new_ones_then_serve_again(tiny_model, tokenizer):
    pipeline = FaultyPipeline(_specs(tiny_model), kill=lambda i, b: i == 2)

    async def main():
        back = asyncio.Event()
        original = pipeline.recover

        async def recover() -> Recovery:
            if not back.is_set():
                raise SliceLost("slice 1 not answering yet")
            return await original()

        pipeline.recover = recover
        h = Harness(pipeline, tokenizer, recovery_timeout=0.2)
        try:
            failed = await h.run(h.seq("a", PROMPTS[0]))
            refused = await h.run(h.seq("b", PROMPTS[1]))
            down = list(h.health)
            back.set()
            await asyncio.wait_for(h.serving.wait(), 30)
            again = await h.run(h.seq("c", PROMPTS[1], max_new=3))
            return failed, refused, down, again
        finally:
            await h.engine.stop()

    failed, refused, down, again = asyncio.run(main())
    assert isinstance(failed, Unavailable) and "did not come back within" in str(failed)
    assert isinstance(refused, Unavailable) and "being restored" in str(refused)
    assert down == [False]
    assert len(again) == 3


def test_a_dead_engine_loop_fails_its_requests_reports_not_serving_and_restarts(tiny_model, tokenizer, reference):
    """A pipeline answering with the wrong number of tokens breaks the loop outside any per-step guard."""

    class Garbling(FaultyPipeline):
        garble_at = 3

        async def step(self, batch: StepBatch) -> list[int]:
            tokens = await super().step(batch)
            return tokens + [1] if len(self.batches) - 1 == self.garble_at else tokens

    pipeline = Garbling(_specs(tiny_model))

    async def main():
        h = Harness(pipeline, tokenizer)
        try:
            died = await h.run(h.seq("a", PROMPTS[0]))
            await asyncio.wait_for(h.serving.wait(), 30)
            after = await h.run(h.seq("b", PROMPTS[1]))
            return died, after, h.health
        finally:
            await h.engine.stop()

    died, after, health = asyncio.run(main())
    assert isinstance(died, Unavailable) and "engine failed (ValueError)" in str(died)
    assert health == [False, True]
    assert after == reference(tiny_model, PROMPTS[1], MAX_NEW)


def _save_adapter(model: Path, folder: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change", ["deleted", "retrained-in-place"])
def test_adapter_that_cannot_be_restored_fails_its_requests_only(tiny_model, tokenizer, reference, tmp_path,
                                                                  change):
    """The adapter folder is deleted (or retrained in place), then slice 1 restarts mid-generation. The
    adapter's request fails AdapterLost at once; the base request beside it completes exactly; the adapter is
    unloaded everywhere and reported; health comes back."""
    folder = _save_adapter(tiny_model, tmp_path / "v1.2", seed=1)

    def kill(i: int, batch: StepBatch) -> bool:
        if i != 4:
            return False
        if change == "deleted":
            shutil.rmtree(folder)
        else:
            _save_adapter(tiny_model, folder, seed=2)
        pipeline.restart(1)
        return True

    pipeline = FaultyPipeline(_specs(tiny_model), kill=kill)

    async def main():
        h = Harness(pipeline, tokenizer)
        registry = _registry(tiny_model, h.engine, tmp_path)  # subscribed to the engine's adapter_lost
        await registry.load("v1.2", str(folder))
        try:
            results = await asyncio.gather(h.run(h.seq("lora", PROMPTS[0], adapter="v1.2")),
                                           h.run(h.seq("base", PROMPTS[1])))
            return results, h, "v1.2" in registry
        finally:
            await h.engine.stop()

    (lora, base), h, still_listed = asyncio.run(main())
    assert not still_listed
    assert isinstance(lora, AdapterLost) and "'v1.2' was unloaded" in str(lora)
    assert ("changed since the gateway loaded it" in str(lora)) == (change == "retrained-in-place")
    assert base == reference(tiny_model, PROMPTS[1], MAX_NEW)
    assert h.lost_adapters == ["v1.2"] and pipeline.adapters.sources == {}
    assert all("v1.2" not in r.adapters.held for r in pipeline.runners)
    assert h.health == [False, True] and pipeline.lost == 1


def test_unload_failing_half_way_leaves_nothing_served_and_the_name_reusable(tiny_model, tmp_path):
    from qwen_relay.server.adapters import AdapterPolicy, AdapterRegistry
    from qwen_relay.shards.loader import load_config

    folder = _save_adapter(tiny_model, tmp_path / "a", seed=1)
    pipeline = FaultyPipeline(_specs(tiny_model))
    broken = pipeline.runners[1]

    def fail(name: str) -> None:
        raise RuntimeError("injected: unload failed")

    async def main():
        engine = Engine(EngineConfig(max_batch=2, max_context=64, eos_ids=frozenset()))
        engine.start(pipeline)
        registry = AdapterRegistry(load_config(tiny_model), str(tiny_model), engine,
                                   AdapterPolicy(roots=(str(tmp_path),)))
        try:
            await registry.load("a", str(folder))
            broken.unload_adapter = fail
            await registry.unload("a")  # slice 0 dropped it, slice 1 raised
            held = [set(r.adapters.held) for r in pipeline.runners]
            state = ("a" in registry, dict(pipeline.adapters.sources), held)
            del broken.unload_adapter
            await registry.load("a", str(folder))  # the leftover on slice 1 is replaced, not refused
            return state, "a" in registry
        finally:
            await engine.stop()

    (served, remembered, held), reloaded = asyncio.run(main())
    assert not served and remembered == {} and held == [set(), {"a"}]
    assert reloaded


def test_a_slice_failing_during_load_adapter_leaves_it_nowhere(tiny_model, tmp_path):
    folder = _save_adapter(tiny_model, tmp_path / "a", seed=1)
    pipeline = FaultyPipeline(_specs(tiny_model))

    def fail(name: str, path: str, fingerprint: str = "") -> dict:
        raise RuntimeError("injected: the slice failed")

    pipeline.runners[1].load_adapter = fail
    from qwen_relay.shards.adapters import fingerprint

    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(pipeline.load_adapter("a", str(folder), fingerprint(folder)))
    assert pipeline.adapters.sources == {} and not pipeline.runners[0].adapters.held


# ------------------------------------------------------- RayPipeline's recovery logic, with stand-in actors


class _Method:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class FakeActor:
    """Answers like a SliceActor; `dead` makes every call raise what Ray raises for a dead actor."""

    def __init__(self, index: int) -> None:
        import ray

        self.index, self.dead, self.held, self.resets = index, False, {}, 0
        self.error = ray.exceptions.ActorDiedError

        def guard(fn):
            def call(*args):
                if self.dead:
                    raise self.error()
                return fn(*args)

            return _Method(call)

        self.load_adapter = guard(lambda name, path, fp: self.held.setdefault(name, fp))
        self.unload_adapter = guard(lambda name: self.held.pop(name, None))
        self.reset = guard(self._reset)
        self.stats = guard(self._stats)

    def _reset(self) -> None:
        self.resets += 1

    def _stats(self):
        from qwen_relay.shards.stats import SliceStats

        return SliceStats(first=self.index, end=self.index + 1, has_embeddings=False, has_lm_head=False,
                          incarnation="x")


def _ray_pipeline(n: int = 2):
    """No step has run: there is no compiled graph to tear down."""
    from qwen_relay.server.ray_pipeline import RayPipeline

    actors = [FakeActor(i) for i in range(n)]
    return RayPipeline([SliceSpec(model="m", first=i, end=i + 1) for i in range(n)], actors, None,
                       [a._stats() for a in actors], use_gpu=False)


def test_ray_slice_dying_during_load_adapter_is_unavailable_and_leaves_it_nowhere():
    pipeline = _ray_pipeline()
    pipeline.actors[1].dead = True
    with pytest.raises(SliceLost, match="slice 1 died while loading adapter 'a'"):
        asyncio.run(pipeline.load_adapter("a", "/x", "f"))
    assert pipeline.adapters.sources == {} and pipeline.actors[0].held == {}


def test_ray_recover_waits_for_dead_slices_and_reports_adapters_it_cannot_restore():
    pipeline = _ray_pipeline()
    asyncio.run(pipeline.load_adapter("a", "/x", "f"))
    asyncio.run(pipeline.load_adapter("b", "/y", "g"))
    pipeline.actors[1].dead = True
    with pytest.raises(SliceLost, match="slice\\(s\\) 1 not answering"):
        asyncio.run(pipeline.recover())
    pipeline.actors[1] = restarted = FakeActor(1)  # Ray brought it back, without adapters

    def refuse_b(name, path, fp):
        if name == "b":
            raise ValueError("path: /y is not a PEFT adapter folder")
        restarted.held[name] = fp

    restarted.load_adapter = _Method(refuse_b)
    recovery = asyncio.run(pipeline.recover())
    assert recovery.lost_adapters == {"b": "path: /y is not a PEFT adapter folder"}
    assert set(pipeline.adapters.sources) == {"a"}
    assert restarted.held == {"a": "f"} and pipeline.actors[0].held == {"a": "f"}
    assert pipeline.actors[0].resets == restarted.resets == 1


def test_ray_recover_raises_slice_lost_if_a_slice_dies_during_it():
    pipeline = _ray_pipeline()
    pipeline.actors[0].reset = _Method(lambda: (_ for _ in ()).throw(pipeline.actors[0].error()))
    with pytest.raises(SliceLost, match="died during recovery"):
        asyncio.run(pipeline.recover())


# -------------------------------------------------------------------------------------------- shutdown


def test_drain_ends_running_and_queued_requests_unavailable(tiny_model, tokenizer):
    class Stuck(LocalPipeline):
        """Steps never finish: the requests are still running or queued when the grace period ends."""

        async def step(self, batch: StepBatch) -> list[int]:
            await asyncio.Event().wait()

    async def main():
        h = Harness(Stuck(_specs(tiny_model)), tokenizer, max_batch=1)
        calls = [asyncio.ensure_future(h.run(h.seq(f"r{i}", PROMPTS[i]))) for i in range(2)]
        while len(h.engine.scheduler.running) + len(h.engine.scheduler.waiting) < 2:
            await asyncio.sleep(0)
        await h.engine.drain(0)
        refused = await h.run(h.seq("late", PROMPTS[0]))
        await h.engine.stop()
        return await asyncio.gather(*calls), refused

    (running, queued), refused = asyncio.run(main())
    for error in (running, queued, refused):
        assert isinstance(error, Unavailable) and "shutting down" in str(error)


# ------------------------------------------------------------------- adapters unloaded under load (#27 item 2)


def _registry(tiny_model, engine: Engine, root: Path):
    from qwen_relay.server.adapters import AdapterPolicy, AdapterRegistry
    from qwen_relay.shards.loader import load_config

    return AdapterRegistry(load_config(tiny_model), str(tiny_model), engine, AdapterPolicy(roots=(str(root),)))


def test_an_adapter_unloaded_between_validation_and_admission_fails_that_request_alone(tiny_model, tokenizer,
                                                                                     reference, tmp_path):
    """The request passed validation (`prepare`: the adapter was loaded), then the adapter was unloaded before
    the request reached the engine. It fails FAILED_PRECONDITION (AdapterLost) alone; no slice is lost, health
    never flips, the base requests under way complete exactly."""
    from qwen_relay.server.request import GenerationRequest
    from qwen_relay.server.validation import Limits, prepare

    folder = _save_adapter(tiny_model, tmp_path / "a", seed=1)
    pipeline = FaultyPipeline(_specs(tiny_model))
    limits = Limits(vocab_size=tokenizer.vocab_size, max_context=128)

    async def main():
        h = Harness(pipeline, tokenizer)
        registry = _registry(tiny_model, h.engine, tmp_path)
        try:
            await registry.load("a", str(folder))
            base = [asyncio.ensure_future(h.run(h.seq(f"base{i}", p))) for i, p in enumerate(PROMPTS[:2])]
            request = GenerationRequest(prompt_token_ids=tuple(PROMPTS[2]), adapter="a", max_new_tokens=4)
            seq = prepare(request, tokenizer, limits, registry.fingerprints())  # validated: "a" is loaded
            await registry.unload("a")  # nobody waits or runs with it yet: allowed
            late = await h.run(seq)
            return late, await asyncio.gather(*base), h.health
        finally:
            await h.engine.stop()

    late, base, health = asyncio.run(main())
    assert isinstance(late, AdapterLost) and "'a' was unloaded" in str(late), repr(late)
    assert base == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS[:2]]
    assert health == [] and pipeline.lost == 0


def test_a_step_naming_an_adapter_no_longer_served_is_refused_before_any_slice(tiny_model, tokenizer, reference,
                                                                              tmp_path):
    """Past the registry's in-use check (the pipeline unloads the adapter under a running request): the next step
    is refused before any slice runs, so the request naming it fails AdapterLost alone, its neighbours complete
    exactly, and no slice is taken for lost (no recovery, health never flips)."""
    from qwen_relay.shards.adapters import fingerprint

    folder = _save_adapter(tiny_model, tmp_path / "a", seed=1)
    pipeline = FaultyPipeline(_specs(tiny_model))

    async def main():
        await pipeline.load_adapter("a", str(folder), fingerprint(folder))
        h = Harness(pipeline, tokenizer)

        def unload_at(n: int) -> None:
            if n == 3:
                asyncio.ensure_future(pipeline.unload_adapter("a"))

        try:
            results = await asyncio.gather(h.run(h.seq("lora", PROMPTS[0], adapter="a"), unload_at),
                                           *(h.run(h.seq(f"base{i}", p)) for i, p in enumerate(PROMPTS[1:3])))
            return results, h.health
        finally:
            await h.engine.stop()

    (lora, *base), health = asyncio.run(main())
    assert isinstance(lora, AdapterLost) and "'a' was unloaded" in str(lora), repr(lora)
    assert base == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS[1:3]]
    assert health == [] and pipeline.lost == 0


def test_local_recovery_waits_for_a_step_still_running_in_a_slice_thread(tiny_model):
    """The engine loop died and cancelled its steps, but a slice thread is still inside one (a thread cannot be
    cancelled). Recovery must not reset that slice until the step is out: the replay that follows the reset
    writes the same blocks, and a late write of the old step after it would corrupt them."""
    import threading

    from qwen_relay.shards.batch import SamplingParams

    pipeline = LocalPipeline(_specs(tiny_model))
    runner = pipeline.runners[0]
    entered, go = threading.Event(), threading.Event()
    real_step = runner.step
    order: list[str] = []

    def held_step(batch, hidden=None):
        entered.set()
        go.wait(30)
        out = real_step(batch, hidden)
        order.append("step")
        return out

    real_reset = runner.reset

    def recorded_reset():
        real_reset()
        order.append("reset")

    runner.step, runner.reset = held_step, recorded_reset
    batch = StepBatch(slots=[0], starts=[0], token_ids=[PROMPTS[0]], blocks=[[0]], sampling=[SamplingParams()])

    async def main():
        step = asyncio.ensure_future(pipeline.step(batch))
        await asyncio.to_thread(entered.wait, 30)
        step.cancel()  # as the dying loop does; the slice thread goes on
        recovery = asyncio.ensure_future(pipeline.recover())
        await asyncio.wait({recovery}, timeout=0.5)  # before the fix: done here, the step not yet out
        held = not recovery.done()
        go.set()
        await recovery
        await pipeline.close()
        return held

    assert asyncio.run(main())  # recovery waited for the step
    assert order == ["step", "reset"]


def test_an_adapter_unloaded_while_a_recovery_restores_it_is_left_on_no_slice():
    """UnloadAdapter may run while the engine recovers: a restore that was loading the adapter again when it was
    unloaded must not leave it on the slices (weights nobody lists or frees)."""
    pipeline = _ray_pipeline()
    asyncio.run(pipeline.load_adapter("a", "/x", "f"))

    async def main():
        gate, waiting = asyncio.Event(), []
        for actor in pipeline.actors:
            load = actor.load_adapter.fn

            class Gated:
                def remote(self, *args, load=load):
                    async def call():
                        waiting.append(args)
                        await gate.wait()
                        return load(*args)

                    return call()

            actor.load_adapter = Gated()
        recovery = asyncio.ensure_future(pipeline.recover())
        while len(waiting) < len(pipeline.actors):  # the restore is loading "a" again on every slice
            await asyncio.sleep(0)
        await pipeline.unload_adapter("a")
        gate.set()
        return await recovery

    recovery = asyncio.run(main())
    assert recovery.lost_adapters == {}
    assert "a" not in pipeline.adapters and [a.held for a in pipeline.actors] == [{}, {}]


def test_an_adapter_loaded_and_unloaded_under_load_never_flips_health(tiny_model, tokenizer, reference, tmp_path):
    """Requests naming an adapter arrive while it is unloaded and loaded again, at every point of their way
    (before validation, between validation and admission, waiting, running). Each ends in its tokens or in
    NOT_FOUND (validation) / FAILED_PRECONDITION (AdapterLost); unloads in use are refused; no slice is ever
    taken for lost and health never flips; the base requests beside them complete exactly."""
    from qwen_relay.server.adapters import AdapterInUse
    from qwen_relay.server.request import GenerationRequest
    from qwen_relay.server.validation import Limits, UnknownAdapter, prepare

    folder = _save_adapter(tiny_model, tmp_path / "a", seed=1)
    pipeline = FaultyPipeline(_specs(tiny_model))
    limits = Limits(vocab_size=tokenizer.vocab_size, max_context=128)

    async def main():
        h = Harness(pipeline, tokenizer)
        registry = _registry(tiny_model, h.engine, tmp_path)
        outcomes: list[str] = []

        async def lora_request(delay: int) -> None:
            for _ in range(delay // 2):
                await asyncio.sleep(0)
            request = GenerationRequest(prompt_token_ids=tuple(PROMPTS[3]), adapter="a", max_new_tokens=3)
            try:
                seq = prepare(request, tokenizer, limits, registry.fingerprints())
            except UnknownAdapter:
                outcomes.append("NOT_FOUND")
                return
            for _ in range(delay % 2 * 2):  # validated; reaches the engine a little later
                await asyncio.sleep(0)
            result = await h.run(seq)
            outcomes.append("OK" if isinstance(result, list) and len(result) == 3 else
                            "FAILED_PRECONDITION" if isinstance(result, AdapterLost) else repr(result))

        async def churn() -> list[asyncio.Future]:
            requests = []
            for round_ in range(6):
                await registry.load("a", str(folder))
                # Odd rounds: every request is validated a tick or two before the engine admits it, so the unload
                # below finds none waiting or running while some are on their way.
                delays = range(8) if round_ % 2 == 0 else range(1, 8, 2)
                requests += [asyncio.ensure_future(lora_request(d)) for d in delays]
                for _ in range(2):
                    await asyncio.sleep(0)
                try:
                    await registry.unload("a")
                except AdapterInUse:
                    outcomes.append("in use")
                    while h.engine.adapter_users("a"):
                        await asyncio.sleep(0.01)
                    await registry.unload("a")
            return requests

        try:
            base = [asyncio.ensure_future(h.run(h.seq(f"base{i}", p))) for i, p in enumerate(PROMPTS[:2])]
            await asyncio.gather(*await churn())
            return outcomes, await asyncio.gather(*base), h.health
        finally:
            await h.engine.stop()

    outcomes, base, health = asyncio.run(main())
    assert set(outcomes) == {"OK", "NOT_FOUND", "FAILED_PRECONDITION", "in use"}, outcomes  # every way was taken
    assert base == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS[:2]]
    assert health == [] and pipeline.lost == 0
