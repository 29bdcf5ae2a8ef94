"""The OpenAI-compatible HTTP API: the official `openai` client and raw HTTP against a relay that serves gRPC
and HTTP from one process.

In-process tier: the tiny model in two in-process slices (LocalPipeline), a bearer token and a LoRA adapter.
HTTP output is checked against the gRPC API on the same relay and against `generate()` on the whole model.
The slow tier repeats parity and disconnect-cancellation with the slices on Ray actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import openai
import pytest
import torch
from test_security import pki as pki  # the certificates fixture, shared with the gRPC TLS tests
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_relay.client import RelayClient
from qwen_relay.server.app import Relay, ServeOptions
from qwen_relay.v1 import relay_pb2

TOKEN = "http-test-token"
MESSAGES = [{"role": "user", "content": "Merhaba! Nasıl yardımcı olabilirim?"}]
PROMPT = "The quick brown fox"
MAX_NEW = 24
CAP = 256
DRAIN_WAIT_S = 60  # bounded wait for caches to empty (as test_relay_e2e); the 2-core machine is shared
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter with random non-zero weights, as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    folder = tmp_path_factory.mktemp("adapter") / "all"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def relays(loop_thread) -> Iterator[Callable[[ServeOptions], Relay]]:
    """Starts in-process relays (no Ray) on free ports; stops them all at the end of the module."""
    started: list[Relay] = []

    def start(options: ServeOptions) -> Relay:
        relay = loop_thread.run(Relay.start(dataclasses.replace(options, port=0, http_port=0)))
        started.append(relay)
        return relay

    yield start
    for relay in started:
        loop_thread.run(relay.stop(grace=0))


@pytest.fixture(scope="module")
def relay(relays, tiny_model, adapter_dir) -> Relay:
    return relays(ServeOptions(model=str(tiny_model), layers="0-2,3-4", use_ray=False, max_context=512,
                               max_new_tokens_cap=CAP, auth_token=TOKEN, adapters={"all": str(adapter_dir)}))


@pytest.fixture(scope="module")
def oai(relay) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{relay.http_port}/v1", api_key=TOKEN, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def grpc_client(relay) -> Iterator[RelayClient]:
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120, auth_token=TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _post(port: int, path: str, body: dict | bytes | None, token: str | None = TOKEN,
          context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """Raw HTTP: status, headers and the whole body (a GET when there is no body)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=120))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn.request("GET" if body is None else "POST", path, body=data, headers=headers)
    response = conn.getresponse()
    out = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return out


def _events(body: bytes) -> list[str]:
    """SSE events' data fields, asserting the framing: every event is one `data: ...` line and a blank line."""
    text = body.decode()
    assert text.endswith("\n\n"), text[-80:]
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e.removeprefix("data: ") for e in events]


def _chat(model: str, **extra) -> dict:
    return {"model": model, "messages": MESSAGES, "max_tokens": MAX_NEW, "temperature": 0, **extra}


# ------------------------------------------------------------------------------------------- parity


def test_chat_greedy_equals_grpc_and_generate(relay, oai, grpc_client, tokenizer, tiny_model, reference):
    model = str(tiny_model)
    body = dict(messages=MESSAGES, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True})
    unary = oai.chat.completions.create(model=model, **body)
    grpc_run = grpc_client.generate(messages=MESSAGES, max_new_tokens=MAX_NEW, ignore_eos=True)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    expected = reference(tiny_model, prompt_ids, MAX_NEW)
    assert grpc_run.token_ids == expected
    with_ids = oai.chat.completions.create(model=model, **{**body, "extra_body": {"ignore_eos": True,
                                                                                  "return_token_ids": True}})
    assert with_ids.choices[0].model_extra["token_ids"] == expected  # token for token
    assert unary.choices[0].message.content == grpc_run.text
    assert unary.choices[0].message.role == "assistant"
    assert unary.choices[0].finish_reason == "length"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (len(prompt_ids), MAX_NEW)
    assert unary.usage.total_tokens == len(prompt_ids) + MAX_NEW

    # Streaming: the same text in the same pieces as the gRPC stream (whole characters, same bytes).
    pieces = [c.choices[0].delta.content for c in oai.chat.completions.create(model=model, stream=True, **body)
              if c.choices and c.choices[0].delta.content]
    grpc_pieces = [c.text for c in grpc_client.stream(messages=MESSAGES, max_new_tokens=MAX_NEW, ignore_eos=True)
                   if c.text]
    assert pieces == grpc_pieces
    assert "".join(pieces) == grpc_run.text and "\ufffd" not in grpc_run.text
    streamed_ids = [i for c in oai.chat.completions.create(
        model=model, stream=True, **{**body, "extra_body": {"ignore_eos": True, "return_token_ids": True}})
        for i in (c.choices[0].model_extra.get("token_ids", []) if c.choices else [])]
    assert streamed_ids == expected


def test_completions_prompt_string_and_token_ids(oai, grpc_client, tokenizer, tiny_model, reference):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = reference(tiny_model, ids, MAX_NEW)
    grpc_run = grpc_client.generate(prompt_token_ids=ids, max_new_tokens=MAX_NEW, ignore_eos=True)
    assert grpc_run.token_ids == expected
    for prompt in (PROMPT, ids):
        out = oai.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.object == "text_completion"
        assert out.choices[0].model_extra["token_ids"] == expected
        assert out.choices[0].text == grpc_run.text
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), MAX_NEW)
    streamed = oai.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_run.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_NEW


def test_stop_string_and_default_max_tokens(oai, grpc_client, tiny_model):
    full = grpc_client.generate(PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True).text
    stop = next(full[k:k + 4] for k in range(len(full) // 2, 0, -1)
                if full.find(full[k:k + 4]) == k and full[k:k + 4].strip())
    for stop_param in (stop, [stop, "never-generated"]):
        out = oai.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                     stop=stop_param, extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].text == full[:full.find(stop)]
    # No max_tokens: the server default (128) applies, as over gRPC.
    out = oai.completions.create(model=str(tiny_model), prompt=PROMPT, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 128


def test_default_max_tokens_is_held_to_the_room_left(relay, grpc_client, tiny_model):
    """A 450-token prompt in a 512 context, no max_tokens: 62 tokens, as OpenAI and vLLM cap their default (it
    was a 400 naming max_tokens, which the client never sent). A value that was sent and does not fit stays 400."""
    prompt = [5] * 450
    body = {"model": str(tiny_model), "prompt": prompt, "temperature": 0, "ignore_eos": True}
    status, _, raw = _post(relay.http_port, "/v1/completions", body)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 62
    assert grpc_client.generate(prompt_token_ids=prompt, ignore_eos=True).completion_tokens == 62
    status, _, raw = _post(relay.http_port, "/v1/completions", {**body, "max_tokens": 63})
    assert status == 400 and _error(status, raw)["param"] == "max_tokens"
    status, _, raw = _post(relay.http_port, "/v1/completions", {**body, "prompt": [5] * 512})
    assert status == 400 and _error(status, raw)["param"] == "prompt"  # no room at all: the prompt is the fault


def test_content_parts_are_joined_as_lines(relay, tiny_model):
    """[{"text": "Hello"}, {"text": "World"}] is "Hello\\nWorld", as vLLM joins parts (it was "HelloWorld")."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]
    answers = [json.loads(_post(relay.http_port, "/v1/chat/completions", _chat(
        str(tiny_model), messages=[{"role": "user", "content": content}], max_tokens=8, ignore_eos=True,
        return_token_ids=True))[2]) for content in (parts, "Hello\nWorld")]
    counts = [{k: a["usage"][k] for k in ("prompt_tokens", "completion_tokens")} for a in answers]
    assert counts[0] == counts[1]
    assert answers[0]["choices"][0]["token_ids"] == answers[1]["choices"][0]["token_ids"]
    # The same prompt again: its full blocks come from the prefix cache (OpenAI's cached_tokens says how many).
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_sampling_options_and_seed_reproduce(oai, grpc_client, tiny_model):
    kwargs = dict(model=str(tiny_model), messages=MESSAGES, max_completion_tokens=16, temperature=0.9, top_p=0.9,
                  seed=1234, extra_body={"top_k": 40, "ignore_eos": True})
    first = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert oai.chat.completions.create(**kwargs).choices[0].message.content == first
    grpc_run = grpc_client.generate(messages=MESSAGES, max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=40,
                                    seed=1234, ignore_eos=True)
    assert grpc_run.text == first


def test_adapter_as_model(oai, grpc_client, tiny_model, adapter_dir):
    listed = oai.models.list().data
    assert [m.id for m in listed] == [str(tiny_model), "all"]
    assert listed[1].parent == str(tiny_model)
    assert listed[1].root == "all"  # its folder is for the admin token only (no admin token is set here)
    out = oai.completions.create(model="all", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                 extra_body={"ignore_eos": True})
    with_adapter = grpc_client.generate(PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True, adapter="all")
    base = grpc_client.generate(PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True)
    assert with_adapter.token_ids != base.token_ids  # the adapter changes the output
    assert out.choices[0].text == with_adapter.text
    assert out.model == "all"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_adapter_unloaded_after_validation_is_404_not_500(relay, grpc_client, stream):
    """The request passed validation (the registry lists "all"), but the pipeline no longer serves it when the
    engine admits it (an unload in between): HTTP 404 model_not_found and gRPC FAILED_PRECONDITION, as for a
    model not served, never 500 / INTERNAL (issue #27 item 2); health stays SERVING."""
    import grpc

    sources = relay.pipeline.adapters.sources
    source = sources.pop("all")
    try:
        status, _, body = _post(relay.http_port, "/v1/chat/completions", _chat("all", stream=stream))
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.generate(PROMPT, max_new_tokens=2, adapter="all")
    finally:
        sources["all"] = source
    assert status == 404 and _error(status, body)["code"] == "model_not_found", body
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'all' was unloaded" in refused.value.details()
    assert grpc_client.health() == "SERVING"


def test_models_show_adapter_folders_only_to_the_admin_token(relays, tiny_model, adapter_dir):
    """As gRPC's ListAdapters: the generation token sees names, the admin token also sees where they live."""
    relay = relays(ServeOptions(model=str(tiny_model), shards=1, use_ray=False, max_context=512, auth_token=TOKEN,
                                admin_token="admin-token", adapters={"all": str(adapter_dir)}))
    listed = {token: json.loads(_post(relay.http_port, "/v1/models", None, token=token)[2])["data"]
              for token in (TOKEN, "admin-token")}
    assert [m["id"] for m in listed[TOKEN]] == [m["id"] for m in listed["admin-token"]] == [str(tiny_model), "all"]
    assert listed[TOKEN][1]["root"] == "all" and str(adapter_dir) not in json.dumps(listed[TOKEN])
    assert listed["admin-token"][1]["root"] == str(adapter_dir)
    status, _, body = _post(relay.http_port, "/v1/completions", {"model": "all", "prompt": PROMPT},
                            token="admin-token")
    assert status == 401  # the admin token opens the listing, not generation


# ---------------------------------------------------------------------------------------- SSE framing


def test_sse_framing_and_usage_chunk(relay, tiny_model):
    status, headers, body = _post(relay.http_port, "/v1/chat/completions",
                                  _chat(str(tiny_model), stream=True, stream_options={"include_usage": True}))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = _events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    # Without include_usage there is no usage chunk and no usage key.
    _, _, body = _post(relay.http_port, "/v1/chat/completions", _chat(str(tiny_model), stream=True))
    plain = [json.loads(e) for e in _events(body)[:-1]]
    assert all("usage" not in c and c["choices"] for c in plain)


# ---------------------------------------------------------------------------------------------- errors


def _error(status: int, body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS, error
    return error


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": CAP + 1}, "max_tokens"),
    ({"max_completion_tokens": CAP + 1}, "max_completion_tokens"),
    ({"stop": [""]}, "stop"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": "ayse"}]}, "messages"),  # was dropped silently
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_chat_refusals_name_the_parameter(relay, tiny_model, extra, param):
    status, _, body = _post(relay.http_port, "/v1/chat/completions", _chat(str(tiny_model), **extra))
    error = _error(status, body)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(param), error


@pytest.mark.parametrize(("extra", "param"), [
    ({"prompt": [5, 10**6]}, "prompt"),
    ({"prompt": "x" * 512 * 65}, "prompt"),
    ({"echo": True}, "echo"),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_completion_refusals_name_the_parameter(relay, tiny_model, extra, param):
    body = {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 4, **extra}
    status, _, raw = _post(relay.http_port, "/v1/completions", body)
    assert status == 400 and _error(status, raw)["param"] == param


LONE = "\ud800"  # a lone UTF-16 surrogate: valid in JSON ("\\ud800"), not in UTF-8 or protobuf


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi" + LONE}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": LONE, "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"stop": ["ok", LONE]}, "stop"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": LONE}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"model": LONE}, "model"),
    ("/v1/chat/completions", {LONE: 1}, "body"),  # an unknown parameter named by no valid text
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": [LONE]}, "prompt"),
    ("/v1/completions", {"stop": LONE}, "stop"),
])
def test_a_lone_surrogate_is_400_naming_the_field(relay, tiny_model, caplog, path, extra, param):
    """It was a plain-text 500 (building the protobuf request raised UnicodeEncodeError), logged at ERROR."""
    body = {"model": str(tiny_model), "max_tokens": 2, **(
        {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": PROMPT}), **extra}
    status, headers, raw = _post(relay.http_port, path, body)
    assert status == 400 and headers["content-type"] == "application/json", raw
    error = _error(status, raw)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Tokenize"])
def test_a_grpc_string_that_is_not_utf8_is_invalid_argument(relay, caplog, method):
    """The gRPC side of the same fault: a client in another language can send a lone surrogate as bytes; gRPC's
    deserializer raised DecodeError, answered UNKNOWN with a traceback at ERROR."""
    kind = relay_pb2.TokenizeRequest if method == "Tokenize" else relay_pb2.GenerateRequest
    prompt_field = kind.DESCRIPTOR.fields_by_name["prompt"].number
    raw = bytes([prompt_field << 3 | 2, 3]) + "\ud800".encode("utf-8", "surrogatepass")
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(
            f"/qwen_relay.v1.TextGeneration/{method}")
        with pytest.raises(grpc.RpcError) as info:
            result = call(raw, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
            list(result) if method == "GenerateStream" else None
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_openai_client_sees_errors_as_its_exceptions(oai, tiny_model, relay):
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=str(tiny_model), messages=MESSAGES, n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{relay.http_port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_token_required_except_health(relay, tiny_model):
    for token, reason in ((None, "missing"), ("nope", "invalid")):
        for path, request in (("/v1/chat/completions", _chat(str(tiny_model))), ("/v1/models", None),
                              ("/v1/completions", {"model": str(tiny_model), "prompt": PROMPT})):
            status, _, body = _post(relay.http_port, path, request, token=token)
            error = _error(status, body)
            assert status == 401 and error["type"] == "authentication_error" and reason in error["message"]
    conn = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=30)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (200, {"status": "SERVING"})
    conn.request("GET", "/openapi.json")  # like gRPC reflection, the API map needs the token
    assert conn.getresponse().status == 401  # every path but /health: the token is checked before routing
    conn.close()


def test_bad_json_is_400(relay):
    status, _, body = _post(relay.http_port, "/v1/chat/completions", b"{not json")
    assert status == 400 and _error(status, body)["type"] == "invalid_request_error"
    status, _, body = _post(relay.http_port, "/v1/chat/completions", b"{not json", token=None)
    assert status == 401 and _error(status, body)["type"] == "authentication_error"  # the token comes first


def _raw_head(port: int, path: str, headers: dict[str, str], data: bytes = b"") -> socket.socket:
    """A POST whose head (and `data`) is sent, the rest of the body never: the server must answer anyway."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Type": "application/json", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + data)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and error JSON of the answer on `sock` (read until the server closes or the JSON is complete)."""
    received = b""
    while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), _error(int(head.split()[1]), body)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/no/such/path"])
def test_token_is_checked_before_the_body_is_read(relay, path):
    """100 MiB announced, 1 KiB sent, no token: 401 at once (FastAPI used to wait for the whole body first)."""
    start = time.monotonic()
    status, error = _answer(_raw_head(relay.http_port, path, {"Content-Length": str(100 << 20)}, b"{" * 1024))
    assert (status, error["type"]) == (401, "authentication_error")
    assert time.monotonic() - start < 1.0


def test_a_body_over_the_grpc_message_limit_is_413_unread(relay, tiny_model):
    start = time.monotonic()
    sock = _raw_head(relay.http_port, "/v1/completions", {"Authorization": f"Bearer {TOKEN}",
                                                          "Content-Length": str(100 << 20)}, b"{" * 1024)
    status, error = _answer(sock)
    assert (status, error["code"], error["type"]) == (413, "request_too_large", "invalid_request_error")
    assert time.monotonic() - start < 1.0
    # Without a Content-Length (chunked), reading stops once the limit is passed.
    sock = _raw_head(relay.http_port, "/v1/completions", {"Authorization": f"Bearer {TOKEN}",
                                                          "Transfer-Encoding": "chunked"})
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    with contextlib.suppress(OSError):  # the server may close before the last chunk is sent
        for _ in range(40):
            sock.sendall(chunk)
    status, error = _answer(sock)
    assert status == 413 and error["code"] == "request_too_large"
    # Within the limit, a large body is read and validated as before.
    body = {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 2, "user": "u" * (8 << 20)}
    assert _post(relay.http_port, "/v1/completions", body)[0] == 200


def test_http_requests_are_counted_with_grpc(relay, tiny_model):
    def count(method: str, code: str) -> float:
        labels = {"method": method, "code": code}
        return relay.metrics.registry.get_sample_value("qwen_relay_requests_total", labels) or 0.0

    before = count("POST /v1/completions", "200"), count("POST /v1/completions", "400"), count("GET other", "404")
    _post(relay.http_port, "/v1/completions", {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 2})
    _post(relay.http_port, "/v1/completions", {"model": str(tiny_model), "prompt": PROMPT, "n": 3})
    _post(relay.http_port, "/no/such/path", None)
    after = count("POST /v1/completions", "200"), count("POST /v1/completions", "400"), count("GET other", "404")
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_full_queue_429_and_slice_down_503(relay, tiny_model, stream):
    engine = relay.engine
    config = engine.config
    engine.config = dataclasses.replace(config, max_queue=0)  # every new request finds the queue full
    try:
        status, _, body = _post(relay.http_port, "/v1/chat/completions", _chat(str(tiny_model), stream=stream))
    finally:
        engine.config = config
    assert status == 429 and _error(status, body)["type"] == "rate_limit_error"
    engine.available = False  # what the engine sets when a slice did not come back in time
    try:
        status, _, body = _post(relay.http_port, "/v1/chat/completions", _chat(str(tiny_model), stream=stream))
        health = _post(relay.http_port, "/health", None, token=None)
    finally:
        engine.available = True
    assert status == 503 and _error(status, body)["type"] == "service_unavailable_error"
    assert health[0] == 200  # the health flag follows the engine's recovery, not a single refusal
    status, _, _ = _post(relay.http_port, "/v1/chat/completions", _chat(str(tiny_model)))
    assert status == 200


def test_the_tokenizer_queue_is_bounded_like_the_admission_queue(relay, grpc_client, tiny_model):
    """Requests wait for the one tokenizer thread before the engine's --max-queue check: that wait was unbounded,
    so admission did not bound the work accepted. Now beyond --max-queue waiting there, 429 / RESOURCE_EXHAUSTED
    at once."""
    engine, config = relay.engine, relay.engine.config
    tokenizer_free = threading.Event()
    blocker = relay.frontend._tokenizing.submit(tokenizer_free.wait)  # the thread is busy until the test says
    engine.config = dataclasses.replace(config, max_queue=1)
    waiting = threading.Thread(target=_post, args=(relay.http_port, "/v1/completions",
                                                   {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 2}))
    try:
        waiting.start()
        deadline = time.monotonic() + 30
        # Counted by the bound (the executor's own queue also holds the blocker until its thread takes it)
        while relay.frontend._tokenizing_jobs < 1:  # queued behind the blocker
            assert time.monotonic() < deadline, "the first request never reached the tokenizer queue"
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=5)
        conn.request("POST", "/v1/completions", json.dumps({"model": str(tiny_model), "prompt": PROMPT}),
                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.generate(PROMPT, max_new_tokens=2, timeout=5)
        with pytest.raises(grpc.RpcError) as refused_tokenize:
            grpc_client.tokenize(PROMPT, timeout=5)
    finally:
        tokenizer_free.set()
        blocker.result(30)
        waiting.join(60)
        engine.config = config
    assert status == 429 and _error(status, body)["code"] == "queue_full", body
    assert "tokenizer queue is full" in _error(status, body)["message"]
    assert refused.value.code() == refused_tokenize.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_client.generate(PROMPT, max_new_tokens=2).completion_tokens == 2


def test_health_mirrors_grpc_health(relay, grpc_client, loop_thread):
    loop_thread.run(relay._set_health(False))  # what the engine does while a slice recovers
    try:
        status, _, body = _post(relay.http_port, "/health", None, token=None)
        assert (status, json.loads(body)) == (503, {"status": "NOT_SERVING"})
        assert grpc_client.health() == "NOT_SERVING"
    finally:
        loop_thread.run(relay._set_health(True))
    assert _post(relay.http_port, "/health", None, token=None)[0] == 200 and grpc_client.health() == "SERVING"


def test_requests_that_arrive_while_draining_get_503_and_the_running_stream_finishes(relays, tiny_model,
                                                                                       stop_while_streaming):
    """As gRPC during a graceful stop: the port stays open, /health and new requests answer 503 (a stopped HTTP
    server would refuse the connection, which tells a client or a load balancer nothing), and the stream that
    was running finishes in the grace period."""
    relay = relays(ServeOptions(model=str(tiny_model), shards=2, use_ray=False, max_context=512, grace_seconds=60))
    streamed: list[str] = []

    def consume(streaming) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
            {"model": str(tiny_model), "prompt": "Merhaba", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
             "stream": True, "stream_options": {"include_usage": True}}))
        for line in conn.getresponse():
            if line.startswith(b"data: "):
                streamed.append(line.decode().removeprefix("data: ").strip())
                streaming.set()
        conn.close()

    reader, stopped = stop_while_streaming(relay, consume)
    try:
        deadline = time.monotonic() + 30
        while (health := _post(relay.http_port, "/health", None, token=None))[0] == 200:
            assert time.monotonic() < deadline, "/health still 200 while draining"
            time.sleep(0.05)
        time.sleep(0.5)  # past uvicorn's shutdown tick (0.1 s): a server told to stop has closed its port by now
        health = _post(relay.http_port, "/health", None, token=None)
        status, _, body = _post(relay.http_port, "/v1/completions", {"model": str(tiny_model), "prompt": "Merhaba",
                                                                      "max_tokens": 2}, token=None)
        assert len(streamed) < 400  # refused while the running stream still ran
    finally:
        reader.join(60)
        stopped.result(60)
    assert (health[0], json.loads(health[2])) == (503, {"status": "NOT_SERVING"})
    assert status == 503 and "shutting down" in json.loads(body)["error"]["message"], body
    assert streamed[-1] == "[DONE]" and json.loads(streamed[-2])["usage"]["completion_tokens"] == 400


# -------------------------------------------------------------------------------------- cancellation



def _steps(relay) -> float:
    return relay.metrics.registry.get_sample_value("qwen_relay_step_seconds_count") or 0.0


def _wait_generating(client: RelayClient) -> None:
    """Until every slice holds a cache entry (a unary answer shows nothing before it ends)."""
    deadline = time.monotonic() + DRAIN_WAIT_S
    while not all(s.cache_entries >= 1 for s in client.model_info().slices):
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.05)


def check_disconnect_cancels(relay, client: RelayClient, model: str, token: str | None, wait_caches_empty,
                             stream: bool = True) -> None:
    """Start a long generation, drop the connection: every slice frees the sequence's cache."""
    steps_before = _steps(relay)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": CAP, "temperature": 0, "stream": stream,
                       "ignore_eos": True}).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock = socket.create_connection(("127.0.0.1", relay.http_port), timeout=120)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        received = b""
        while received.count(b"data: ") < 4:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
    else:
        _wait_generating(client)
    during = client.model_info().slices
    sock.close()
    assert len(during) >= 2 and all(s.cache_entries >= 1 for s in during), during
    wait_caches_empty(client)
    assert _steps(relay) - steps_before < CAP  # generation stopped instead of running on for nobody


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_disconnect_frees_every_slice(relay, grpc_client, tiny_model, stream, wait_caches_empty):
    check_disconnect_cancels(relay, grpc_client, str(tiny_model), TOKEN, wait_caches_empty, stream)
    # The relay keeps serving afterwards.
    assert grpc_client.generate(PROMPT, max_new_tokens=4).completion_tokens == 4


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_disconnect_while_queued_gives_the_place_up_at_once(relays, tiny_model, stream):
    """One cache slot, held by a stream whose steps are then held back; a second request queues, its client goes
    away: it leaves the queue at once (it used to stay until the slot came free, then cost a prefill before
    anyone noticed)."""
    relay = relays(ServeOptions(model=str(tiny_model), shards=2, use_ray=False, max_batch=1, max_context=512))
    scheduler, pipeline = relay.engine.scheduler, relay.engine.pipeline
    steps_open = threading.Event()
    steps_open.set()
    step = pipeline.step

    async def held_step(batch):
        await asyncio.to_thread(steps_open.wait)
        return await step(batch)

    pipeline.step = held_step
    body = {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, "stream": True}
    holder = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=120)
    try:
        holder.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = holder.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        steps_open.clear()  # the holder keeps its slot until the test ends
        queued = json.dumps({**body, "max_tokens": 4, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", relay.http_port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(queued), queued))
        deadline = time.monotonic() + 30
        while not scheduler.waiting:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        sock.close()
        deadline = time.monotonic() + 5
        while scheduler.waiting:
            assert time.monotonic() < deadline, "the abandoned request kept its place in the queue"
            time.sleep(0.01)
    finally:
        steps_open.set()
        del pipeline.step
        holder.close()


# ------------------------------------------------------------------------------------------------- CLI


def test_taken_http_port_fails_the_start(loop_thread, tiny_model, relay):
    options = ServeOptions(model=str(tiny_model), shards=1, use_ray=False, port=0, http_port=relay.http_port)
    with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{relay.http_port} \\(HTTP\\)"):
        loop_thread.run(Relay.start(options))


def test_cli_http_port_is_off_unless_given():
    from qwen_relay.server.cli import build_parser, serve_options

    parser = build_parser()
    assert serve_options(parser.parse_args(["serve", "--model", "m"])).http_port is None
    assert serve_options(parser.parse_args(["serve", "--model", "m", "--http-port", "8000"])).http_port == 8000


# ------------------------------------------------------------------------------------------------- TLS


def test_tls_is_shared_with_grpc(relays, tiny_model, pki):
    relay = relays(ServeOptions(model=str(tiny_model), shards=1, use_ray=False, max_context=256,
                                tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path),
                                tls_client_ca=str(pki.ca.cert_path)))
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    context.load_cert_chain(pki.client.cert_path, pki.client.key_path)
    body = {"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    status, _, raw = _post(relay.http_port, "/v1/completions", body, token=None, context=context)
    assert status == 200
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=60, root_certificates=pki.ca.cert,
                     private_key=pki.client.key, certificate_chain=pki.client.cert) as client:
        assert json.loads(raw)["choices"][0]["text"] == client.generate(PROMPT, max_new_tokens=6).text
    # Mutual TLS: no client certificate, no connection; plaintext HTTP is not served on the TLS port.
    anonymous = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _post(relay.http_port, "/v1/completions", body, token=None, context=anonymous)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _post(relay.http_port, "/v1/completions", body, token=None)


# ----------------------------------------------------------------------------------------- Ray (slow)


@pytest.mark.slow
def test_http_on_ray_slices_parity_and_disconnect(ray_relay, tiny_model, reference, tokenizer, wait_caches_empty):
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_relay.http_port}/v1", api_key="unused", max_retries=0,
                        timeout=120)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = reference(tiny_model, ids, MAX_NEW)
    with RelayClient(f"127.0.0.1:{ray_relay.port}", timeout=120) as client:
        grpc_run = client.generate(prompt_token_ids=ids, max_new_tokens=MAX_NEW, ignore_eos=True)
        assert grpc_run.token_ids == expected
        out = oai.completions.create(model=str(tiny_model), prompt=ids, max_tokens=MAX_NEW, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].text == grpc_run.text and out.choices[0].model_extra["token_ids"] == expected
        streamed = oai.chat.completions.create(model=str(tiny_model), messages=MESSAGES, max_tokens=MAX_NEW,
                                               temperature=0, stream=True)
        chat = client.generate(messages=MESSAGES, max_new_tokens=MAX_NEW)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.text
        check_disconnect_cancels(ray_relay, client, str(tiny_model), None, wait_caches_empty)
