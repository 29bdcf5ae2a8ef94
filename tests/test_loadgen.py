"""The load generator: its bookkeeping, and a bounded loaded run that survives a slice being killed mid-run."""

from __future__ import annotations

import asyncio

import pytest

from qwen_relay.bench.loadgen import (
    Endpoint,
    FaultPlan,
    LoadConfig,
    LoadReport,
    RequestResult,
    distinct_requests,
    kill_slice,
    make_requests,
    percentile,
    run_load,
)


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)
    assert percentile([5.0, 1.0, 3.0], 100) == 5.0


def test_requests_are_seeded_bounded_and_cycle_through_distinct_prompts():
    config = LoadConfig(requests=10, concurrency=2, distinct=3, prompt_tokens=(2, 5), max_new_tokens=(4, 6), seed=7)
    requests = make_requests(config, vocab_size=50)
    assert requests == make_requests(config, vocab_size=50)
    assert requests != make_requests(LoadConfig(requests=10, concurrency=2, distinct=3, seed=8), vocab_size=50)
    assert [r.key for r in requests] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for r in requests:
        assert 2 <= len(r.prompt_token_ids) <= 5 and 4 <= r.max_new_tokens <= 6
        assert all(0 <= t < 50 for t in r.prompt_token_ids)
        assert r.to_proto().temperature == 0  # greedy, so every answer is known in advance
    assert [r.index for r in distinct_requests(requests)] == [0, 1, 2]
    with pytest.raises(ValueError):
        LoadConfig(max_new_tokens=(5, 2))


def test_report_counts_lost_and_wrong_and_renders_markdown():
    results = [
        RequestResult(0, 0, "OK", latency=1.0, ttft=0.1, tokens=[1, 2], finish_reason="FINISH_REASON_LENGTH",
                      wrong=False, started=0.0),
        RequestResult(1, 1, "OK", latency=2.0, ttft=0.2, tokens=[3], finish_reason="FINISH_REASON_EOS",
                      wrong=True, started=0.5),
        RequestResult(2, 0, "OK", latency=1.5, tokens=[1], started=0.5),  # stream ended with no final chunk
        RequestResult(3, 1, "UNAVAILABLE", latency=0.5, error="down", started=1.0),
        RequestResult(4, 0, "NOT_SENT"),
    ]
    report = LoadReport(LoadConfig(requests=5, concurrency=2), results, wall=2.5, verify="baseline")
    assert report.codes == {"OK": 3, "UNAVAILABLE": 1, "NOT_SENT": 1}
    assert report.lost == 3 and report.wrong == 1 and report.checked == 2
    summary = report.summary()
    assert summary["latency_max"] == 2.0 and summary["tokens"] == 4
    table = report.to_markdown()
    assert "| lost (no final chunk) | 3 |" in table
    assert "1 of 2 checked (expected: baseline)" in table


def test_cli_registers_loadtest():
    from qwen_relay.bench.loadgen import run_loadtest
    from qwen_relay.server.cli import build_parser

    args = build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--max-new-tokens", "8-12",
                                      "--kill-after-requests", "3"])
    assert args.func is run_loadtest
    assert args.max_new_tokens == (8, 12) and args.requests == 200 and args.concurrency == 16
    with pytest.raises(ValueError, match="--kill-slice needs --model"):
        run_loadtest(build_parser().parse_args(["loadtest", "--target", "127.0.0.1:1", "--kill-slice", "0"]))


@pytest.mark.slow
def test_forty_requests_survive_a_slice_killed_mid_run(ray_relay, tiny_model, reference):
    """40 streams at concurrency 8; slice 0's process is SIGKILLed once 10 have ended: none lost or changed."""
    config = LoadConfig(requests=40, concurrency=8, distinct=8, prompt_tokens=(4, 24), max_new_tokens=(16, 32),
                        seed=1, time_limit=240, request_timeout=200)
    requests = make_requests(config, vocab_size=ray_relay.config.vocab_size)
    expected = {r.key: reference(tiny_model, list(r.prompt_token_ids), r.max_new_tokens)
                for r in distinct_requests(requests)}
    fault = FaultPlan(kill_slice(ray_relay.pipeline, 0, "sigkill"), after_requests=10)

    report = asyncio.run(run_load(Endpoint(f"127.0.0.1:{ray_relay.port}"), requests, config, expected=expected,
                                  fault=fault, verify="reference"))

    print(report.to_markdown())
    assert report.fault is not None and not report.fault.error, report.fault
    assert report.fault.in_flight > 0 and report.fault.completed >= 10  # it struck mid-run
    assert report.summary()["spanning_fault"] > 0
    assert report.codes == {"OK": 40}, [r.error for r in report.results if r.code != "OK"][:3]
    assert report.lost == 0
    assert report.checked == 40 and report.wrong == 0
    assert report.restarts_after[0] == report.restarts_before[0] + 1
    assert report.health_after == "SERVING"
