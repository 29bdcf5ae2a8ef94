"""Prometheus metrics, scraped over HTTP from a relay of two Ray slices while real requests run."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

GENERATE = "qwen_relay.v1.TextGeneration/Generate"
STREAM = "qwen_relay.v1.TextGeneration/GenerateStream"
SLICES = ("0", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def metered(relay_factory, tiny_model):
    from qwen_relay.server.app import ServeOptions

    relay = relay_factory(ServeOptions(model=str(tiny_model), shards=2, max_context=512, max_new_tokens_cap=512,
                                       metrics_port=_free_port()))
    assert relay.metrics.port == relay.options.metrics_port
    return relay


def _settled(port: int, timeout: float = 10.0) -> Scrape:
    """A scrape once every slice has dropped its caches (a release reaches the actors asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(port)
        if all(scrape["qwen_relay_kv_cache_entries", {"slice": i}] == 0 for i in SLICES) or \
                time.monotonic() > deadline:
            return scrape
        time.sleep(0.1)


def test_metrics_follow_requests(metered):
    from qwen_relay.client import RelayClient

    port = metered.options.metrics_port
    before = _settled(port)
    with RelayClient(f"127.0.0.1:{metered.port}", timeout=120) as client:
        completions = [client.generate("hello there", max_new_tokens=n, ignore_eos=True) for n in (4, 6)]
        chunks = list(client.stream("streamed", max_new_tokens=5, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as bad:
            client.generate("hello", top_p=2.0)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # While a long stream is open: one active sequence, holding a cache entry in every slice.
        stream = client.stream("a long one", max_new_tokens=500, ignore_eos=True)
        next(stream)
        during = Scrape(port)
        stream.close()  # cancels the call: the server frees the slot

        info = client.model_info()
    after = _settled(port)

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

    assert during["qwen_relay_active_sequences"] == 1 or during["qwen_relay_queue_depth"] == 1
    assert all(during["qwen_relay_kv_cache_entries", {"slice": i}] == 1 for i in SLICES)
    for i in SLICES:
        assert after["qwen_relay_kv_cache_entries", {"slice": i}] == 0
        assert after["qwen_relay_slice_healthy", {"slice": i}] == 1
        assert delta("qwen_relay_slice_forward_seconds_total", slice=i) > 0
    assert after["qwen_relay_active_sequences"] == 0 and after["qwen_relay_queue_depth"] == 0
    assert after["qwen_relay_hop_transfer_seconds_total"] >= 0

    assert [(s.index, s.healthy, s.restarts) for s in info.slices] == [(0, True, 0), (1, True, 0)]


def test_slice_restarts_are_counted_once(metered):
    port = metered.options.metrics_port
    before = Scrape(port)
    metered.metrics.slice_restarted(1)
    after = Scrape(port)
    assert after["qwen_relay_slice_restarts_total", {"slice": "1"}] - \
        before["qwen_relay_slice_restarts_total", {"slice": "1"}] == 1
    # The pipeline reporting the same restart in its stats does not count it again.
    metered.metrics._update_from([{"restarts": 0}, {"restarts": int(after["qwen_relay_slice_restarts_total",
                                                                            {"slice": "1"}])}])
    assert Scrape(port)["qwen_relay_slice_restarts_total", {"slice": "1"}] == \
        after["qwen_relay_slice_restarts_total", {"slice": "1"}]


def test_metrics_registries_are_per_relay():
    from qwen_relay.server.metrics import Metrics

    first, second = Metrics(), Metrics()
    first.generated_tokens.inc(3)
    assert first.registry.get_sample_value("qwen_relay_generated_tokens_total") == 3
    assert second.registry.get_sample_value("qwen_relay_generated_tokens_total") == 0
