"""Edges of the gateway, in-process: the LoadAdapter path policy and limits, adapter names with ".", stop
strings at the end of generation, what error text reaches clients, log-safe request ids, serve's flags."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen_relay.server.detokenizer import REPLACEMENT, Detokenizer
from qwen_relay.server.frontend import MAX_ERROR_CHARS, public_message
from qwen_relay.server.sequence import GenerationParams, Sequence
from qwen_relay.server.validation import Limits


def _save_adapter(model: Path, folder: Path, seed: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    get_peft_model(base, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_root(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    _save_adapter(tiny_model, root / "a")
    return root


def _registry(tiny_model, **policy):
    from qwen_relay.server.adapters import AdapterPolicy, AdapterRegistry
    from qwen_relay.server.engine import Engine, EngineConfig
    from qwen_relay.shards.loader import load_config

    engine = Engine(EngineConfig(max_batch=1, max_context=16, eos_ids=frozenset()))  # never started: no slices
    return AdapterRegistry(load_config(tiny_model), str(tiny_model), engine, AdapterPolicy(**policy))


def _refusal(registry, path: str, name: str = "x") -> Exception:
    with pytest.raises(Exception) as info:
        asyncio.run(registry.load(name, path))
    return info.value


def test_load_adapter_path_policy(tiny_model, adapter_root, tmp_path):
    from qwen_relay.server.adapters import AdapterForbidden

    outside = tmp_path / "outside"
    _save_adapter(tiny_model, outside)
    (adapter_root / "escape").symlink_to(outside)
    registry = _registry(tiny_model, roots=(str(adapter_root),))
    answers = [_refusal(registry, p) for p in (str(outside), str(tmp_path / "missing"), "/etc",
                                                str(adapter_root / "escape"), str(adapter_root / ".." / "outside"))]
    assert all(isinstance(e, AdapterForbidden) for e in answers)
    # The same words whether or not the path exists: the answer reveals nothing outside the roots.
    assert {str(e) for e in answers} == {"path: not under an allowed adapter root (serve --adapter-root)"}
    # Inside a root, the admin may learn what is wrong.
    assert "is not a folder" in str(_refusal(registry, str(adapter_root / "missing")))
    # No root: LoadAdapter is off; the operator's --adapter (trusted) is not confined.
    off = _refusal(_registry(tiny_model), str(adapter_root / "a"))
    assert isinstance(off, AdapterForbidden) and "--adapter-root" in str(off)


def test_load_adapter_limits(tiny_model, adapter_root):
    from qwen_relay.server.adapters import AdapterLimit

    too_many = _refusal(_registry(tiny_model, roots=(str(adapter_root),), max_adapters=0), str(adapter_root / "a"))
    assert isinstance(too_many, AdapterLimit) and "--max-adapters" in str(too_many)
    too_big = _refusal(_registry(tiny_model, roots=(str(adapter_root),), max_bytes=100), str(adapter_root / "a"))
    assert isinstance(too_big, AdapterLimit) and "over the limit of 100" in str(too_big)


def test_load_adapter_files_resolving_outside_the_root_are_refused_unread(tiny_model, adapter_root, tmp_path):
    """The folder lies under the root but a file in it links outside: refused like any outside path, without
    the outside file's size (or anything else about it) in the answer (issue #27 item 9)."""
    import shutil

    from qwen_relay.server.adapters import AdapterForbidden
    from qwen_relay.shards.adapters import CONFIG_FILE, WEIGHTS_FILE

    outside = _save_adapter(tiny_model, tmp_path / "outside")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 4321)
    registry = _registry(tiny_model, roots=(str(adapter_root),), max_bytes=100)
    for linked, target in [(WEIGHTS_FILE, outside / WEIGHTS_FILE), (WEIGHTS_FILE, secret),
                           (CONFIG_FILE, outside / CONFIG_FILE)]:
        folder = adapter_root / f"link-{linked}-{target.name}"
        shutil.copytree(adapter_root / "a", folder)
        (folder / linked).unlink()
        (folder / linked).symlink_to(target)
        refused = _refusal(registry, str(folder))
        assert isinstance(refused, AdapterForbidden), (linked, target, refused)
        assert str(refused) == "path: not under an allowed adapter root (serve --adapter-root)"


def test_adapter_config_is_read_within_a_size_limit(tiny_model, adapter_root):
    import json
    import shutil

    from qwen_relay.shards.adapters import CONFIG_FILE, MAX_CONFIG_BYTES, AdapterError

    folder = adapter_root / "huge-config"
    shutil.copytree(adapter_root / "a", folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config) + " " * MAX_CONFIG_BYTES)  # valid JSON, too large
    refused = _refusal(_registry(tiny_model, roots=(str(adapter_root),)), str(folder))
    assert isinstance(refused, AdapterError) and f"over the limit of {MAX_CONFIG_BYTES} bytes" in str(refused)


def test_adapter_names_with_a_dot_load_and_route_like_any_other(tiny_model, adapter_root):
    from qwen_relay.shards.adapters import inspect_adapter
    from qwen_relay.shards.batch import SamplingParams, StepBatch
    from qwen_relay.shards.loader import load_config
    from qwen_relay.shards.runner import SliceRunner, SliceSpec

    folder = str(adapter_root / "a")
    assert inspect_adapter("v1.2", folder, load_config(tiny_model), str(tiny_model)).layers == (0, 1, 2, 3, 4)
    runner = SliceRunner(SliceSpec(model=str(tiny_model), first=0, end=5, device="cpu", max_slots=3, max_len=32))
    runner.reset()  # a fresh cache refuses steps until the gateway opens it
    runner.load_adapter("v1.2", folder)
    runner.load_adapter("v12", folder)
    prompt = [5, 17, 300, 42, 7, 99]
    tokens = runner.step(StepBatch(slots=[0, 1, 2], starts=[0, 0, 0], token_ids=[prompt] * 3, blocks=[[0], [1], [2]],
                                   sampling=[SamplingParams()] * 3, adapters=["v1.2", "v12", ""]))
    assert tokens[0] == tokens[1]
    runner.unload_adapter("v1.2")
    assert set(runner.adapters.held) == {"v12"}


class ByteTokenizer:
    """Decodes like a byte-level BPE: token 2 is a space plus the first byte of "Ğ"."""

    VOCAB = {0: b"a", 1: b"d", 2: b" \xc4", 3: b"\x9e"}

    def decode(self, ids, **kwargs) -> str:
        return b"".join(self.VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_flush_checks_stop_strings():
    """Generation ends (length) right after a token whose text completes a stop string but ends inside a
    character: add() could not look at it, flush() must."""
    detok = Detokenizer(ByteTokenizer(), ("d ",))
    assert [detok.add(t) for t in (0, 1, 2)] == ["a", "", ""]
    assert detok.flush() == "" and detok.stopped
    detok = Detokenizer(ByteTokenizer(), ("zz",))
    assert "".join(detok.add(t) for t in (0, 1, 2)) + detok.flush() == "ad " + REPLACEMENT and not detok.stopped


def test_engine_finish_reason_is_stop_sequence_when_flush_stops(tiny_model):
    from qwen_relay.server.engine import Engine, EngineConfig
    from qwen_relay.server.sequence import FinishReason

    engine = Engine(EngineConfig(max_batch=1, max_context=16, eos_ids=frozenset()))
    seq = Sequence("r", [0], GenerationParams(max_new_tokens=3), Detokenizer(ByteTokenizer(), ("d ",)))
    engine.scheduler.add(seq)
    engine.scheduler.schedule()
    for token in (0, 1, 2):
        engine._take(seq, token)
    deltas = [seq.outbox.get_nowait() for _ in range(seq.outbox.qsize())]
    assert "".join(d.text for d in deltas) == "a"
    assert deltas[-1].finish_reason is FinishReason.STOP_SEQUENCE


def test_error_details_carry_no_remote_traceback():
    import ray.exceptions

    traceback = ('Traceback (most recent call last):\n  File "/home/ray/x.py", line 3, in step\n'
                 'torch.OutOfMemoryError: CUDA out of memory')
    wrapped = ray.exceptions.RayTaskError("step", traceback, RuntimeError("CUDA out of memory. Tried 2 GiB\nmore"))
    assert "/home/ray" in str(wrapped)
    assert public_message(wrapped) == "CUDA out of memory. Tried 2 GiB"
    assert len(public_message(ValueError("x" * 5000))) == MAX_ERROR_CHARS + 3
    assert public_message(KeyError()) == "KeyError"


def test_one_error_table_gives_grpc_and_http_their_statuses(caplog):
    """gRPC and HTTP answer from the same rows (frontend.ERRORS); an error no row knows is INTERNAL / 500, logged
    with its traceback, answered with its first line only (HTTP used to send the whole text, a remote traceback
    included, as "generation failed: ...")."""
    import grpc

    from qwen_relay.server.engine import Overloaded
    from qwen_relay.server.frontend import Loading, describe
    from qwen_relay.server.http_convert import failure

    status, message = describe(Overloaded("admission queue is full"), "generation")
    assert (status.grpc, status.http, status.openai_type) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 429,
                                                               "rate_limit_error")
    assert message == "admission queue is full"
    assert (describe(Loading(), "x")[0].grpc, failure(Loading()).status) == (grpc.StatusCode.UNAVAILABLE, 503)
    crash = RuntimeError("CUDA out of memory\nTraceback (most recent call last):\n  File \"/home/ray/x.py\"")
    status, message = describe(crash, "generation")
    assert (status.grpc, status.http) == (grpc.StatusCode.INTERNAL, 500)
    assert message == "generation failed: CUDA out of memory" == failure(crash).message
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


def test_request_ids_are_escaped_in_logs():
    seq = Sequence("abc\n2026 INFO forged\u2028x", [1], GenerationParams(max_new_tokens=1), None)
    assert seq.log_id == "abc\\n2026 INFO forged\\u2028x"
    assert Sequence("İstanbul-42", [1], GenerationParams(max_new_tokens=1), None).log_id == "İstanbul-42"


@pytest.mark.parametrize("flags", [["--max-batch", "0"], ["--max-queue", "0"], ["--max-context", "-5"],
                                   ["--port", "70000"], ["--max-new-tokens-cap", "0"], ["--grace", "nan"],
                                   ["--default-max-new-tokens", "0"], ["--max-restarts", "-2"],
                                   ["--max-batch", "many"]])
def test_serve_flags_are_range_checked(flags, capsys):
    from qwen_relay.server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", *flags])
    assert flags[0] in capsys.readouterr().err


def test_default_max_new_tokens_flag_and_cap(monkeypatch):
    from qwen_relay.server.cli import build_parser, serve_options
    from qwen_relay.server.security import AUTH_TOKEN_ENV

    monkeypatch.setenv(AUTH_TOKEN_ENV, " s3cret\n")
    options = serve_options(build_parser().parse_args(["serve", "--model", "m", "--default-max-new-tokens", "64",
                                                       "--adapter-root", "/srv/adapters"]))
    assert options.default_max_new_tokens == 64 and options.adapter_roots == ("/srv/adapters",)
    assert options.auth_token == "s3cret"  # a trailing newline from $(cat token) does not lock everyone out
    with pytest.raises(ValueError, match="--default-max-new-tokens 2000 must lie in 1..1024"):
        Limits(vocab_size=10, max_context=4096, default_max_new_tokens=2000, max_new_tokens_cap=1024)
    assert Limits(vocab_size=10, max_context=4096, max_new_tokens_cap=64).default_max_new_tokens == 64
    assert Limits(vocab_size=10, max_context=4096).default_max_new_tokens == 128


def test_chat_rendering_and_tokenizing_run_off_the_event_loop(tiny_model):
    """30k tiny messages pass the size check yet take seconds to render: never on the loop every stream uses."""
    import threading

    from transformers import AutoTokenizer

    from qwen_relay.server.adapters import AdapterRegistry
    from qwen_relay.server.engine import Engine, EngineConfig
    from qwen_relay.server.frontend import Frontend
    from qwen_relay.server.metrics import Metrics
    from qwen_relay.server.servicer import from_grpc
    from qwen_relay.shards.loader import load_config
    from qwen_relay.v1 import relay_pb2

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    threads: list[str] = []
    render = tokenizer.apply_chat_template

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return render(*args, **kwargs)

    tokenizer.apply_chat_template = recording
    engine = Engine(EngineConfig(max_batch=1, max_context=256, eos_ids=frozenset()))
    engine.pipeline = object()  # ready: the servicer validates before anything reaches the engine
    adapters = AdapterRegistry(load_config(tiny_model), "m", engine)  # none loaded: what validation asks
    frontend = Frontend(engine, tokenizer, Limits(vocab_size=1024, max_context=256), adapters, Metrics())
    chat = [relay_pb2.ChatMessage(role="user", content="Merhaba")]
    seq = asyncio.run(frontend.prepare(from_grpc(relay_pb2.GenerateRequest(messages=chat)))).seq
    assert seq.prompt_ids and len(threads) == 1 and threads[0].startswith("tokenize")
    assert threads[0] != threading.main_thread().name


def test_calls_that_arrive_while_draining_are_refused_unavailable(tiny_model, loop_thread, stop_while_streaming):
    """Graceful stop keeps the port open while running calls finish and refuses new ones itself, UNAVAILABLE
    with a reason: a gRPC server already shutting down ends such a call CANCELLED ("the client gave up")."""
    import grpc

    from qwen_relay.client import RelayClient
    from qwen_relay.server.app import Relay, ServeOptions

    relay = loop_thread.run(Relay.start(ServeOptions(model=str(tiny_model), shards=2, max_context=512, port=0,
                                                     use_ray=False, grace_seconds=60)))
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=60) as client:
        tokens: list[int] = []

        def consume(streaming) -> None:
            for chunk in client.stream(prompt="Merhaba", max_new_tokens=300, ignore_eos=True):
                tokens.extend(chunk.token_ids)
                streaming.set()

        reader, stopped = stop_while_streaming(relay, consume)
        try:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                client.generate(prompt="Merhaba", max_new_tokens=2)
            assert len(tokens) < 300  # refused while the first call was still running
        finally:
            reader.join(60)
            stopped.result(60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    assert len(tokens) == 300  # the running call finished in the grace period
