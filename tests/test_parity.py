"""The contract: served greedy output is token-for-token `generate()` on the whole model (fp32), for any
split, every input kind, batched or not, with one or several steps in flight, through both RPCs.

Every split runs in-process (the fast tier: the same slices, engine and gRPC server, without Ray). On Ray
actors (slow): the shared 2-slice relay here; 3 slices (0-0,1-3,4-4) through a relay in tests/test_adapters.py;
the untied, multi-file checkpoint in 2 and 3 slices in tests/test_pipelining.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from qwen_relay.client import RelayClient
from qwen_relay.server.app import ServeOptions

MAX_NEW = 24
PROMPTS = [
    "Merhaba! Nasıl yardımcı olabilirim?",
    "The quick brown fox",
    "def add(a, b):\n    return a + b\n",
    "İstanbul'da hava bugün çok güzel, değil mi?",
]
MESSAGES = [
    [{"role": "user", "content": "Merhaba"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
]

# (model fixture, shards, explicit layers) over a 5-layer model: 1-4 slices, even and uneven.
SPLITS = [
    ("tiny_model", 1, None),
    ("tiny_model", 2, None),
    ("tiny_model", 3, None),
    ("tiny_model", 4, None),
    ("tiny_model", None, "0-0,1-3,4-4"),
    ("untied_model", 2, None),
    ("untied_model", None, "0-3,4-4"),
]


def _split_id(split: tuple) -> str:
    model, shards, layers = split
    return f"{model.split('_')[0]}-{shards or layers}"


def _inputs(tokenizer) -> list[tuple[dict, list[int]]]:
    """(request kwargs, prompt ids the server should see) for every input kind."""
    cases = [({"prompt": p}, tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    for messages in MESSAGES:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        cases.append(({"messages": messages}, tokenizer.encode(text, add_special_tokens=False)))
    ids = [5, 17, 300, 42, 7, 999, 3]
    cases.append(({"prompt_token_ids": ids}, ids))
    return cases


def _check_parity(relay, model_dir, reference, batched: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = _inputs(tokenizer)
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as client:
        def run(case):
            return client.generate(**case[0], max_new_tokens=MAX_NEW)

        if batched:  # all requests in flight at once: they are decoded together
            with ThreadPoolExecutor(len(cases)) as pool:
                results = list(pool.map(run, cases))
        else:
            results = [run(case) for case in cases]
        for (kwargs, prompt_ids), result in zip(cases, results, strict=True):
            expected = reference(model_dir, prompt_ids, MAX_NEW)
            assert result.prompt_tokens == len(prompt_ids), kwargs
            assert result.token_ids == expected, kwargs
            assert result.text == tokenizer.decode(expected, skip_special_tokens=True)

        # The stream, concatenated, is the unary response.
        kwargs, _ = cases[0]
        chunks = list(client.stream(**kwargs, max_new_tokens=MAX_NEW))
        assert "".join(c.text for c in chunks) == results[0].text
        assert [t for c in chunks for t in c.token_ids] == results[0].token_ids
        assert chunks[-1].finish_reason == results[0].finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("in_flight", [1, 16], ids=["one-step-in-flight", "step-per-slice-in-flight"])
@pytest.mark.parametrize(("model_fixture", "shards", "layers"), SPLITS, ids=[_split_id(s) for s in SPLITS])
def test_parity_for_every_split(request, relay_factory, reference, model_fixture, shards, layers, in_flight):
    model_dir = request.getfixturevalue(model_fixture)
    relay = relay_factory(ServeOptions(model=str(model_dir), shards=shards or 1, layers=layers, max_context=512,
                                       use_ray=False, max_in_flight=in_flight))
    assert relay.engine.depth == min(in_flight, len(relay.ranges))
    _check_parity(relay, model_dir, reference, batched=True)
    if in_flight == 1:  # a lone request is one step in flight whatever the depth
        _check_parity(relay, model_dir, reference, batched=False)


@pytest.mark.slow
def test_parity_on_ray_actors(ray_relay, tiny_model, reference):
    """The shared 2-slice Ray relay (tests/conftest.py), as every split's in-process relay above."""
    assert ray_relay.engine.depth == len(ray_relay.ranges) == 2
    _check_parity(ray_relay, tiny_model, reference, batched=True)


def test_requests_join_a_running_batch(relay, tiny_model, reference):
    """Continuous batching: a request that arrives mid-generation joins between steps; both stay exact."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    long_ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    short_ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as client:
        started = threading.Event()
        long_tokens: list[int] = []

        def run_long() -> None:
            for chunk in client.stream(prompt_token_ids=long_ids, max_new_tokens=80, ignore_eos=True):
                long_tokens.extend(chunk.token_ids)
                if len(long_tokens) >= 5:
                    started.set()

        thread = threading.Thread(target=run_long)
        thread.start()
        assert started.wait(60)
        short = client.generate(prompt_token_ids=short_ids, max_new_tokens=MAX_NEW)
        assert len(long_tokens) < 80  # the short one really overlapped the long one
        thread.join(120)
    assert short.token_ids == reference(tiny_model, short_ids, MAX_NEW)
    assert long_tokens == reference(tiny_model, long_ids, 80)[: len(long_tokens)]
    assert len(long_tokens) == 80
