"""Several step batches in flight through the slices, driven straight at a pipeline as the engine drives it.

The running sequences are split into `in_flight` groups, each stepping on its own (a sequence's next token
needs its last), so up to `in_flight` steps are outstanding at once. Every group must get `generate()`'s
tokens: a batch overtaking another at any slice would write a cache out of order and change them. Each slot
has its own blocks (tests/kv_blocks.py), as the gateway's BlockManager would give it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from kv_blocks import blocks_needed, own_blocks

from qwen_relay.server.pipeline import LocalPipeline, SliceLost
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.runner import SliceSpec

SPLITS = {1: [(0, 5)], 2: [(0, 3), (3, 5)], 3: [(0, 2), (2, 4), (4, 5)], 4: [(0, 2), (2, 3), (3, 4), (4, 5)]}

PROMPTS = [[5, 17, 300, 42, 7, 999, 3], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410],
           [9], [250, 7, 250, 7, 250], [1000, 2, 3, 4]]
NEW = [9, 6, 8, 5, 7, 9]
MAX_LEN = 128
BLOCK_SIZE = 8
REPLAY_BASE = blocks_needed(MAX_LEN, BLOCK_SIZE)  # a replay's blocks: none the first run used


@dataclass
class Seq:
    """What the engine keeps per sequence: its slot, prompt, generated tokens, what the slices hold and where
    (its blocks start at `base`)."""

    slot: int
    prompt: list[int]
    max_new: int
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    base: int = 0

    def blocks(self) -> list[int]:
        """Blocks for every position up to the end of its next step."""
        return own_blocks(self.slot, len(self.prompt) + len(self.generated), BLOCK_SIZE, self.base)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new

    def pending(self) -> list[int]:
        return (self.prompt + self.generated)[self.cached:]

async def _recovered(pipeline, timeout: float = 120.0) -> None:
    """Retry `recover` (one attempt each; it raises SliceLost while a slice is down) until it succeeds."""
    from qwen_relay.server.pipeline import SliceLost

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await pipeline.recover()
            return
        except SliceLost:
            assert loop.time() < deadline, "the slices did not come back"
            await asyncio.sleep(0.2)



def make_seqs() -> list[Seq]:
    return [Seq(slot, list(p), n) for slot, (p, n) in enumerate(zip(PROMPTS, NEW, strict=True))]


def groups(seqs: list[Seq], in_flight: int) -> list[list[Seq]]:
    return [seqs[i::in_flight] for i in range(in_flight)]


async def step(pipeline, group: list[Seq]) -> None:
    """One step of a group's unfinished sequences (a finished one needs no message: the slices keep nothing
    per sequence for attention)."""
    active = [s for s in group if not s.done]
    if not active:
        return
    tokens = await pipeline.step(_batch(group))
    assert len(tokens) == len(active)
    for s, token in zip(active, tokens, strict=True):
        s.cached = len(s.prompt) + len(s.generated)
        s.generated.append(token)


async def run_group(pipeline, group: list[Seq]) -> None:
    while not all(s.done for s in group):
        await step(pipeline, group)


async def decode(pipeline, seqs: list[Seq], in_flight: int) -> None:
    await asyncio.gather(*(run_group(pipeline, g) for g in groups(seqs, in_flight)))


def specs(model, shards: int) -> list[SliceSpec]:
    return [SliceSpec(model=str(model), first=a, end=b, max_slots=8, max_len=MAX_LEN, num_blocks=2 * REPLAY_BASE,
                      block_size=BLOCK_SIZE, threads=1)
            for a, b in SPLITS[shards]]


def check(model, reference, seqs: list[Seq]) -> None:
    for s in seqs:
        assert s.generated == reference(model, s.prompt, s.max_new), f"slot {s.slot}"


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_local_pipeline_keeps_order_with_batches_in_flight(tiny_model, reference, shards):
    pipeline = LocalPipeline(specs(tiny_model, shards))
    try:
        for in_flight in sorted({1, pipeline.depth}):
            seqs = make_seqs()
            asyncio.run(decode(pipeline, seqs, in_flight))
            check(tiny_model, reference, seqs)
            assert all(r.cache.live and r.stats().healthy for r in pipeline.runners)
    finally:
        asyncio.run(pipeline.close())


# ------------------------------------------------------------------------------------------------ Ray


# The untied checkpoint in several safetensors files (its LM head is the last slice's own tensor): the in-process
# tier serves it in every split, these tests on Ray actors.
@pytest.fixture(scope="module")
def ray_pipelines(ray_session, loop_thread) -> Iterator[dict]:
    """The RayPipelines of this module by number of slices, closed at its end. Each slice actor costs seconds of
    CPU to start (it imports torch and transformers), so the fault tests go on with the parity tests'
    pipelines, restarted slices and all."""
    made: dict = {}
    yield made
    for pipeline in made.values():
        loop_thread.run(pipeline.close())


@pytest.fixture
def ray_pipeline(ray_pipelines, loop_thread, untied_model):
    """`ray_pipeline(shards)`: a RayPipeline over compiled graphs. A graph's slices poll their shared-memory
    channels while it idles, a core each, taking the CPU from whatever else runs on the machine: the graph
    is torn down after each test, and the next test's first step builds a new one. Not by the idle timer
    (its default 10 s could run out while a loaded machine computes a reference), unless a test says so."""
    from qwen_relay.server.ray_pipeline import RayPipeline

    def get(shards: int) -> RayPipeline:
        if shards not in ray_pipelines:
            ray_pipelines[shards] = loop_thread.run(RayPipeline.start(
                specs(untied_model, shards), use_gpu=False, transport="compiled", load_timeout=300,
                idle_teardown=0))
        return ray_pipelines[shards]

    yield get
    for pipeline in ray_pipelines.values():
        loop_thread.run(pipeline.drop_transport())


def _restarts(pipeline, loop_thread) -> list[int]:
    return [s.restarts for s in loop_thread.run(pipeline.stats())]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def _pid(pipeline, index: int) -> int:
    import ray

    return ray.get(pipeline.actors[index].stats.remote(), timeout=60).pid


# Actor calls (the CPU default) with 2 steps in flight: the shared 2-slice Ray relay (tests/test_parity.py).
@pytest.mark.slow
@pytest.mark.parametrize("shards", [2, 3])
def test_ray_pipeline_parity_with_batches_in_flight(ray_pipeline, loop_thread, untied_model, reference, shards):
    pipeline = ray_pipeline(shards)
    for in_flight in sorted({1, 2, pipeline.depth}):
        seqs = make_seqs()
        loop_thread.run(decode(pipeline, seqs, in_flight))
        check(untied_model, reference, seqs)
    assert pipeline.transport.name == "compiled graph"
    stats = loop_thread.run(pipeline.stats())  # answered while the graph's loops occupy the actors
    assert all(s.healthy for s in stats)


@pytest.mark.slow
def test_slice_killed_with_two_batches_in_flight_replays_exactly(ray_pipeline, loop_thread, untied_model, reference):
    pipeline = ray_pipeline(2)
    seqs = make_seqs()
    a, b = groups(seqs, 2)

    async def two_steps() -> None:
        await asyncio.gather(step(pipeline, a), step(pipeline, b))

    for _ in range(3):
        loop_thread.run(two_steps())
    restarts = _restarts(pipeline, loop_thread)
    graph = pipeline.transport
    pid = _pid(pipeline, 1)
    os.kill(pid, signal.SIGSTOP)  # both steps stay in the graph until the slice dies

    async def lost_in_flight() -> list[BaseException | None]:
        tasks = [asyncio.ensure_future(pipeline.step(_batch(g))) for g in (a, b)]
        await asyncio.sleep(0)  # both submitted
        assert not any(t.done() for t in tasks)
        os.kill(pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    results = loop_thread.run(lost_in_flight())
    assert [type(r) for r in results] == [SliceLost, SliceLost]
    loop_thread.run(_recovered(pipeline))
    assert pipeline.transport is None and graph.broken.is_set()  # torn down; the next step builds a new one
    replay(seqs)
    loop_thread.run(decode(pipeline, seqs, 2))
    check(untied_model, reference, seqs)
    assert pipeline.transport is not graph and pipeline.transport.name == "compiled graph"  # rebuilt
    assert _restarts(pipeline, loop_thread) == [restarts[0], restarts[1] + 1]


def replay(seqs: list[Seq]) -> None:
    """After `recover` the gateway has forgotten every block: each unfinished sequence prefills prompt +
    generated so far into new blocks."""
    for s in seqs:
        if not s.done:
            s.cached = 0
            s.base = REPLAY_BASE if s.base == 0 else 0


def _batch(group: list[Seq]) -> StepBatch:
    active = [s for s in group if not s.done]
    return StepBatch(slots=[s.slot for s in active], starts=[s.cached for s in active],
                     token_ids=[s.pending() for s in active], blocks=[s.blocks() for s in active],
                     sampling=[SamplingParams()] * len(active))


@pytest.mark.slow
def test_graph_is_torn_down_and_rebuilt_when_an_idle_slice_restarts(ray_pipeline, loop_thread, untied_model,
                                                                      reference):
    pipeline = ray_pipeline(3)
    restarts = _restarts(pipeline, loop_thread)
    seqs = make_seqs()
    loop_thread.run(step(pipeline, seqs))
    graph = pipeline.transport
    pid = _pid(pipeline, 0)
    os.kill(pid, signal.SIGKILL)  # between steps: the graph's loops wait on their inputs
    deadline = time.monotonic() + 60
    while _alive(pid):  # dead before the next step is sent (a kill is not synchronous)
        assert time.monotonic() < deadline, "the killed slice's process did not go away"
        time.sleep(0.05)
    with pytest.raises(SliceLost):
        loop_thread.run(asyncio.wait_for(step(pipeline, seqs), 60))
    assert graph.broken.is_set()
    loop_thread.run(_recovered(pipeline))
    assert graph.dag.is_teardown and pipeline.transport is None
    replay(seqs)
    loop_thread.run(decode(pipeline, seqs, 3))
    check(untied_model, reference, seqs)
    assert pipeline.transport is not graph and pipeline.transport.name == "compiled graph"
    assert _restarts(pipeline, loop_thread) == [restarts[0] + 1, *restarts[1:]]


@pytest.mark.slow
def test_an_idle_graph_is_torn_down_and_the_next_step_builds_it_again(ray_pipeline, loop_thread, untied_model,
                                                                      reference, monkeypatch):
    """Between steps a compiled graph's slice loops poll their channels, a core each: after `idle_teardown`
    seconds without a step the pipeline lets the graph go, and the slices go quiet."""
    import psutil

    pipeline = ray_pipeline(2)
    monkeypatch.setattr(pipeline, "idle_teardown", 0.5)  # the module's other tests keep their graphs
    seqs = make_seqs()

    async def first_step():  # the graph, read before the loop can run the idle timer
        await step(pipeline, seqs)
        return pipeline.transport

    graph = loop_thread.run(first_step())
    assert graph.name == "compiled graph"
    deadline = time.monotonic() + 30
    while pipeline.transport is not None:
        assert time.monotonic() < deadline, "the idle graph was not torn down"
        time.sleep(0.1)
    loop_thread.run(pipeline.drop_transport())  # waits for the teardown to end
    assert graph.dag.is_teardown
    slices = [psutil.Process(_pid(pipeline, i)) for i in range(2)]
    before = [sum(p.cpu_times()[:2]) for p in slices]
    time.sleep(2)
    used = sum(sum(p.cpu_times()[:2]) - b for p, b in zip(slices, before, strict=True))
    assert used < 0.5, f"idle slices used {used:.2f} CPU-s in 2 s"  # polling: ~0.8 each (serve, 2 cores)
    monkeypatch.setattr(pipeline, "idle_teardown", 0.0)  # kept while the reference is computed below
    loop_thread.run(decode(pipeline, seqs, 2))  # the same sequences go on over a new graph
    check(untied_model, reference, seqs)
    assert pipeline.transport is not graph and pipeline.transport.name == "compiled graph"


@pytest.mark.slow
def test_a_slice_that_dies_while_no_graph_stands_is_a_lost_step(ray_pipeline, loop_thread, untied_model, reference):
    """Idle, the graph is gone: a slice dying then fails the next step's graph build, which must be `SliceLost`
    (recovery and replay), not Ray's actor error (the step's requests failed) or a fallback to actor calls."""
    pipeline = ray_pipeline(2)
    restarts = _restarts(pipeline, loop_thread)
    seqs = make_seqs()
    loop_thread.run(step(pipeline, seqs))
    loop_thread.run(pipeline.drop_transport())  # as after --graph-idle-teardown seconds without a step
    pid = _pid(pipeline, 0)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, "the killed slice's process did not go away"
        time.sleep(0.05)
    with pytest.raises(SliceLost, match="no compiled graph can be built"):
        loop_thread.run(asyncio.wait_for(step(pipeline, seqs), 60))
    assert pipeline.transport is None
    loop_thread.run(_recovered(pipeline))
    replay(seqs)
    loop_thread.run(decode(pipeline, seqs, 2))
    check(untied_model, reference, seqs)
    assert pipeline.transport.name == "compiled graph"
    assert _restarts(pipeline, loop_thread) == [restarts[0] + 1, restarts[1]]


def test_idle_teardown_waits_for_the_pipe_to_empty_and_a_new_graph_for_the_old_to_go(monkeypatch):
    """The idle teardown's rules, with stand-in transports: only a transport that polls when idle is torn down,
    never with a step in flight, and a step that comes during a teardown builds its graph after it ends."""
    from qwen_relay.server import ray_pipeline
    from qwen_relay.shards.stats import SliceStats

    built: list[FakeGraph] = []

    class FakeGraph:
        """A compiled graph ("compiled": polls when idle) or actor calls ("calls": does not)."""

        def __init__(self, actors: list, depth: int, *, mode: str, use_gpu: bool) -> None:
            assert all(g.closed for g in built), "built before the previous graph was torn down"
            self.name, self.polls_when_idle, self.closed = mode, mode == "compiled", False
            self.may_close = asyncio.Event()
            built.append(self)

        async def step(self, batch: StepBatch) -> list[int]:
            await asyncio.sleep(0.3 if batch.slots else 0)  # a long step: longer than the idle bound
            return []

        async def close(self) -> None:
            await self.may_close.wait()
            self.closed = True

    monkeypatch.setattr(ray_pipeline, "build_transport", FakeGraph)

    def pipeline(mode: str, idle: float):
        return ray_pipeline.RayPipeline([], [], None, [SliceStats.down(0, 1, 1, 0)], use_gpu=False, transport=mode,
                                        idle_teardown=idle)

    empty, long = StepBatch([], [], [], [], []), StepBatch([0], [0], [[1]], [[0]], [SamplingParams()])

    async def scenario() -> None:
        p = pipeline("compiled", idle=0.1)
        await p.step(long)  # 0.3 s in flight: not torn down meanwhile, though longer than the bound
        first = p.transport
        assert first is built[0]
        await asyncio.sleep(0.2)  # the bound has passed with nothing in flight (its timer was set first)
        assert p.transport is None and not first.closed  # detached at once, torn down in the background
        next_step = asyncio.ensure_future(p.step(empty))
        await asyncio.sleep(0.05)
        assert len(built) == 1 and not next_step.done()  # waits for the teardown
        first.may_close.set()
        await next_step
        assert first.closed and p.transport is built[1]
        built[1].may_close.set()
        await p.drop_transport()
        # Kept: steps within the bound (60 s), actor calls (they do not poll), and 0 (keep the graph).
        for mode, idle in (("compiled", 60.0), ("calls", 0.1), ("compiled", 0.0)):
            q = pipeline(mode, idle)
            await q.step(empty)
            await asyncio.sleep(0.2)
            await q.step(empty)
            assert q.transport is built[-1] and not built[-1].closed
            built[-1].may_close.set()
            await q.drop_transport()

    asyncio.run(scenario())


def test_transport_falls_back_to_actor_calls_and_says_why(monkeypatch, caplog):
    from qwen_relay.server import transport

    def cannot(*args, **kwargs):
        raise RuntimeError("no shared memory here")

    monkeypatch.setattr(transport, "CompiledGraph", cannot)
    with caplog.at_level("INFO", logger="qwen_relay.server.transport"):
        chosen = transport.build_transport(["a", "b"], 2, use_gpu=True)
    assert chosen.name == "actor calls" and chosen.actors == ["a", "b"]
    assert "no shared memory here" in caplog.text
    assert transport.build_transport(["a"], 1).name == "actor calls"  # CPU slices: actor calls by default
    with pytest.raises(RuntimeError, match="no shared memory"):
        transport.build_transport(["a"], 1, mode="compiled")
    assert transport.build_transport(["a"], 1, mode="calls").name == "actor calls"
    with pytest.raises(ValueError, match="transport"):
        transport.build_transport(["a"], 1, mode="nccl")


@pytest.mark.slow
def test_teardown_that_hangs_is_bounded(ray_pipeline, loop_thread, untied_model, reference, monkeypatch):
    """A graph whose teardown never returns: past the bound its slices are killed, Ray restarts them, and
    recovery goes on with a new graph instead of waiting forever."""
    import threading

    from qwen_relay.server import transport

    pipeline = ray_pipeline(2)
    restarts = _restarts(pipeline, loop_thread)
    seqs = make_seqs()
    loop_thread.run(step(pipeline, seqs))
    graph = pipeline.transport
    hang = threading.Event()
    monkeypatch.setattr(graph.dag, "teardown", lambda *args, **kwargs: hang.wait())
    monkeypatch.setattr(transport, "TEARDOWN_TIMEOUT_S", 1.0)
    try:
        os.kill(_pid(pipeline, 1), signal.SIGKILL)
        with pytest.raises(SliceLost):
            loop_thread.run(asyncio.wait_for(step(pipeline, seqs), 60))
        loop_thread.run(_recovered(pipeline))
    finally:
        hang.set()
    assert pipeline.transport is None  # torn down (bounded); the next step builds a new graph
    assert _restarts(pipeline, loop_thread) == [r + 1 for r in restarts]  # slice 0 killed by the bound
    replay(seqs)
    loop_thread.run(decode(pipeline, seqs, 2))
    check(untied_model, reference, seqs)
    assert pipeline.transport is not graph and pipeline.transport.name == "compiled graph"
