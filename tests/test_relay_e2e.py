"""Acceptance tests of the relay, end to end: the real `grpc.aio` gateway on loopback, real local Ray actors.

Every test reuses the `relay` fixture (the tiny model in 2 slices), so one relay serves the whole file.
Requests the Python client would refuse client-side go through `client.stub` as raw protos.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from transformers import AutoTokenizer

from qwen_relay.client import RelayClient
from qwen_relay.v1 import relay_pb2

SERVICE = "qwen_relay.v1.TextGeneration"
CAP = 256  # the `relay` fixture's max_new_tokens_cap
MAX_CONTEXT = 512  # and its max_context
NUM_LAYERS = 5  # conftest.NUM_LAYERS
VOCAB = 1024  # the tiny checkpoint's vocabulary
TIMEOUT = 120
FOX = "The quick brown fox"
PROMPTS = [
    FOX,
    "Merhaba! Nasıl yardımcı olabilirim?",
    "def add(a, b):\n    return a + b\n",
    "İstanbul'da hava bugün çok güzel, değil mi?",
    "Once upon a time",
    "Hello",
    "a b c d",
    "DOĞAL ĞÜŞİÖÇ ’",
]
# The tiny model's tied embeddings make it copy a recent token: after [5, <|im_end|>] greedy picks <|im_end|>,
# one of the checkpoint's EOS ids (asserted against `generate()` in the test that uses it).
EOS_PROMPT = [5, 1023]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a call expected to fail (a stream is read to its end)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded but should have failed")



def _steps(relay) -> float:
    """Engine steps taken so far (each step runs every slice once)."""
    return relay.metrics.registry.get_sample_value("qwen_relay_step_seconds_count") or 0.0


def _stop_in_middle(text: str, length: int = 6) -> str:
    """A substring of `text` from near its middle whose first occurrence is where it was taken (so the
    expected output is a non-empty prefix), without U+FFFD."""
    for k in range(len(text) // 2, 0, -1):
        stop = text[k:k + length]
        if len(stop) == length and "\ufffd" not in stop and text.find(stop) == k and stop.strip():
            return stop
    raise AssertionError(f"no usable stop sequence in {text!r}")


# ------------------------------------------------------------------------------------------- discovery


def test_health_serving_once_loaded(client):
    assert client.health("") == "SERVING"
    assert client.health(SERVICE) == "SERVING"
    # An unknown service is NOT_FOUND (the health servicer only knows what the relay registered).
    assert _code(client.health, "qwen_relay.v1.NoSuchService")[0] == grpc.StatusCode.NOT_FOUND
    # The raw protocol too, not only the client's wrapper.
    from grpc_health.v1 import health_pb2_grpc

    raw = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                           timeout=TIMEOUT)
    assert raw.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_services(client):
    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {SERVICE, "qwen_relay.v1.AdapterAdmin", "grpc.health.v1.Health"} <= services, services
    assert any(s.startswith("grpc.reflection.") for s in services), services
    # The descriptors resolve, with the methods and message fields grpcurl users would see.
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "Tokenize", "GetModelInfo"}
    assert service.methods_by_name["GenerateStream"].server_streaming
    request = pool.FindMessageTypeByName("qwen_relay.v1.GenerateRequest")
    assert {"prompt", "messages", "prompt_token_ids", "max_new_tokens", "stop", "seed"} <= set(
        request.fields_by_name)


def test_model_info_layout(client):
    info = client.model_info()
    assert info.num_layers == NUM_LAYERS
    assert info.vocab_size == VOCAB
    assert info.max_context == MAX_CONTEXT
    assert info.max_new_tokens_cap == CAP
    assert info.dtype == "float32"
    slices = info.slices
    assert len(slices) == 2
    # Contiguous, in order, covering every layer exactly once.
    assert [s.index for s in slices] == list(range(len(slices)))
    assert slices[0].first_layer == 0
    assert slices[-1].last_layer == NUM_LAYERS - 1
    for a, b in zip(slices, slices[1:], strict=False):
        assert b.first_layer == a.last_layer + 1
    assert all(s.first_layer <= s.last_layer for s in slices)
    assert [s.has_embeddings for s in slices] == [True] + [False] * (len(slices) - 1)
    assert [s.has_lm_head for s in slices] == [False] * (len(slices) - 1) + [True]
    assert all(s.device == "cpu" for s in slices)
    assert all(s.weight_bytes > 0 for s in slices)
    assert all(s.healthy for s in slices)
    # The first slice holds the embedding (vocab x hidden fp32 = 1024 x 64 x 4 bytes) on top of its layers.
    assert slices[0].weight_bytes > VOCAB * 64 * 4


def test_tokenize_matches_tokenizer_and_chat_template(client, tokenizer):
    for prompt in PROMPTS:
        result = client.tokenize(prompt)
        expected = tokenizer.encode(prompt, add_special_tokens=False)
        assert result.token_ids == expected, prompt
        assert result.count == len(expected)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Merhaba, nasılsın?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    result = client.tokenize(messages=messages)
    assert result.token_ids == tokenizer.encode(text, add_special_tokens=False)
    # The generation prompt was added: the rendered chat ends by opening the assistant's turn.
    assert text.endswith("<|im_start|>assistant\n")
    assert result.token_ids.count(1022) == 3  # <|im_start|> (one special token) opens system, user, assistant
    code, details = _code(client.stub.Tokenize, relay_pb2.TokenizeRequest(), timeout=TIMEOUT)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details
    bad_role = relay_pb2.TokenizeRequest(messages=[relay_pb2.ChatMessage(role="wizard", content="hi")])
    code, details = _code(client.stub.Tokenize, bad_role, timeout=TIMEOUT)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role" in details
    # Input that cannot fit the context is refused before it is tokenized, as Generate refuses it.
    for huge, field in ((relay_pb2.TokenizeRequest(prompt="x" * (MAX_CONTEXT * 64 + 1)), "prompt"),
                        (relay_pb2.TokenizeRequest(messages=[relay_pb2.ChatMessage(
                            role="user", content="x" * (MAX_CONTEXT * 64 + 1))]), "messages")):
        code, details = _code(client.stub.Tokenize, huge, timeout=TIMEOUT)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


# ------------------------------------------------------------------------------------ generation options


def test_stop_sequence_unary_and_stream(client):
    full = client.generate(FOX, max_new_tokens=40, ignore_eos=True)
    assert full.finish_reason == "length"
    stop = _stop_in_middle(full.text)
    expected = full.text[: full.text.find(stop)]
    assert expected

    stopped = client.generate(FOX, max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert stopped.text == expected
    assert stopped.finish_reason == "stop_sequence"
    assert stop not in stopped.text
    # Generation really ended there: fewer tokens than the full run, and the same ones.
    assert stopped.completion_tokens < full.completion_tokens
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]

    chunks = list(client.stream(FOX, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    streamed = "".join(c.text for c in chunks)
    assert streamed == expected
    assert chunks[-1].finish_reason == "stop_sequence"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert all(stop not in c.text for c in chunks)
    assert [t for c in chunks for t in c.token_ids] == stopped.token_ids

    # A stop whose beginning keeps appearing but which never completes: the held-back text is released.
    never = stop + "\x00never"
    chunks = list(client.stream(FOX, max_new_tokens=40, ignore_eos=True, stop=[never]))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == "length"


def test_max_new_tokens_ends_with_length(client, tokenizer):
    for n in (1, 7):
        result = client.generate(FOX, max_new_tokens=n)
        assert result.finish_reason == "length"
        assert result.completion_tokens == n
        assert len(result.token_ids) == n
        assert result.prompt_tokens == len(tokenizer.encode(FOX, add_special_tokens=False))


def test_eos_and_ignore_eos(client, tiny_model, reference):
    # Precondition: the whole model, greedy, ends this prompt with EOS at once.
    assert reference(tiny_model, EOS_PROMPT, 8) == [1023]
    ended = client.generate(prompt_token_ids=EOS_PROMPT, max_new_tokens=8)
    assert ended.finish_reason == "eos"
    assert ended.token_ids == [1023]
    assert ended.completion_tokens == 1
    assert ended.text == ""  # the special token is not text

    ignored = client.generate(prompt_token_ids=EOS_PROMPT, max_new_tokens=8, ignore_eos=True)
    assert ignored.finish_reason == "length"
    assert ignored.completion_tokens == 8
    assert ignored.token_ids[0] == 1023


# ----------------------------------------------------------------------------------------- bad requests


def _bad_requests() -> list[tuple[str, relay_pb2.GenerateRequest, str]]:
    """(case, request, field its INVALID_ARGUMENT message must name)."""
    msg = relay_pb2.ChatMessage
    long_ids = [7] * 300  # 300 prompt tokens + 256 new > 512
    full_context = [7] * MAX_CONTEXT  # no room for a new token (the default is held to the room left)
    return [
        ("no input", relay_pb2.GenerateRequest(max_new_tokens=4), "prompt"),
        ("empty prompt", relay_pb2.GenerateRequest(prompt="", max_new_tokens=4), "prompt"),
        ("prompt and messages", relay_pb2.GenerateRequest(prompt="hi", messages=[msg(role="user", content="hi")]),
         "messages"),
        ("prompt and ids", relay_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[5]), "prompt_token_ids"),
        ("unknown role", relay_pb2.GenerateRequest(messages=[msg(role="user", content="a"),
                                                             msg(role="wizard", content="b")]), "role"),
        ("max_new_tokens over cap", relay_pb2.GenerateRequest(prompt="hi", max_new_tokens=CAP + 1),
         "max_new_tokens"),
        ("context overflow", relay_pb2.GenerateRequest(prompt_token_ids=long_ids, max_new_tokens=CAP),
         "max_new_tokens"),
        ("prompt fills the context", relay_pb2.GenerateRequest(prompt_token_ids=full_context), "prompt"),
        ("negative temperature", relay_pb2.GenerateRequest(prompt="hi", temperature=-0.5), "temperature"),
        ("NaN temperature", relay_pb2.GenerateRequest(prompt="hi", temperature=math.nan), "temperature"),
        ("top_p 0", relay_pb2.GenerateRequest(prompt="hi", temperature=1.0, top_p=0.0), "top_p"),
        ("top_p > 1", relay_pb2.GenerateRequest(prompt="hi", temperature=1.0, top_p=1.5), "top_p"),
        ("NaN top_p", relay_pb2.GenerateRequest(prompt="hi", temperature=1.0, top_p=math.nan), "top_p"),
        ("negative token id", relay_pb2.GenerateRequest(prompt_token_ids=[5, -1, 7]), "prompt_token_ids"),
        ("token id = vocab size", relay_pb2.GenerateRequest(prompt_token_ids=[VOCAB]), "prompt_token_ids"),
        ("huge token id", relay_pb2.GenerateRequest(prompt_token_ids=[5, 2**40]), "prompt_token_ids"),
    ]


def test_bad_requests_are_invalid_argument_and_server_keeps_serving(client, wait_caches_empty):
    before = client.generate(FOX, max_new_tokens=12)
    for case, request, field in _bad_requests():
        for method in (client.stub.Generate, client.stub.GenerateStream):
            code, details = _code(method, request, timeout=TIMEOUT)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, method, code, details)
            assert field in details, (case, details)

    request = relay_pb2.GenerateRequest(prompt="hi", max_new_tokens=4, adapter="no-such-adapter")
    for method in (client.stub.Generate, client.stub.GenerateStream):
        code, details = _code(method, request, timeout=TIMEOUT)
        assert code == grpc.StatusCode.NOT_FOUND, (code, details)
        assert "adapter" in details

    # Nothing invalid reached the engine: no cache was touched, and the server still answers correctly.
    wait_caches_empty(client)
    after = client.generate(FOX, max_new_tokens=12)
    assert after.token_ids == before.token_ids
    assert after.text == before.text
    assert client.health(SERVICE) == "SERVING"


# --------------------------------------------------------------------------------- cancel and deadlines


def test_cancelled_stream_frees_its_caches(client, relay, wait_caches_empty):
    reference_run = client.generate(FOX, max_new_tokens=10)
    steps_before = _steps(relay)
    stream = client.stream(FOX, max_new_tokens=200, ignore_eos=True)
    received = []
    for chunk in stream:
        received.extend(chunk.token_ids)
        if len(received) >= 3:
            break
    # While the stream is open its sequence holds a cache entry in every slice.
    during = client.model_info().slices
    stream.close()  # cancels the RPC
    assert all(s.cache_entries >= 1 for s in during), during
    wait_caches_empty(client)
    # Generation stopped early instead of running to 200 tokens for nobody.
    assert _steps(relay) - steps_before < 150
    assert received == reference_run.token_ids[: len(received)]
    again = client.generate(FOX, max_new_tokens=10)
    assert again.token_ids == reference_run.token_ids


def test_deadline_exceeded_frees_its_caches(client, relay, wait_caches_empty):
    # A deadline a quarter of what the whole generation takes here (the machine's speed varies).
    started = time.monotonic()
    client.generate(FOX, max_new_tokens=64, ignore_eos=True)
    deadline = min(0.5, max(0.05, (time.monotonic() - started) * CAP / 64 / 4))
    steps_before = _steps(relay)
    code, _ = _code(client.generate, FOX, max_new_tokens=CAP, ignore_eos=True, timeout=deadline)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_caches_empty(client)
    # The gateway gave up on the sequence: it did not generate all CAP tokens after the caller left.
    assert _steps(relay) - steps_before < CAP
    result = client.generate(FOX, max_new_tokens=5)
    assert result.finish_reason == "length" and result.completion_tokens == 5


# -------------------------------------------------------------------------------- sampling, concurrency


def test_seeded_sampling_is_reproducible(client):
    params = dict(max_new_tokens=30, ignore_eos=True, temperature=1.5, top_p=0.95, top_k=200)
    first = client.generate(FOX, seed=1234, **params)
    second = client.generate(FOX, seed=1234, **params)
    assert first.token_ids == second.token_ids
    assert first.text == second.text
    assert len(first.token_ids) == 30
    # The same seed through the stream, and several copies decoded in one batch, draw the same tokens.
    streamed = [t for c in client.stream(FOX, seed=1234, **params) for t in c.token_ids]
    assert streamed == first.token_ids
    with ThreadPoolExecutor(3) as pool:
        batched = list(pool.map(lambda _: client.generate(FOX, seed=1234, **params).token_ids, range(3)))
    assert batched == [first.token_ids] * 3
    # Sampling really samples: other seeds (and greedy) give other outputs.
    other = client.generate(FOX, seed=1235, **params)
    assert other.token_ids != first.token_ids
    greedy = client.generate(FOX, max_new_tokens=30, ignore_eos=True)
    assert greedy.token_ids != first.token_ids
    # top_k=1 is greedy whatever the temperature and seed.
    top1 = client.generate(FOX, max_new_tokens=30, ignore_eos=True, temperature=1.5, top_k=1, seed=99)
    assert top1.token_ids == greedy.token_ids


def test_concurrent_streams_equal_unary_greedy(client):
    unary = [client.generate(p, max_new_tokens=24, ignore_eos=True) for p in PROMPTS]

    def stream(prompt: str):
        chunks = list(client.stream(prompt, max_new_tokens=24, ignore_eos=True))
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streamed = list(pool.map(stream, PROMPTS))
    for prompt, expected, (text, token_ids, reason) in zip(PROMPTS, unary, streamed, strict=True):
        assert token_ids == expected.token_ids, prompt
        assert text == expected.text, prompt
        assert reason == "length"
    assert len({tuple(u.token_ids) for u in unary}) > 1  # the prompts really differ in output


@pytest.mark.slow
def test_model_info_names_each_slices_ray_actor_and_node(ray_relay):
    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=60) as client:
        slices = client.model_info().slices
    assert len({s.actor_id for s in slices}) == len(slices) == 2 and all(s.actor_id for s in slices)
    assert all(s.node_id for s in slices)
    assert all(s.healthy and s.weight_bytes > 0 for s in slices)
