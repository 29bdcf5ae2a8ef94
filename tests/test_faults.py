"""A slice that dies mid-generation loses nothing: Ray restarts it, the gateway replays, output is exact."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from transformers import AutoTokenizer

from qwen_relay.client import RelayClient

pytestmark = pytest.mark.slow  # Ray actors killed for real (the in-process fault tests: test_engine_faults.py)

PROMPTS = ["The quick brown fox", "Merhaba! Nasıl yardımcı olabilirim?", "def add(a, b):", "İstanbul",
           "Once upon a time", "1 2 3 4 5", "Ray actors", "gRPC streams"]
MAX_NEW = 60


def _kill(relay, index: int, how: str) -> None:
    actor = relay.pipeline.actors[index]
    if how == "ray.kill":
        ray.kill(actor, no_restart=False)
    else:  # the process dies at once, as with os._exit inside the actor: no cleanup, no goodbye
        os.kill(ray.get(actor.stats.remote()).pid, signal.SIGKILL)


def test_stream_survives_a_slice_dying(ray_relay, tiny_model, reference, wait_caches_empty):
    """The last slice's process dies mid-stream. (ray.kill of the first slice: the batch test below.)"""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=180) as client:
        restarts_before = [s.restarts for s in client.model_info().slices]
        tokens: list[int] = []
        for chunk in client.stream(prompt_token_ids=prompt_ids, max_new_tokens=MAX_NEW, ignore_eos=True):
            tokens.extend(chunk.token_ids)
            if len(tokens) == 10:
                _kill(ray_relay, 1, "process-exit")
        assert tokens == reference(tiny_model, prompt_ids, MAX_NEW)
        info = client.model_info()
        assert info.slices[1].restarts == restarts_before[1] + 1
        assert all(s.healthy for s in info.slices)
        assert client.health() == "SERVING"
        wait_caches_empty(client)


def test_batch_of_eight_survives_a_slice_dying(ray_relay, tiny_model, reference, wait_caches_empty):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    progress = threading.Barrier(len(prompts) + 1)

    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=180) as client:
        def run(ids: list[int]) -> list[int]:
            tokens: list[int] = []
            for chunk in client.stream(prompt_token_ids=ids, max_new_tokens=MAX_NEW, ignore_eos=True):
                tokens.extend(chunk.token_ids)
                if len(tokens) == 5:
                    progress.wait(60)  # every call is mid-generation before the kill
            return tokens

        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(run, ids) for ids in prompts]
            progress.wait(60)
            _kill(ray_relay, 0, "ray.kill")
            results = [f.result(240) for f in futures]
        for ids, tokens in zip(prompts, results, strict=True):
            assert tokens == reference(tiny_model, ids, MAX_NEW)
        wait_caches_empty(client)


def test_slice_that_does_not_return_in_time_fails_calls_unavailable_then_recovers(ray_relay, monkeypatch,
                                                                                 wait_caches_empty):
    """Recovery timeout shorter than a restart: in-flight and new calls get UNAVAILABLE; then it comes back.
    The shared relay waits 120 s for a lost slice; here its engine is given 0.5 s (`--recovery-timeout 0.5`)."""
    engine = ray_relay.engine
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, recovery_timeout=0.5))
    reported: list[bool] = []  # every health change the engine reports, however fast the restart is
    engine.health_changed.subscribe(reported.append)
    try:
        _fail_then_recover(ray_relay, reported, wait_caches_empty)
    finally:
        engine.health_changed.unsubscribe(reported.append)


def _fail_then_recover(ray_relay, reported: list[bool], wait_caches_empty) -> None:
    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=60) as client:
        with pytest.raises(grpc.RpcError) as failed:
            for i, _ in enumerate(client.stream(prompt="Merhaba", max_new_tokens=200, ignore_eos=True)):
                if i == 3:
                    _kill(ray_relay, 1, "process-exit")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not come back" in failed.value.details()
        assert reported[0] is False  # NOT_SERVING from the lost step on (refusals while down: test_engine_faults)
        deadline = time.monotonic() + 120
        while client.health() != "SERVING":
            assert time.monotonic() < deadline, "the relay did not recover by itself"
            time.sleep(0.2)
        assert client.generate(prompt="Merhaba", max_new_tokens=4).completion_tokens == 4
        assert reported == [False, True]
        wait_caches_empty(client)
