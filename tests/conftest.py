"""Shared fixtures: tiny real Qwen2 checkpoints, one Ray session, and relays serving them on loopback.

A relay (gRPC server + slices) runs on a background event loop so tests can call it with the real
synchronous client. Its slices run in this process (`use_ray=False`: the fast tier) or in Ray actors; Ray
starts once per test session, and only when a test asks for a Ray relay. Relays are keyed by their options,
so tests with the same options reuse one: besides the shared `ray_relay`, at most one lives at a time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest

from qwen_relay.ray_common.local_ray import PRESTART_ENV, free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test cluster; silences the token warning
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No workers started ahead for the first driver on the Ray nodes the tests start (the session's, the clusters of
# test_multinode), as on serve and train's own nodes: the slices never run in them, so on the session's node
# they idled for the whole run.
os.environ.setdefault(PRESTART_ENV, "0")

NUM_LAYERS = 5  # odd, so even splits into 2, 3 and 4 slices are uneven


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tied embeddings (like Qwen2.5-0.5B), single safetensors file."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def untied_model(tmp_path_factory) -> Path:
    """Untied LM head, sharded into several safetensors files with an index."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("untied"), "tiny", num_hidden_layers=NUM_LAYERS,
                            tie_word_embeddings=False, seed=1, max_shard_size="100KB")


@pytest.fixture(scope="session")
def ray_session() -> None:
    """Ray for this test session, started on first use and shut down when the session ends
    (`pytest_sessionfinish`), after every fixture, so a Ray relay still alive is stopped before Ray is."""
    import ray

    if not ray.is_initialized():
        # Logical CPUs: the shared relay's 2 slices, the live relay's (up to 3) and test_pipelining's (5) fit;
        # the slices set their own torch threads.
        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)


# The files whose Ray tests use the shared `ray_relay`: `make test` gives them to one xdist worker together
# (`pytest_xdist_make_scheduler`), so the relay and its slice actors start once, not once per worker.
SHARED_RELAY_FILES = frozenset({"test_faults.py", "test_http.py", "test_loadgen.py", "test_metrics.py",
                                "test_parity.py", "test_relay_e2e.py"})
SHARED_RELAY = "the files sharing ray_relay"


def work_unit(path: Path) -> str:
    """What one xdist worker runs whole: a test file, or every file that shares the Ray relay."""
    return SHARED_RELAY if path.name in SHARED_RELAY_FILES else path.name


# The longest work units, longest first (seconds each on a 2-core machine, from `pytest --durations=0`).
LONGEST_FIRST = ("test_train_bounds.py", "test_train_job.py", SHARED_RELAY, "test_multinode.py", "test_demo.py",
                 "test_local_serve.py", "test_bench.py", "test_pipelining.py", "test_adapters.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest work units first, then the other slow tests, then the fast ones (stable otherwise): `make
    test` hands whole units to 2 workers in this order, so the short files fill the gaps at the end instead
    of one worker running a long file alone while the other idles."""
    def rank(item: pytest.Item) -> tuple[int, bool]:
        unit = work_unit(item.path)
        first = LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)
        return first, item.get_closest_marker("slow") is None

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (the Makefile's), with the files sharing `ray_relay` as one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRelayTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(Path(super()._split_scope(nodeid)))

    return SharedRelayTogether(config, log)


def pytest_sessionfinish(session, exitstatus) -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class LoopThread:
    """An asyncio loop on a daemon thread, so synchronous tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="session")
def loop_thread() -> LoopThread:
    return LoopThread()


@pytest.fixture(scope="session")
def stop_while_streaming(loop_thread) -> Callable:
    """`reader, stopped = stop_while_streaming(relay, consume)`: `consume(streaming)` runs a long stream on a
    thread and sets `streaming` once it has a chunk; then the relay's graceful stop begins (`stopped`: a future)."""

    def start(relay, consume: Callable[[threading.Event], None]) -> tuple[threading.Thread, Future]:
        streaming = threading.Event()
        reader = threading.Thread(target=consume, args=(streaming,))
        reader.start()
        assert streaming.wait(60)
        return reader, asyncio.run_coroutine_threadsafe(relay.stop(), loop_thread.loop)

    return start


@pytest.fixture(scope="session")
def relay_factory(request, loop_thread) -> Iterator[Callable]:
    """`relay_factory(options, shared=False) -> Relay`: reuses a live relay with these options, else starts one
    in place of the last. A shared relay (`ray_relay`) is never replaced: it lives until the session ends, so
    the files that use it start it once per xdist worker whatever runs between them."""
    from qwen_relay.server.app import Relay, ServeOptions

    kept: list[tuple[ServeOptions, Relay]] = []  # shared: until the session ends
    last: list[tuple[ServeOptions, Relay]] = []  # the latest other one, stopped when the next starts

    def get(options: ServeOptions, shared: bool = False) -> Relay:
        options = replace(options, port=0)
        for known, relay in kept + last:
            if known == options:
                return relay
        if options.use_ray:
            request.getfixturevalue("ray_session")
        while last:
            loop_thread.run(last.pop()[1].stop(grace=0))
        relay = loop_thread.run(Relay.start(options))
        (kept if shared else last).append((options, relay))
        return relay

    yield get
    for _, relay in kept + last:
        loop_thread.run(relay.stop(grace=0))


@pytest.fixture
def relay(relay_factory, tiny_model):
    """The tiny model in 2 slices (layers 0-2 and 3-4), in this process."""
    from qwen_relay.server.app import ServeOptions

    return relay_factory(ServeOptions(model=str(tiny_model), shards=2, max_context=512, max_new_tokens_cap=256,
                                      use_ray=False))


@pytest.fixture(scope="session")
def shared_metrics_port() -> int:
    return free_port()


@pytest.fixture
def ray_relay(relay_factory, tiny_model, shared_metrics_port):
    """The tiny model in 2 slices (layers 0-2 and 3-4) on Ray actors, with Prometheus metrics and the HTTP API:
    one relay, started once per xdist worker, for the Ray tests of parity, faults, load, metrics and HTTP. A
    test that kills a slice leaves it restarted (a killed slice has 2 minutes to come back), so tests compare
    with what it reported before they began, not with a fresh relay's zeros."""
    from qwen_relay.server.app import ServeOptions

    return relay_factory(ServeOptions(model=str(tiny_model), shards=2, max_context=512, max_new_tokens_cap=512,
                                      recovery_timeout=120, metrics_port=shared_metrics_port, stats_interval=1.0,
                                      http_port=0), shared=True)


CACHE_DRAIN_S = 60  # how long a test waits for a finished request's KV blocks to go back (shared machine)


@pytest.fixture(scope="session")
def wait_caches_empty() -> Callable:
    """`wait_caches_empty(client)`: wait (bounded) until no sequence holds KV blocks and every block is free
    again. The gateway owns the blocks (server/block_manager.py): a finished or cancelled request's go back when
    the engine reaps it, with no message to any slice, and GetModelInfo reports the gateway's count in each
    slice's `cache_entries` (every slice holds the same sequences) and the free blocks in `kv_blocks_free`
    (blocks of cached prefixes are free: nobody holds them)."""
    import time

    def wait(client) -> None:
        deadline = time.monotonic() + CACHE_DRAIN_S
        while True:
            info = client.model_info()
            assert info.kv_capacity_tokens > 0 and info.kv_block_size > 0, info  # the gateway reports its pool
            if (all(s.cache_entries == 0 for s in info.slices)
                    and info.kv_blocks_free * info.kv_block_size == info.kv_capacity_tokens):
                return
            assert time.monotonic() < deadline, f"KV blocks still held after {CACHE_DRAIN_S} s: {info}"
            time.sleep(0.1)

    return wait


@pytest.fixture
def client(relay):
    from qwen_relay.client import RelayClient

    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tiny_model, untied_model) -> Callable:
    """Greedy `generate()` on the whole model in fp32: the parity contract. Deterministic, so each answer is
    computed once per session: every split of a parity test asks the same questions."""
    import torch
    from transformers import AutoModelForCausalLM

    models = {}
    answers: dict[tuple, list[int]] = {}

    def generate(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (str(model_dir), tuple(prompt_ids), max_new_tokens)
        if key not in answers:
            if model_dir not in models:
                models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            with torch.inference_mode():
                out = models[model_dir].generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                                 do_sample=False)
            answers[key] = out[0, len(prompt_ids):].tolist()
        return list(answers[key])

    return generate


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory) -> Path:
    """Qwen3 dense: q/k head norms, no q/k/v bias, head_dim x heads != hidden; untied, sharded."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "tiny-qwen3", num_hidden_layers=NUM_LAYERS,
                            max_shard_size="100KB")


@pytest.fixture(scope="session")
def qwen3_moe_model(tmp_path_factory) -> Path:
    """Qwen3-MoE: 8 experts, top-2, layer 1 dense (mlp_only_layers), experts stored one by one."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "tiny-qwen3-moe", num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def qwen3_5_model(tmp_path_factory) -> Path:
    """Qwen3.5 as Qwen publishes it: the multimodal class, text model under model.language_model, a vision tower
    and MTP weights beside it; layers L L L F L L L F (L: Gated DeltaNet, F: full attention)."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("qwen3_5"), "tiny-qwen3.5", multimodal=True)
