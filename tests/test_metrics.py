"""Prometheus metrics, scraped over HTTP from a relay of two Ray slices while real requests run."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow  # starts Ray actors, subprocesses or a cluster: `make test-fast` skips it

GENERATE = "qwen_relay.v1.TextGeneration/Generate"
STREAM = "qwen_relay.v1.TextGeneration/GenerateStream"
SLICES = ("0", "1")


class Scrape:
    """One /metrics page: `scrape["name", {"label": "value"}]` is a sample's value (0 when absent)."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert response.status == 200
            text = response.read().decode()
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __getitem__(self, key: str | tuple[str, dict[str, str]]) -> float:
        name, labels = (key, {}) if isinstance(key, str) else key
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, labels: dict[str, str]) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def _scrape_when(port: int, ready: Callable[[Scrape], bool], what: str, timeout: float = 30.0) -> Scrape:
    """The first scrape that satisfies `ready`: slice stats reach the metrics on the stats poller's clock."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(port)
        if ready(scrape):
            return scrape
        assert time.monotonic() < deadline, f"no scrape showed {what} within {timeout:.0f} s"
        time.sleep(0.1)


def _settled(port: int) -> Scrape:
    """A scrape once no sequence holds a KV block (the gateway's count: blocks of cached prefixes are free) and
    the metrics have seen it."""
    return _scrape_when(port, lambda s: s["qwen_relay_kv_blocks", {"state": "used"}] == 0
                        and s["qwen_relay_active_sequences"] == 0, "no KV block held")


def test_metrics_follow_requests(ray_relay):
    from qwen_relay.client import RelayClient

    port = ray_relay.options.metrics_port
    assert ray_relay.metrics.port == port
    before = _settled(port)
    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=120) as client:
        completions = [client.generate("hello there", max_new_tokens=n, ignore_eos=True) for n in (4, 6)]
        chunks = list(client.stream("streamed", max_new_tokens=5, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as bad:
            client.generate("hello", top_p=2.0)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # While a long stream is open: one active sequence, holding KV blocks.
        stream = client.stream("a long one", max_new_tokens=500, ignore_eos=True)
        next(stream)
        during = _scrape_when(port, lambda s: s["qwen_relay_kv_blocks", {"state": "used"}] >= 1,
                              "the open stream's KV blocks")
        stream.close()  # cancels the call: the server frees its blocks

        info = client.model_info()
    # The slices' own counters reach the metrics on the stats poller's clock (every second here), the KV blocks
    # at once: wait for a snapshot taken after this test's steps.
    after = _scrape_when(port, lambda s: s["qwen_relay_kv_blocks", {"state": "used"}] == 0
                         and s["qwen_relay_active_sequences"] == 0
                         and all(s["qwen_relay_slice_forward_seconds_total", {"slice": i}]
                                 > before["qwen_relay_slice_forward_seconds_total", {"slice": i}] for i in SLICES),
                         "no KV block held, and a slice-stats snapshot after the steps")

    def delta(name: str, **labels: str) -> float:
        return after[name, labels] - before[name, labels]

    generated = sum(c.completion_tokens for c in completions) + chunks[-1].completion_tokens
    assert delta("qwen_relay_requests_total", method=GENERATE, code="OK") == 2
    assert delta("qwen_relay_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == 1
    assert delta("qwen_relay_requests_total", method=STREAM, code="OK") == 1
    assert delta("qwen_relay_requests_total", method=STREAM, code="CANCELLED") == 1
    assert delta("qwen_relay_time_to_first_token_seconds_count") == 4  # 3 finished + the cancelled stream
    # TPOT needs two tokens: the cancelled stream may have been cut after its first.
    assert delta("qwen_relay_time_per_output_token_seconds_count") in (3, 4)
    # Every token generated reached a caller, except those the cancelled stream made before its cancel.
    cancelled_tokens = delta("qwen_relay_generated_tokens_total") - generated
    assert 1 <= cancelled_tokens <= 500
    assert delta("qwen_relay_step_seconds_count") >= max(c.completion_tokens for c in completions)

    assert during["qwen_relay_active_sequences"] == 1 and during["qwen_relay_queue_depth"] == 0
    assert after["qwen_relay_kv_blocks", {"state": "used"}] == 0
    assert (after["qwen_relay_kv_blocks", {"state": "free"}] * info.kv_block_size == info.kv_capacity_tokens
            and info.kv_capacity_tokens > 0)
    for i in SLICES:
        assert after["qwen_relay_slice_healthy", {"slice": i}] == 1
        assert delta("qwen_relay_slice_forward_seconds_total", slice=i) > 0
    assert after["qwen_relay_active_sequences"] == 0 and after["qwen_relay_queue_depth"] == 0
    # Steps took longer than the slices' forwards inside them: the hops cost something.
    assert after["qwen_relay_hop_transfer_seconds_total"] > 0

    # The shared relay's slices may have been restarted by earlier tests: ModelInfo and the metrics agree.
    assert [(s.index, s.healthy, s.restarts) for s in info.slices] == [
        (int(i), True, after["qwen_relay_slice_restarts_total", {"slice": i}]) for i in SLICES]


def test_slice_snapshots_count_restarts_and_slice_compute():
    """Restarts come from the pipeline's counts; forward time restarts from 0 with its slice and still adds up."""
    from qwen_relay.server.metrics import Metrics
    from qwen_relay.shards.stats import SliceStats

    metrics = Metrics()

    def snapshot(forward: tuple[float, float], restarts: tuple[int, int], healthy: bool = True) -> None:
        metrics.update_slices([SliceStats(first=0, end=2, has_embeddings=True, has_lm_head=False,
                                          forward_seconds=forward[0], restarts=restarts[0]),
                               SliceStats(first=2, end=4, has_embeddings=False, has_lm_head=True,
                                          forward_seconds=forward[1], restarts=restarts[1], healthy=healthy)])

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels)

    snapshot((1.0, 2.0), (0, 0))  # baseline: warm-up
    metrics.observe_step(4.0)
    snapshot((2.0, 3.0), (0, 0))  # 2 s of the 4 in forwards: 2 s over 3 hops
    assert value("qwen_relay_hop_transfer_seconds_total") == pytest.approx(2 / 3)
    snapshot((2.0, 0.0), (0, 1), healthy=False)  # slice 1 is down: its numbers are not folded in
    assert value("qwen_relay_slice_restarts_total", slice="1") == 1
    assert value("qwen_relay_slice_healthy", slice="1") == 0
    metrics.observe_step(1.0)
    snapshot((2.5, 0.5), (0, 1))  # restarted: its 0.5 s count from 0; 5 s of steps, 3 s of forwards
    assert value("qwen_relay_hop_transfer_seconds_total") == pytest.approx(2 / 3)
    assert value("qwen_relay_slice_restarts_total", slice="1") == 1  # the same restart, reported again
    assert value("qwen_relay_slice_forward_seconds_total", slice="1") == 0.5


def test_metrics_registries_are_per_relay():
    from qwen_relay.server.metrics import Metrics

    first, second = Metrics(), Metrics()
    first.generated_tokens.inc(3)
    assert first.registry.get_sample_value("qwen_relay_generated_tokens_total") == 3
    assert second.registry.get_sample_value("qwen_relay_generated_tokens_total") == 0
