"""Unit tests of the Python client against an in-test fake TextGeneration servicer.

The fake is a test double for the client only: it records every request (with its metadata) and echoes
request fields back, so the tests check what the client sends and how it reassembles what comes back.
No model, no Ray, no real gateway.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qwen_relay.client import (
    AsyncRelayClient,
    Deadlines,
    RelayClient,
    build_generate_request,
    build_tokenize_request,
    completion_from_chunks,
)
from qwen_relay.client import cli as client_cli
from qwen_relay.client.chat import run_chat
from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

pytestmark = pytest.mark.timeout(30)


@dataclass
class Call:
    method: str
    request: object
    metadata: dict[str, str]


def _last_text(request: relay_pb2.GenerateRequest) -> str:
    if request.messages:
        return request.messages[-1].content
    if request.prompt_token_ids:
        return " ".join(str(t) for t in request.prompt_token_ids)
    return request.prompt


class FakeTextGeneration(relay_pb2_grpc.TextGenerationServicer):
    """Echoes requests back. Magic inputs: "bad" aborts INVALID_ARGUMENT, "fail-midway" aborts INTERNAL
    after one chunk, "slow" streams slowly and notes when the client cancels."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def _record(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(Call(method, request, dict(context.invocation_metadata())))

    def requests(self, method: str) -> list:
        return [c.request for c in self.calls if c.method == method]

    def Generate(self, request, context):
        self._record("Generate", request, context)
        if _last_text(request) == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        return relay_pb2.GenerateResponse(
            request_id=request.request_id or "srv-1",
            text=json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None),
            token_ids=[1, 2, 3],
            finish_reason=relay_pb2.FINISH_REASON_LENGTH,
            usage=relay_pb2.Usage(prompt_tokens=7, completion_tokens=3),
        )

    def GenerateStream(self, request, context):
        self._record("GenerateStream", request, context)
        text = _last_text(request)
        request_id = request.request_id or "srv-1"
        if text == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        if text == "fail-midway":
            yield relay_pb2.GenerateResponse(request_id=request_id, text="partial ", token_ids=[9])
            context.abort(grpc.StatusCode.INTERNAL, "slice died")
        if text == "slow":
            # The server stops pulling from this generator once the client cancels, so notice the
            # cancellation through the termination callback rather than a check inside the loop.
            finished = threading.Event()
            context.add_callback(lambda: None if finished.is_set() else self.cancelled.set())
            for i in range(200):
                yield relay_pb2.GenerateResponse(request_id=request_id, text=".", token_ids=[i])
                time.sleep(0.02)
            finished.set()
            return
        n_messages = len(request.messages)
        words = f"reply {n_messages}: {text}".split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            response = relay_pb2.GenerateResponse(
                request_id=request_id, text=word if last else word + " ", token_ids=[100 + i]
            )
            if last:
                response.finish_reason = relay_pb2.FINISH_REASON_STOP_SEQUENCE
                response.usage.prompt_tokens = 11
                response.usage.completion_tokens = len(words)
            yield response

    def Tokenize(self, request, context):
        self._record("Tokenize", request, context)
        text = request.prompt or "".join(m.content for m in request.messages)
        ids = [ord(c) for c in text]
        return relay_pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    def GetModelInfo(self, request, context):
        self._record("GetModelInfo", request, context)
        return relay_pb2.ModelInfo(
            model_id="tiny-qwen2",
            dtype="float32",
            num_layers=4,
            max_context=256,
            vocab_size=1000,
            max_new_tokens_cap=64,
            max_batch_size=8,
            slices=[
                relay_pb2.SliceInfo(index=0, first_layer=0, last_layer=1, has_embeddings=True, device="cpu"),
                relay_pb2.SliceInfo(index=1, first_layer=2, last_layer=3, has_lm_head=True, device="cpu"),
            ],
        )


def _start_server(servicer: FakeTextGeneration, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    relay_pb2_grpc.add_TextGenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def fake_server():
    servicer = FakeTextGeneration()
    server, port = _start_server(servicer)
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fake(fake_server):
    servicer, target = fake_server
    servicer.calls.clear()
    servicer.cancelled.clear()
    return servicer, target


@pytest.fixture
def client(fake):
    _, target = fake
    with RelayClient(target, timeout=5) as c:
        yield c


# ------------------------------------------------------------------------------------ request building


def test_each_param_maps_to_its_field():
    req = build_generate_request(
        "hi",
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=1234,
        stop=["\n\n", "END"],
        ignore_eos=True,
        adapter="pirate",
        request_id="r-1",
    )
    assert req.prompt == "hi"
    assert req.max_new_tokens == 12
    assert req.temperature == pytest.approx(0.7)
    assert req.HasField("top_p") and req.top_p == pytest.approx(0.9)
    assert req.top_k == 40
    assert req.HasField("seed") and req.seed == 1234
    assert list(req.stop) == ["\n\n", "END"]
    assert req.ignore_eos is True
    assert req.adapter == "pirate"
    assert req.request_id == "r-1"


def test_defaults_leave_optionals_unset():
    req = build_generate_request("hi")
    assert not req.HasField("top_p") and not req.HasField("seed")
    assert req.max_new_tokens == 0 and req.temperature == 0 and req.top_k == 0
    assert list(req.stop) == [] and req.adapter == "" and req.request_id == "" and not req.ignore_eos
    # seed 0 is a real seed, distinct from "unset"; a lone stop string is a list of one
    req = build_generate_request("hi", seed=0, stop="###")
    assert req.HasField("seed") and req.seed == 0
    assert list(req.stop) == ["###"]


def test_prompt_messages_and_token_ids():
    assert build_generate_request("p").prompt == "p"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    req = build_generate_request(messages=msgs)
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "hi")]
    assert req.prompt == "" and list(req.prompt_token_ids) == []
    req = build_generate_request(prompt_token_ids=[5, 6, 7])
    assert list(req.prompt_token_ids) == [5, 6, 7] and req.prompt == "" and len(req.messages) == 0
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request("p", messages=msgs)
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request()
    with pytest.raises(ValueError, match="role"):
        build_generate_request(messages=[{"content": "no role"}])
    with pytest.raises(TypeError):
        build_generate_request("p", temprature=0.5)  # a typo must not be silently ignored
    assert build_tokenize_request("x").prompt == "x"
    assert build_tokenize_request(messages=msgs).messages[1].content == "hi"


# ------------------------------------------------------------------------------------------ sync client


def test_generate_sends_every_field(client, fake):
    servicer, _ = fake
    completion = client.generate(
        "hello",
        max_new_tokens=5,
        temperature=0.5,
        top_p=0.8,
        top_k=3,
        seed=42,
        stop=["x", "y"],
        ignore_eos=True,
        adapter="a1",
        request_id="req-9",
    )
    echoed = json.loads(completion.text)
    assert echoed["prompt"] == "hello"
    assert echoed["max_new_tokens"] == 5
    assert echoed["temperature"] == pytest.approx(0.5)
    assert echoed["top_p"] == pytest.approx(0.8)
    assert echoed["top_k"] == 3
    assert int(echoed["seed"]) == 42
    assert echoed["stop"] == ["x", "y"]
    assert echoed["ignore_eos"] is True
    assert echoed["adapter"] == "a1"
    assert completion.request_id == "req-9"
    assert completion.token_ids == [1, 2, 3]
    assert completion.finish_reason == "length"
    assert (completion.prompt_tokens, completion.completion_tokens) == (7, 3)
    assert completion.raw is not None and completion.raw.usage.prompt_tokens == 7
    assert "raw" not in completion.to_dict()
    json.dumps(completion.to_dict())
    (request,) = servicer.requests("Generate")
    assert request.HasField("seed") and request.seed == 42


def test_chat_and_token_ids(client, fake):
    servicer, _ = fake
    client.chat([{"role": "user", "content": "hi"}], temperature=0.0)
    client.generate(prompt_token_ids=[1, 2])
    chat_req, ids_req = servicer.requests("Generate")
    assert [(m.role, m.content) for m in chat_req.messages] == [("user", "hi")]
    assert list(ids_req.prompt_token_ids) == [1, 2]


def test_stream_yields_deltas_and_reassembles(client):
    chunks = list(client.stream("one two three", request_id="s-1"))
    assert len(chunks) == 5  # "reply 0: one two three" word by word
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert all(c.prompt_tokens is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop_sequence" and last.finished
    assert (last.prompt_tokens, last.completion_tokens) == (11, 5)
    assert {c.request_id for c in chunks} == {"s-1"}
    completion = completion_from_chunks(chunks)
    assert completion.text == "reply 0: one two three"
    assert completion.token_ids == [100, 101, 102, 103, 104]
    assert completion.finish_reason == "stop_sequence"
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 5)


def test_breaking_out_of_a_stream_cancels_it(client, fake):
    servicer, _ = fake
    for _chunk in client.stream("slow"):
        break  # the generator is closed as the loop's temporary goes away
    assert servicer.cancelled.wait(3), "the server never saw the cancellation"


def test_deadline_applies_to_the_stream(fake):
    _, target = fake
    with RelayClient(target, timeout=0.2) as c, pytest.raises(grpc.RpcError) as info:
        list(c.stream("slow"))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_errors_propagate_with_their_code(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("bad")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "bad prompt"
    with pytest.raises(grpc.RpcError) as info:
        list(client.stream("bad"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in client.stream("fail-midway"):
            seen.append(chunk.text)
    assert seen == ["partial "] and info.value.code() == grpc.StatusCode.INTERNAL


def test_tokenize_model_info_health(client):
    result = client.tokenize("abc")
    assert result.token_ids == [97, 98, 99] and result.count == 3
    assert client.tokenize(messages=[{"role": "user", "content": "z"}]).token_ids == [122]
    info = client.model_info()
    assert info.model_id == "tiny-qwen2" and info.num_layers == 4 and info.max_batch_size == 8
    assert [(s.first_layer, s.last_layer) for s in info.slices] == [(0, 1), (2, 3)]
    assert info.slices[0].has_embeddings and info.slices[1].has_lm_head
    json.dumps(info.to_dict())
    assert client.health() == "SERVING"


def test_auth_metadata_sent_only_when_given(fake):
    servicer, target = fake
    with RelayClient(target, auth_token="s3cret", metadata=[("x-tenant", "t1")]) as c:
        c.generate("hi")
        list(c.stream("hi"))
        c.tokenize("hi")
        c.model_info()
    assert len(servicer.calls) == 4
    for call in servicer.calls:
        assert call.metadata["authorization"] == "Bearer s3cret", call.method
        assert call.metadata["x-tenant"] == "t1"
    servicer.calls.clear()
    with RelayClient(target) as c:
        c.generate("hi")
    assert "authorization" not in servicer.calls[0].metadata


# ----------------------------------------------------------------------------------------- async client


def test_async_client(fake):
    servicer, target = fake

    async def scenario() -> None:
        async with AsyncRelayClient(target, timeout=5, auth_token="tok") as c:
            completion = await c.generate("hi", top_k=2, seed=0, stop="s")
            echoed = json.loads(completion.text)
            assert echoed["top_k"] == 2 and echoed["stop"] == ["s"] and int(echoed["seed"]) == 0
            assert completion.finish_reason == "length"
            chat = await c.chat([{"role": "user", "content": "yo"}])
            assert json.loads(chat.text)["messages"] == [{"role": "user", "content": "yo"}]
            chunks = [chunk async for chunk in c.stream("a b")]
            assert completion_from_chunks(chunks).text == "reply 0: a b"
            assert chunks[-1].finish_reason == "stop_sequence"
            assert (await c.tokenize("ab")).count == 2
            assert (await c.model_info()).vocab_size == 1000
            assert await c.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as info:
                await c.generate("bad")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as info:
                async for _ in c.stream("bad"):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())
    assert all(call.metadata.get("authorization") == "Bearer tok" for call in servicer.calls)


# ------------------------------------------------------------------------------------------------- TLS


def _self_signed() -> tuple[bytes, bytes]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls_with_pinned_root_and_token():
    key_pem, cert_pem = _self_signed()
    servicer = FakeTextGeneration()
    server, port = _start_server(servicer, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        with RelayClient(
            f"127.0.0.1:{port}",
            timeout=5,
            root_certificates=cert_pem,
            server_name_override="localhost",
            auth_token="t",
        ) as c:
            assert c.secure
            assert c.health() == "SERVING"
            assert json.loads(c.generate("over tls").text)["prompt"] == "over tls"
        assert servicer.calls[0].metadata["authorization"] == "Bearer t"
    finally:
        server.stop(grace=None)
    with pytest.raises(ValueError, match="go together"):
        RelayClient("127.0.0.1:1", private_key=key_pem)


# ------------------------------------------------------------------------------------------------ chat


def _chat(client: RelayClient, lines: str, **kwargs) -> str:
    out = io.StringIO()
    assert run_chat(client, io.StringIO(lines), out, **kwargs) == 0
    return out.getvalue()


def test_run_chat_keeps_history(client, fake):
    servicer, _ = fake
    output = _chat(client, "hello\nhow are you\n/exit\nnever sent\n", system="be nice", temperature=0.3)
    first, second = servicer.requests("GenerateStream")
    assert [(m.role, m.content) for m in first.messages] == [("system", "be nice"), ("user", "hello")]
    assert [(m.role, m.content) for m in second.messages] == [
        ("system", "be nice"),
        ("user", "hello"),
        ("assistant", "reply 2: hello"),
        ("user", "how are you"),
    ]
    assert second.temperature == pytest.approx(0.3)
    assert "reply 2: hello\n" in output and "reply 4: how are you\n" in output


def test_run_chat_without_system_and_eof(client, fake):
    servicer, _ = fake
    _chat(client, "a\nb")  # no trailing newline, then EOF ends the chat
    _, second = servicer.requests("GenerateStream")
    assert [m.role for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[2].content == "b"


def test_run_chat_reset(client, fake):
    servicer, _ = fake
    output = _chat(client, "one\n/reset\ntwo\n", system="sys")
    _, after_reset = servicer.requests("GenerateStream")
    assert [(m.role, m.content) for m in after_reset.messages] == [("system", "sys"), ("user", "two")]
    assert "cleared" in output


def test_run_chat_reports_errors_and_continues(client, fake):
    servicer, _ = fake
    output = _chat(client, "bad\nfail-midway\nok\n")
    assert "INVALID_ARGUMENT" in output and "bad prompt" in output
    assert "partial " in output and "INTERNAL" in output and "slice died" in output
    *_, last = servicer.requests("GenerateStream")
    # the failed turns were dropped, so the conversation restarts cleanly
    assert [(m.role, m.content) for m in last.messages] == [("user", "ok")]
    assert "reply 1: ok" in output


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_generate_json_and_stream(fake, capsys, monkeypatch):
    servicer, target = fake
    monkeypatch.setenv("QWEN_RELAY_AUTH_TOKEN", "from-env")
    argv = ["generate", "hi there", "--target", target, "--json", "--top-k", "3"]
    argv += ["--stop", "a", "--stop", "b"]
    assert client_cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    echoed = json.loads(result["text"])
    assert echoed["top_k"] == 3 and echoed["stop"] == ["a", "b"] and result["finish_reason"] == "length"
    assert servicer.calls[-1].metadata["authorization"] == "Bearer from-env"

    assert client_cli.main(["generate", "x y", "--target", target, "--stream", "--seed", "0"]) == 0
    assert capsys.readouterr().out == "reply 0: x y\n"

    assert client_cli.main(["generate", "hey", "--target", target, "--system", "sys", "--stream"]) == 0
    assert capsys.readouterr().out == "reply 2: hey\n"

    assert client_cli.main(["generate", "bad", "--target", target]) == client_cli.EXIT_RPC_ERROR
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_cli_registers_on_a_foreign_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="qwen-relay")
    client_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "--system", "s", "--temperature", "0.2", "--target", "h:1"])
    assert args.func is client_cli.cmd_chat and args.system == "s" and args.target == "h:1"
    args = parser.parse_args(["generate", "p", "--max-new-tokens", "4", "--adapter", "x", "--ignore-eos"])
    assert args.func is client_cli.cmd_generate
    params = client_cli.sampling_params(args)
    assert params["max_new_tokens"] == 4 and params["adapter"] == "x" and params["ignore_eos"] is True
    assert build_generate_request(args.prompt, **params).max_new_tokens == 4


# ------------------------------------------------------------------------------------ default deadlines


@pytest.fixture
def silent_server():
    """A port that accepts TCP connections and never answers: a stuck server as a client sees it."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_generation_deadline_grows_with_max_new_tokens():
    deadlines = Deadlines(start=60, per_token=2)
    assert deadlines.generation(10) == 80
    assert deadlines.generation(None) == deadlines.generation(0) == 60 + 2 * 128  # the server's default


def test_a_stuck_server_does_not_hang_calls_by_default(silent_server):
    with RelayClient(silent_server, deadlines=Deadlines(connect=0.3, start=0.3, per_token=0.01)) as c:
        for call in (c.health, c.model_info, lambda: c.generate("hi", max_new_tokens=5)):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5


def test_the_default_stream_deadline_ends_a_stuck_stream(fake):
    _, target = fake
    with RelayClient(target, deadlines=Deadlines(start=0.2, per_token=0.0)) as c, pytest.raises(grpc.RpcError) as info:
        list(c.stream("slow"))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_has_default_deadlines_too(silent_server):
    async def call() -> grpc.StatusCode:
        async with AsyncRelayClient(silent_server, deadlines=Deadlines(connect=0.3, start=0.3, per_token=0.01)) as c:
            with pytest.raises(grpc.RpcError) as info:
                await c.generate("hi", max_new_tokens=2)
            return info.value.code()

    assert asyncio.run(call()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_explicit_timeout_wins_and_inf_waits_forever():
    client = RelayClient("127.0.0.1:1")
    try:
        assert client._call_kwargs(None)["timeout"] == Deadlines().connect
        assert client._call_kwargs(7)["timeout"] == 7
        request = build_generate_request("hi", max_new_tokens=4)
        assert client._generation_kwargs(request, None)["timeout"] == Deadlines().generation(4)
        assert client._generation_kwargs(request, float("inf"))["timeout"] is None
    finally:
        client.close()


def test_cli_client_uses_the_default_deadlines_unless_told():
    parser = client_cli.build_parser()
    assert client_cli.client_from_args(parser.parse_args(["generate", "hi"])).timeout is None
    assert client_cli.client_from_args(parser.parse_args(["generate", "hi", "--timeout", "3"])).timeout == 3
