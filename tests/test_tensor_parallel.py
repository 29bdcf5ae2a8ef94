"""Tensor-parallel slices against whole ones, in one process: N ranks run as threads over the real collectives
(the shared-memory buffer, shards/allreduce.py, and torch.distributed's gloo, shards/collectives.py: the code
GPU ranks run over NCCL), so the split of every layer, the all-reduces and the vocabulary gather are checked
without starting a process.

The contract (docs/design.md, "Tensor parallelism"): the same greedy tokens as the whole slice (itself
`generate()`, tests/test_parity.py) on the test checkpoints at TP 2 and TP 4 (KV heads replicated), and
logits within `ATOL` of the whole slice's: splitting a sum over heads or MLP width changes fp32 rounding only.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qwen_relay.shards.allreduce import GroupBroken, ShmCollectives, channel_path
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.collectives import TorchCollectives, choose_collective, rank_devices
from qwen_relay.shards.kv_cache import CacheMismatch
from qwen_relay.shards.model import StepMetadata
from qwen_relay.shards.runner import SliceRunner, SliceSpec
from qwen_relay.shards.tensor_parallel import Shard

ATOL = 1e-4  # |logit difference| bound at TP 2 and 4 on the tiny checkpoints (fp32; measured 1.9-2.4e-7)
PROMPTS = [[5, 17, 300, 42, 7, 999, 3], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410]]
MAX_NEW = 10
BLOCK = 4


def _spec(model: Path, first: int, end: int, world: int, decode: str = "static", collective: str = "auto") -> SliceSpec:
    return SliceSpec(model=str(model), first=first, end=end, device="cpu", max_slots=4, max_len=64, num_blocks=32,
                     block_size=BLOCK, decode=decode, tensor_parallel=world, threads=1, collective=collective)


_STORES = tempfile.TemporaryDirectory(prefix="qwen-relay-tp-test-")  # removed when the test process ends


def torch_collectives(world: int, timeout: float = 20) -> list[TorchCollectives]:
    """Every rank's gloo collectives, formed at once from threads of this process (forming one waits for all)."""
    store = os.path.join(tempfile.mkdtemp(dir=_STORES.name), "store")
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(TorchCollectives, store, r, world, torch.device("cpu"), timeout=timeout)
                   for r in range(world)]
        return [f.result(timeout=120) for f in futures]


class ThreadGroup:
    """N ranks of one slice as threads of this process: `run(fn)` calls fn(runner) on every rank at once."""

    def __init__(self, spec: SliceSpec) -> None:
        world = spec.tensor_parallel
        if choose_collective(spec.collective, spec.device) == "torch":
            self.comms = torch_collectives(world)
        else:
            path = channel_path()
            self.comms = [ShmCollectives(path, 0, world, create=True, timeout=20)]
            self.comms += [ShmCollectives(path, r, world, timeout=20) for r in range(1, world)]
            self.comms[0].unlink()
        self.pool = ThreadPoolExecutor(world)
        # One after another: loading patches torch's parameter registration process-wide (init_empty_weights).
        self.runners = [SliceRunner(spec, Shard(r, world), self.comms[r]) for r in range(world)]
        self.run(lambda runner: runner.reset())

    def _all(self, fn: Callable, items) -> list:
        return [f.result(timeout=120) for f in [self.pool.submit(fn, item) for item in items]]

    def run(self, fn: Callable[[SliceRunner], object]) -> list:
        return self._all(fn, self.runners)

    def step(self, batch: StepBatch, hidden: torch.Tensor | None) -> object:
        outs = self.run(lambda runner: runner.step(batch, hidden))
        for out in outs[1:]:  # every rank holds the same hidden state, and samples the same tokens
            assert torch.equal(out, outs[0]) if isinstance(out, torch.Tensor) else out == outs[0]
        return outs[0]


def _tables(lengths: list[int]) -> list[list[int]]:
    """Disjoint blocks per row, enough for `lengths` positions."""
    tables, next_block = [], 0
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    return tables


def greedy(stages: list, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy generation through `stages` (SliceRunners or ThreadGroups, in layer order): a batched prefill,
    then decode steps (the static step)."""
    tables = _tables([len(p) + max_new for p in prompts])
    params = [SamplingParams()] * len(prompts)
    slots = list(range(len(prompts)))

    def step(starts: list[int], ids: list[list[int]]) -> list[int]:
        out = None
        for stage in stages:
            out = stage.step(StepBatch(slots, starts, ids, tables, params), out)
        return out

    generated = [[t] for t in step([0] * len(prompts), [list(p) for p in prompts])]
    for _ in range(1, max_new):
        starts = [len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]
        for g, t in zip(generated, step(starts, [[g[-1]] for g in generated]), strict=True):
            g.append(t)
    return generated


@pytest.fixture(scope="module")
def whole(tiny_model) -> SliceRunner:
    runner = SliceRunner(_spec(tiny_model, 0, 5, 1))
    runner.reset()
    return runner


@pytest.mark.parametrize("collective", ["shm", "torch"])  # torch: gloo here, the code GPU ranks run over NCCL
@pytest.mark.parametrize("world", [2, 4])  # the tiny model's 2 KV heads: split at 2, replicated at 4
def test_logits_within_tolerance(tiny_model, whole, world, collective):
    group = ThreadGroup(_spec(tiny_model, 0, 5, world, collective=collective))
    batch = StepBatch([0, 1], [0, 0], PROMPTS[:2], _tables([7, 2]), [SamplingParams()] * 2)

    def logits(runner: SliceRunner) -> torch.Tensor:
        meta = StepMetadata.build(batch, runner.device, runner.cache.block_size, runner.cache.scratch)
        with torch.inference_mode():
            return runner.slice(meta, None, runner.cache)

    want = logits(whole)
    got = group.run(logits)
    for out in got:
        assert out.shape == want.shape
        assert torch.equal(out, got[0])
    diff = (got[0] - want).abs().max().item()
    assert 0 < diff < ATOL  # rounding differs (the split is real) but stays within the bound
    assert torch.equal(got[0].argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("collective", ["shm", "torch"])
@pytest.mark.parametrize("world", [2, 4])
def test_same_greedy_tokens(tiny_model, whole, reference, world, collective):
    expected = [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]
    assert greedy([whole], PROMPTS, MAX_NEW) == expected
    group = ThreadGroup(_spec(tiny_model, 0, 5, world, collective=collective))
    assert type(group.comms[0]) is (TorchCollectives if collective == "torch" else ShmCollectives)
    assert greedy([group], PROMPTS, MAX_NEW) == expected
    assert group.runners[0].collectives.count > 0


def test_pipeline_of_groups(tiny_model, reference):
    """TP 2 x PP 2, the dynamic decode path: hidden states pass from one group to the next."""
    stages = [ThreadGroup(_spec(tiny_model, 0, 2, 2, decode="dynamic")),
              ThreadGroup(_spec(tiny_model, 2, 5, 2, decode="dynamic"))]
    assert greedy(stages, PROMPTS, MAX_NEW) == [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]


def test_qwen3(qwen3_model):
    """Qwen3's per-head q/k norms and explicit head_dim (heads x head_dim != hidden), untied and sharded files."""
    whole = SliceRunner(_spec(qwen3_model, 0, 5, 1))
    whole.reset()
    group = ThreadGroup(_spec(qwen3_model, 0, 5, 2))
    assert greedy([group], PROMPTS, MAX_NEW) == greedy([whole], PROMPTS, MAX_NEW)


@pytest.mark.parametrize("world", [2, 4])
def test_qwen3_moe(qwen3_moe_model, world):
    """Every expert's width split, the router replicated; a dense layer (mlp_only_layers) among the MoE ones."""
    whole = SliceRunner(_spec(qwen3_moe_model, 0, 5, 1))
    whole.reset()
    group = ThreadGroup(_spec(qwen3_moe_model, 0, 5, world))
    expert = group.runners[0].slice.model.layers["0"].mlp.experts[0]
    assert expert.down_proj.in_features == whole.slice.model.layers["0"].mlp.experts[0].down_proj.in_features // world
    assert greedy([group], PROMPTS, MAX_NEW) == greedy([whole], PROMPTS, MAX_NEW)


def test_rank_holds_its_share(tiny_model, whole):
    group = ThreadGroup(_spec(tiny_model, 0, 5, 2))
    rank = group.runners[0]
    assert rank.cache.k.shape[-2] == whole.cache.k.shape[-2] // 2  # its KV heads only
    full = sum(p.numel() for n, p in whole.slice.named_parameters() if "layers" in n)
    mine = sum(p.numel() for n, p in rank.slice.named_parameters() if "layers" in n)
    assert mine < full * 0.6  # norms and q/k/v biases aside, half of every layer
    assert rank.slice.lm_head.out_features == -(-whole.slice.config.vocab_size // 2)


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_qwen3_5(tmp_path, multimodal):
    """Gated DeltaNet layers split by heads (fused q/k/v rows, conv channels, recurrent state), gated-query
    attention layers; the published multimodal layout (the text model under model.language_model.) too."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    hybrid = build_checkpoint(tmp_path / "qwen3.5", "tiny-qwen3.5", multimodal=multimodal)
    whole = SliceRunner(_spec(hybrid, 0, 8, 1))
    whole.reset()
    group = ThreadGroup(_spec(hybrid, 0, 8, 2))
    assert group.runners[0].cache.state.shape[2] == whole.cache.state.shape[2] // 2  # its value heads' state
    assert greedy([group], PROMPTS, MAX_NEW) == greedy([whole], PROMPTS, MAX_NEW)
    with pytest.raises(ValueError, match="DeltaNet key heads"):  # 2 key heads cannot go to 4 ranks
        SliceRunner(_spec(hybrid, 0, 8, 4), Shard(0, 4))


def test_dead_rank_breaks_the_collective():
    path = channel_path()
    comm = ShmCollectives(path, 0, 2, create=True, timeout=0.5)
    comm.unlink()
    with pytest.raises(GroupBroken, match="did not meet"):
        comm.all_reduce(torch.ones(4))


def test_torch_collectives_results_and_a_silent_rank():
    """gloo's sums and gathers are the shared-memory buffer's; a rank that never joins a collective breaks it
    within the timeout; an aborted group refuses every later collective."""
    comms = torch_collectives(2, timeout=1)
    with ThreadPoolExecutor(2) as pool:
        sums = list(pool.map(lambda c: c.all_reduce(torch.full((2, 3), c.rank + 1.0)), comms))
        gathered = list(pool.map(lambda c: c.all_gather(torch.full((2, 3), float(c.rank))), comms))
    assert all(torch.equal(s, torch.full((2, 3), 3.0)) for s in sums)
    want = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)], dim=-1)
    assert all(torch.equal(g, want) for g in gathered)
    start = time.monotonic()
    with pytest.raises(GroupBroken, match="all-reduce failed"):
        comms[0].all_reduce(torch.ones(4))  # rank 1 never comes
    assert time.monotonic() - start < 15
    comms[0].abort()
    with pytest.raises(GroupBroken, match="aborted"):
        comms[0].all_reduce(torch.ones(4))
    for comm in comms:
        comm.close()


def test_rank_devices_and_collective_choice():
    assert rank_devices("cpu", 2, 0) == ["cpu", "cpu"]
    assert rank_devices("auto", 2, 0) == ["cpu", "cpu"]
    assert rank_devices("auto", 4, 8) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]  # rank r: the r-th GPU
    assert rank_devices("cuda:4", 2, 8) == ["cuda:4", "cuda:5"]
    with pytest.raises(ValueError, match="--tensor-parallel 4 needs 4 GPUs .* sees 2"):
        rank_devices("cuda", 4, 2)
    with pytest.raises(ValueError, match="sees 8"):
        rank_devices("cuda:6", 4, 8)
    assert choose_collective("auto", "cpu") == "shm"  # the faster one on a CPU
    assert choose_collective("auto", "cuda:1") == "torch"
    assert choose_collective("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="CPU tensors only"):
        choose_collective("shm", "cuda:0")
    with pytest.raises(ValueError, match="choose one of"):
        choose_collective("nccl", "cpu")


@pytest.mark.slow  # rank processes of their own
def test_process_group(tiny_model, reference, tmp_path):
    """Ranks in processes of their own (shards/group.py): the same tokens; a rank that dies breaks the group,
    and a new group serves again once reset (the gateway's replay)."""
    from qwen_relay.shards.group import GroupRunner

    group = GroupRunner(_spec(tiny_model, 0, 5, 2))
    try:
        group.warmup()  # leaves every rank's cache shut: a step is refused on every rank, the group stays whole
        with pytest.raises(CacheMismatch):
            greedy([group], PROMPTS[:1], 1)
        group.reset()
        expected = [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]
        assert greedy([group], PROMPTS, MAX_NEW) == expected
        assert group.load_adapter("a", str(save_lora(tiny_model, tmp_path / "a")))["name"] == "a"  # every rank
        group.unload_adapter("a")
        group._children[0].kill()
        with pytest.raises(GroupBroken):
            greedy([group], PROMPTS[:1], 2)
        with pytest.raises(GroupBroken, match="rebuilt"):
            group.reset()
    finally:
        group.close()
    group = GroupRunner(_spec(tiny_model, 0, 5, 2))
    try:
        group.reset()
        assert greedy([group], PROMPTS, MAX_NEW) == expected
    finally:
        group.close()


@pytest.mark.slow  # rank processes of their own
def test_process_group_over_torch_distributed(tiny_model, reference):
    """`collective="torch"` (gloo: the code path GPU ranks take over NCCL) in rank processes: the same tokens as
    TP 1; a killed rank breaks the group in bounded time (well inside the collectives' 60 s timeout), the
    group's watch aborts its collectives, and the private rendezvous folder goes with the group."""
    from qwen_relay.shards.group import GroupRunner

    group = GroupRunner(_spec(tiny_model, 0, 5, 2, collective="torch"))
    rendezvous = group._rendezvous
    try:
        assert isinstance(group.collectives, TorchCollectives) and group.collectives.backend == "gloo"
        assert os.path.isdir(rendezvous) and (os.stat(rendezvous).st_mode & 0o077) == 0
        group.reset()
        expected = [reference(tiny_model, p, MAX_NEW) for p in PROMPTS]
        assert greedy([group], PROMPTS, MAX_NEW) == expected
        group._children[0].kill()
        start = time.monotonic()
        while not group.collectives.aborted:  # the group's watch sees the child die and aborts the collectives
            assert time.monotonic() - start < 5
            time.sleep(0.05)
        with pytest.raises(GroupBroken):
            greedy([group], PROMPTS[:1], 2)
        assert time.monotonic() - start < 15
        assert group.broken
    finally:
        group.close()
    assert not os.path.exists(rendezvous)


@pytest.mark.slow  # rank processes of their own
def test_rank_dying_inside_a_collective(tiny_model):
    """A child rank killed while rank 0 waits for it inside an all-reduce: rank 0 gets out with GroupBroken in
    bounded time (gloo sees the connection close; over NCCL the group's watch aborts the collective)."""
    from qwen_relay.shards.group import GroupRunner

    group = GroupRunner(_spec(tiny_model, 0, 5, 2, collective="torch"))
    try:
        child = group._children[0]
        threading.Timer(1.0, child.kill).start()
        start = time.monotonic()
        with pytest.raises(GroupBroken):
            group.collectives.all_reduce(torch.ones(4))  # rank 0 alone: rank 1 waits for calls, never comes
        assert 0.5 < time.monotonic() - start < 15
    finally:
        group.close()


@pytest.mark.slow  # rank processes of their own, and inductor's C++ compile in each (~35 s on 2 cores)
def test_compiled_decode_on_tensor_parallel_ranks(reference, tmp_path):
    """`decode="compiled"` on TP 2 ranks over torch.distributed (gloo: the GPU ranks' code, NCCL there): the
    all-reduces and the vocabulary gather are custom operators that `torch.compile(fullgraph=True)` keeps inside
    the graph (a graph break would fail the compile and fall back to the eager step, which the mode would show);
    the greedy tokens are generate()'s. The shared-memory collective goes through the same operators. Two
    layers: the compile's cost grows with the layers, what it proves does not."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint
    from qwen_relay.shards.group import GroupRunner

    model = build_checkpoint(tmp_path, "tiny", num_hidden_layers=2)
    group = GroupRunner(_spec(model, 0, 2, 2, decode="compiled", collective="torch"))
    try:
        assert group.runner.decode_mode == "compiled"
        group.warmup()  # compiles the first decode bucket on every rank
        group.reset()
        expected = [reference(model, p, MAX_NEW) for p in PROMPTS[:3]]
        got = greedy([group], PROMPTS[:3], MAX_NEW)
        assert group.runner.decode_mode == "compiled"  # no rank 0 fallback to the eager step
        assert [g[: len(e)] for g, e in zip(got, expected, strict=True)] == expected
    finally:
        group.close()


@pytest.mark.slow  # processes of their own
def test_child_rank_exits_when_rank_0_is_killed_mid_collective():
    """A child rank whose main thread waits where neither its socket nor its collective will wake it (over NCCL, a
    collective on the GPU that will never complete; here a sleep) exits once its rank 0's process is killed,
    rather than holding its share, and on GPUs its GPU's memory, for ever (shards/group.py, `_exit_with`)."""
    import subprocess
    import sys

    from qwen_relay.shards.allreduce import alive

    child = ("import sys, threading, time\n"
             "from qwen_relay.shards.group import _exit_with\n"
             "threading.Thread(target=_exit_with, args=(int(sys.argv[1]),), daemon=True).start()\n"
             "time.sleep(600)\n")
    host = ("import os, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    rank0 = subprocess.Popen([sys.executable, "-c", host], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(rank0.stdout.readline())
        time.sleep(1)  # killed maybe while the child still imports torch: it knows its rank 0's pid from its argv
        assert alive(pid)
    finally:
        rank0.kill()
        rank0.wait()
    start = time.monotonic()
    while alive(pid):
        assert time.monotonic() - start < 30, "a child rank outlived its rank 0"
        time.sleep(0.1)


@pytest.mark.slow  # rank processes of their own
def test_relay_tp2_by_pp2(relay_factory, tiny_model, reference):
    """`serve --no-ray --shards 2 --tensor-parallel 2`: the gateway's tokens are generate()'s; a rank killed
    between requests breaks its group, the engine's recovery forms it again and the next request is exact."""
    from qwen_relay.client import RelayClient
    from qwen_relay.server.app import ServeOptions

    relay = relay_factory(ServeOptions(model=str(tiny_model), shards=2, tensor_parallel=2, max_context=512,
                                       use_ray=False))
    prompts = [p[:6] for p in PROMPTS]
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as client:
        for prompt in prompts:
            assert client.generate(prompt_token_ids=prompt, max_new_tokens=MAX_NEW).token_ids == \
                reference(tiny_model, prompt, MAX_NEW)
        broken = relay.pipeline.runners[1]
        broken._children[0].kill()
        got = client.generate(prompt_token_ids=prompts[0], max_new_tokens=MAX_NEW).token_ids
    assert got == reference(tiny_model, prompts[0], MAX_NEW)
    assert relay.pipeline.runners[1] is not broken and not relay.pipeline.runners[1].broken


def test_serve_refuses_what_it_cannot_split(tmp_path, tiny_model):
    from qwen_relay.checkpoints.synthetic import build_checkpoint
    from qwen_relay.server.app import Relay, ServeOptions

    hybrid = build_checkpoint(tmp_path / "qwen3.5", "tiny-qwen3.5")
    with pytest.raises(ValueError, match="does not divide the 2 DeltaNet key heads"):
        Relay(ServeOptions(model=str(hybrid), shards=1, tensor_parallel=4, use_ray=False))
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        Relay(ServeOptions(model=str(tiny_model), shards=1, tensor_parallel=3, use_ray=False))


def test_cli_flag_reaches_serve_options():
    from qwen_relay.server.cli import build_parser, serve_options

    args = build_parser("serve").parse_args(["serve", "--model", "m", "--shards", "2", "--tensor-parallel", "4"])
    assert serve_options(args).tensor_parallel == 4
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--model", "m", "--tensor-parallel", "0"])


@pytest.mark.slow
def test_ray_relay_tp2(relay_factory, tiny_model, reference):
    """On Ray actors: each slice's group behind one actor; a killed rank takes its actor down, Ray restarts it
    with a new group, and the replay is exact."""
    import ray

    from qwen_relay.client import RelayClient
    from qwen_relay.server.app import ServeOptions

    relay = relay_factory(ServeOptions(model=str(tiny_model), shards=2, tensor_parallel=2, max_context=512,
                                       recovery_timeout=120))
    prompt = PROMPTS[0]
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=240) as client:
        assert client.generate(prompt_token_ids=prompt, max_new_tokens=MAX_NEW).token_ids == \
            reference(tiny_model, prompt, MAX_NEW)
        first = ray.get(relay.pipeline.actors[1].stats.remote())
        children = [int(p) for p in open(f"/proc/{first.pid}/task/{first.pid}/children").read().split()]
        os.kill(children[0], signal.SIGKILL)
        assert client.generate(prompt_token_ids=prompt, max_new_tokens=MAX_NEW).token_ids == \
            reference(tiny_model, prompt, MAX_NEW)
    assert ray.get(relay.pipeline.actors[1].stats.remote()).incarnation != first.incarnation


def save_lora(model: Path, folder: Path) -> Path:
    """A PEFT adapter with random non-zero A and B on every linear layer of `model`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


def test_lora_adapters_split_like_their_layers(tiny_model, tmp_path):
    """A LoRA adapter on every linear layer (B split with column-parallel layers, A with row-parallel ones),
    in a batch mixing rows with and without it: the same greedy tokens as the whole slice with it."""
    save_lora(tiny_model, tmp_path / "all")

    def with_adapter(stages: list) -> list[list[int]]:
        tables = _tables([len(p) + MAX_NEW for p in PROMPTS])
        slots, params, rows = [0, 1, 2], [SamplingParams()] * 3, ["a", "", "a"]
        generated: list[list[int]] = [[], [], []]
        starts, ids = [0, 0, 0], [list(p) for p in PROMPTS]
        for _ in range(MAX_NEW):
            out = None
            for stage in stages:
                out = stage.step(StepBatch(slots, starts, ids, tables, params, rows), out)
            for g, t in zip(generated, out, strict=True):
                g.append(t)
            starts = [len(p) + len(g) - 1 for p, g in zip(PROMPTS, generated, strict=True)]
            ids = [[g[-1]] for g in generated]
        return generated

    whole = SliceRunner(_spec(tiny_model, 0, 5, 1))
    whole.reset()
    whole.load_adapter("a", str(tmp_path / "all"))
    group = ThreadGroup(_spec(tiny_model, 0, 5, 2))
    group.run(lambda runner: runner.load_adapter("a", str(tmp_path / "all")))
    want = with_adapter([whole])
    assert with_adapter([group]) == want
    assert want[0] != greedy([whole], PROMPTS[:1], MAX_NEW)[0]  # the adapter changes the tokens


def test_kv_pool_sized_per_rank(tiny_model):
    """A rank's blocks hold half the KV heads at TP 2, so the same memory holds twice the blocks; at TP 4 the
    tiny model's 2 KV heads are replicated, one per rank, so no more than at TP 2."""
    from qwen_relay.server.kv_capacity import kv_capacity
    from qwen_relay.shards.loader import load_config

    config = load_config(tiny_model)
    blocks = {n: kv_capacity(config, [(0, 5)], torch.float32, 16, None, 2**20, n).num_blocks for n in (1, 2, 4)}
    assert blocks[2] == 2 * blocks[1] and blocks[4] == blocks[2]
