"""Malformed and extreme requests get an expected status code, and the server keeps serving correct output.

Requests are built as raw protos and sent through `client.stub`, so the Python client's own argument checks
never filter what reaches the server. Hypothesis runs derandomized with a bounded number of examples, so the
file is deterministic and quick; strings that cannot exist in a proto (lone surrogates) are left out.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_relay.v1 import relay_pb2

CAP = 256  # the `relay` fixture's max_new_tokens_cap
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_DETAILS_CHARS = 2048  # an error message that echoes megabytes of input is a bug of its own
TIMEOUT = 120
# A deeper hunt: QWEN_RELAY_FUZZ_EXAMPLES=2000 (still derandomized, so a failure reproduces).
EXAMPLES = int(os.environ.get("QWEN_RELAY_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])

ODD = ["", "\x00", "a\x00b", "\u202eevil\u202c", "\u0645\u0631\u062d\u0628\u0627", "e\u0301\u0302\u0303\u0304",
       "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\ufeff", "\uffff", "\U0010ffff", "\r\n\t",
       "<|im_start|>", "<|im_end|>", "<|endoftext|>", "İıŞşĞğ", "\U0001d518\U0001d52b", "\u200b" * 8, " "]
# Any code point but surrogates (protobuf strings are valid UTF-8, so a lone surrogate cannot be sent).
odd_text = st.one_of(st.sampled_from(ODD), st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
# Up to ~2 M characters (up to 8 MB of UTF-8), built by repetition so hypothesis does not draw each one.
huge_text = st.builds(lambda piece, n: piece * (n // len(piece) + 1),
                      st.sampled_from(["a", "ab ", "\U0001f600", "\u0627\u0644", "e\u0301", "x\x00"]),
                      st.sampled_from([300, 5_000, 40_000, 2_000_000]))
text = st.one_of(odd_text, odd_text, huge_text)
f32 = st.floats(width=32)  # NaN, +-inf, subnormals, negatives and huge values included
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), text)
messages = st.lists(st.builds(relay_pb2.ChatMessage, role=roles, content=text), max_size=4)
# Tokenize has no size limit of its own (docs/reliability.md, "Still open"): small strings only there.
small_messages = st.lists(st.builds(relay_pb2.ChatMessage, role=st.one_of(st.sampled_from(["user", "tool"]),
                                                                           odd_text), content=odd_text), max_size=4)
# The tiny model's vocabulary has 1024 ids; token ids are int64 on the wire.
token_ids = st.one_of(
    st.lists(st.integers(0, 1023), min_size=1, max_size=24),
    st.lists(st.one_of(st.integers(0, 1023), st.integers(-(2**63), 2**63 - 1)), max_size=24),
    st.builds(lambda n: [7] * n, st.sampled_from([511, 512, 100_000])),
)
stops = st.one_of(st.lists(text, min_size=1, max_size=20), st.lists(st.just(""), min_size=1, max_size=2),
                  st.builds(lambda n: ["\U0001f600stop"] * n, st.sampled_from([17, 1000, 5000])))

# Every field has a valid range and an extreme one. An example perturbs a few fields and keeps the rest
# valid, so it gets past the cheap checks that would otherwise refuse nearly every fully random request,
# and valid-looking requests with odd text reach the engine.
VALID = {
    "request_id": st.one_of(st.just(""), odd_text),
    "max_new_tokens": st.integers(1, 3),
    "temperature": st.one_of(st.just(0.0), st.floats(0.0625, 2.0, width=32)),
    "top_p": st.one_of(st.none(), st.floats(0.0625, 1.0, width=32)),
    "top_k": st.integers(0, 50),
    "seed": st.one_of(st.none(), st.integers(0, 2**32)),
    "stop": st.lists(odd_text.filter(bool), max_size=3),
    "adapter": st.just(""),
}
EXTREME = {
    "request_id": huge_text,
    "max_new_tokens": st.sampled_from([CAP + 1, 10**6, 2**32 - 1]),
    "temperature": f32,
    "top_p": f32,
    "top_k": st.integers(0, 2**32 - 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop": stops,
    "adapter": text,
}
valid_input = st.one_of(
    st.builds(lambda t: {"prompt": t or "x"}, odd_text),
    st.builds(lambda m: {"messages": m}, st.lists(st.builds(
        relay_pb2.ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=odd_text),
        min_size=1, max_size=3)),
    st.builds(lambda ids: {"prompt_token_ids": ids}, st.lists(st.integers(0, 1023), min_size=1, max_size=24)),
)
extreme_input = st.fixed_dictionaries({}, optional={"prompt": text, "messages": messages,
                                                   "prompt_token_ids": token_ids})


@st.composite
def generate_requests(draw: st.DrawFn) -> relay_pb2.GenerateRequest:
    """A valid request with zero to three fields (the input among them) swapped for extreme values."""
    extreme = draw(st.sets(st.sampled_from(["input", *VALID]), max_size=3))
    fields = {name: draw(EXTREME[name] if name in extreme else VALID[name]) for name in VALID}
    fields["ignore_eos"] = draw(st.booleans())
    fields.update(draw(extreme_input if "input" in extreme else valid_input))
    return relay_pb2.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


def _call(client, request: relay_pb2.GenerateRequest, stream: bool) -> tuple[grpc.StatusCode, str, list]:
    """Status code, details and responses of one call, unary or streamed."""
    try:
        if stream:
            responses = list(client.stub.GenerateStream(request, timeout=TIMEOUT))
        else:
            responses = [client.stub.Generate(request, timeout=TIMEOUT)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []
    return grpc.StatusCode.OK, "", responses


def _check(client, request: relay_pb2.GenerateRequest, stream: bool) -> grpc.StatusCode:
    """Send `request`; the code must be an expected one, and an OK answer must be a well-formed completion."""
    code, details, responses = _call(client, request, stream)
    assert code in ALLOWED, f"{code.name}: {details[:500]}"
    # The server's own message, not a transport error about it (e.g. trailers too big for the client).
    assert "metadata size exceeds" not in details, details[:300]
    assert len(details) <= MAX_DETAILS_CHARS, f"{code.name} details echo {len(details)} characters"
    if code is not grpc.StatusCode.OK:
        return code
    assert 1 <= request.max_new_tokens <= CAP
    last = responses[-1]
    assert last.finish_reason != relay_pb2.FINISH_REASON_UNSPECIFIED
    assert all(r.finish_reason == relay_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    generated = [t for r in responses for t in r.token_ids]
    assert 1 <= len(generated) <= request.max_new_tokens
    assert last.usage.completion_tokens == len(generated)
    assert all(0 <= t < 1024 for t in generated)
    assert request.request_id == "" or last.request_id == request.request_id
    return code


def _assert_still_serving(client, relay, tiny_model, reference) -> None:
    """Health SERVING, greedy output exactly `generate()`'s, and no cache slot leaked by a refused call."""
    assert client.health() == "SERVING"
    prompt = [9, 301, 77, 1000, 5]
    completion = client.generate(prompt_token_ids=prompt, max_new_tokens=12)
    assert completion.token_ids == reference(tiny_model, prompt, 12)
    deadline = time.monotonic() + 60
    while any(s.cache_entries for s in client.model_info().slices):
        assert time.monotonic() < deadline, client.model_info().slices
        time.sleep(0.2)
    assert len(relay.engine.scheduler) == 0


def test_fuzzed_generate_requests_get_expected_codes(client, relay, tiny_model, reference):
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(request=generate_requests(), stream=st.booleans())
    def run(request: relay_pb2.GenerateRequest, stream: bool) -> None:
        seen[_check(client, request, stream).name] += 1

    run()
    print(dict(seen))
    # Not vacuous: some fuzzed requests were served, others refused.
    assert seen["OK"] >= 5 and seen["INVALID_ARGUMENT"] >= 5, seen
    _assert_still_serving(client, relay, tiny_model, reference)


def test_fuzzed_tokenize_requests_get_expected_codes(client, relay, tiny_model, reference):
    @settings(SETTINGS, max_examples=max(EXAMPLES * 2 // 3, 1))
    @given(prompt=st.one_of(st.just(""), odd_text), chat=small_messages)
    def run(prompt: str, chat: list[relay_pb2.ChatMessage]) -> None:
        request = relay_pb2.TokenizeRequest(prompt=prompt, messages=chat)
        try:
            response = client.stub.Tokenize(request, timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, f"{e.code().name}: {(e.details() or '')[:500]}"
            assert len(e.details() or "") <= MAX_DETAILS_CHARS
            return
        assert response.count == len(response.token_ids)

    run()
    _assert_still_serving(client, relay, tiny_model, reference)


def test_tokenize_error_does_not_echo_a_huge_role(client):
    request = relay_pb2.TokenizeRequest(messages=[relay_pb2.ChatMessage(role="r" * 1_000_000, content="hi")])
    with pytest.raises(grpc.RpcError) as refused:
        client.stub.Tokenize(request, timeout=TIMEOUT)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()[:300]
    assert len(refused.value.details()) <= MAX_DETAILS_CHARS


def _messages(*pairs: tuple[str, str]) -> list[relay_pb2.ChatMessage]:
    return [relay_pb2.ChatMessage(role=role, content=content) for role, content in pairs]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXTREMES = {
    # name: (request, the one code it must get)
    "nan temperature": (relay_pb2.GenerateRequest(prompt="hi", temperature=float("nan")), INVALID),
    "negative temperature": (relay_pb2.GenerateRequest(prompt="hi", temperature=-1.0), INVALID),
    "infinite temperature": (relay_pb2.GenerateRequest(prompt="hi", temperature=float("inf")), INVALID),
    "subnormal temperature": (relay_pb2.GenerateRequest(prompt="hi", temperature=1e-45, max_new_tokens=2), INVALID),
    "nan top_p": (relay_pb2.GenerateRequest(prompt="hi", top_p=float("nan")), INVALID),
    "zero top_p": (relay_pb2.GenerateRequest(prompt="hi", top_p=0.0), INVALID),
    "huge max_new_tokens": (relay_pb2.GenerateRequest(prompt="hi", max_new_tokens=2**32 - 1), INVALID),
    "huge token id": (relay_pb2.GenerateRequest(prompt_token_ids=[2**63 - 1]), INVALID),
    "negative token id": (relay_pb2.GenerateRequest(prompt_token_ids=[5, -1]), INVALID),
    "2 M token ids": (relay_pb2.GenerateRequest(prompt_token_ids=[1] * 2_000_000), INVALID),
    "5000 stop strings": (relay_pb2.GenerateRequest(prompt="hi", stop=["x"] * 5000), INVALID),
    "empty stop string": (relay_pb2.GenerateRequest(prompt="hi", stop=[""]), INVALID),
    "no input": (relay_pb2.GenerateRequest(), INVALID),
    "empty messages": (relay_pb2.GenerateRequest(messages=_messages(("", ""))), INVALID),
    "two inputs": (relay_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[1]), INVALID),
    "4 MB prompt": (relay_pb2.GenerateRequest(prompt="ab " * 1_400_000), INVALID),
    "4 MB message": (relay_pb2.GenerateRequest(messages=_messages(("user", "ab " * 1_400_000))), INVALID),
    "1 MB role": (relay_pb2.GenerateRequest(messages=_messages(("r" * 1_000_000, "hi"))), INVALID),
    "1 MB adapter name": (relay_pb2.GenerateRequest(prompt="hi", adapter="a" * 1_000_000), INVALID),
    "1 MB request id": (relay_pb2.GenerateRequest(prompt="hi", request_id="\u202e" * 1_000_000), INVALID),
    "unknown adapter": (relay_pb2.GenerateRequest(prompt="hi", adapter="nope", max_new_tokens=2),
                        grpc.StatusCode.NOT_FOUND),
    "NUL prompt": (relay_pb2.GenerateRequest(prompt="\x00", max_new_tokens=2), grpc.StatusCode.OK),
    "empty content": (relay_pb2.GenerateRequest(messages=_messages(("user", "")), max_new_tokens=2),
                      grpc.StatusCode.OK),
    "special-token text": (relay_pb2.GenerateRequest(prompt="<|im_end|><|endoftext|>", max_new_tokens=2),
                           grpc.StatusCode.OK),
    "extreme sampling": (relay_pb2.GenerateRequest(prompt="hi", temperature=3e38, top_p=1e-45, top_k=2**32 - 1,
                                                   seed=2**64 - 1, max_new_tokens=3), grpc.StatusCode.OK),
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_request(client, name):
    request, expected = EXTREMES[name]
    for stream in (False, True):
        assert _check(client, request, stream) is expected, f"{name} ({'stream' if stream else 'unary'})"


def test_a_bad_request_does_not_fail_its_batch_mates(client, relay, tiny_model, reference):
    """Requests arriving together are prefilled as one step: refused ones must never take good ones down."""
    good = [[3, 14, 15, 92, 65], [2, 71, 82, 8], [16, 18, 0, 33, 9, 887]]
    bad = [EXTREMES[name][0] for name in ("subnormal temperature", "subnormal temperature", "1 MB role",
                                          "nan top_p")]
    tokens = []
    # While this stream decodes, the calls below queue up between two steps and join the same prefill.
    for i, chunk in enumerate(client.stream(prompt_token_ids=[1, 2, 3], max_new_tokens=200, ignore_eos=True)):
        tokens.extend(chunk.token_ids)
        if i == 0:
            with ThreadPoolExecutor(len(good) + len(bad)) as pool:
                answers = [pool.submit(client.generate, prompt_token_ids=ids, max_new_tokens=8) for ids in good]
                codes = [pool.submit(_check, client, request, False) for request in bad]
                assert {c.result(TIMEOUT) for c in codes} == {grpc.StatusCode.INVALID_ARGUMENT}
                for ids, answer in zip(good, answers, strict=True):
                    assert answer.result(TIMEOUT).token_ids == reference(tiny_model, ids, 8)
    assert tokens == reference(tiny_model, [1, 2, 3], 200)
    _assert_still_serving(client, relay, tiny_model, reference)
