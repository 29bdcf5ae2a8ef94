"""Chat-template options and reasoning apart from the answer, over gRPC and HTTP (in-process slices).

The tiny checkpoint gets a Qwen3-style template: `enable_thinking=false` closes an empty `<think>` block in the
prompt, otherwise the prompt opens one (as Qwen's thinking checkpoints do), so everything the model writes
is reasoning until it closes the block. (The tiny random model repeats the prompt's last token: after
`<think>` it writes `>>>>`, which makes a visible reasoning text.)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import grpc
import openai
import pytest
from transformers import AutoTokenizer

from qwen_relay.checkpoints.synthetic import CHAT_TEMPLATE
from qwen_relay.client import RelayClient, build_generate_request
from qwen_relay.client.cli import template_option
from qwen_relay.server.app import Relay, ServeOptions
from qwen_relay.server.reasoning import ReasoningSplitter, opens_reasoning

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
MAX_NEW = 16
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}",
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>' }}{%- endif %}",
)


# ------------------------------------------------------------------------------------------ the splitter


def _split(text: str, in_reasoning: bool, cuts: list[int]) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning)
    reasoning, answer = "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, t = splitter.add(text[a:b])
        reasoning, answer = reasoning + r, answer + t
    r, t = splitter.flush()
    return reasoning + r, answer + t


@pytest.mark.parametrize(("text", "in_reasoning", "expected"), [
    ("<think>\nLet me see.\n\nYes.\n</think>\n\nBlue: Rayleigh.", False, ("Let me see.\n\nYes.", "Blue: Rayleigh.")),
    ("  <think>x</think>y", False, ("x", "y")),
    ("<think>\n\n</think>\n\nhello", False, ("", "hello")),
    ("no tags at all", False, ("", "no tags at all")),
    ("\n\nplain after newlines", False, ("", "\n\nplain after newlines")),
    ("<thin", False, ("", "<thin")),
    ("a < b </thinking> ok", False, ("", "a < b </thinking> ok")),
    ("ğüş düşün\n</think>\n\ncevap ı", True, ("ğüş düşün", "cevap ı")),
    ("still thinking </thi", True, ("still thinking </thi", "")),
    ("x </thinking> y\n</think>z", True, ("x </thinking> y", "z")),
])
def test_splitter_at_every_cut(text, in_reasoning, expected):
    assert _split(text, in_reasoning, []) == expected
    for cut in range(1, len(text)):
        assert _split(text, in_reasoning, [cut]) == expected, cut
    assert _split(text, in_reasoning, list(range(1, len(text)))) == expected  # one character at a time


def test_opens_reasoning(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert opens_reasoning(tokenizer, ids("<|im_start|>assistant\n<think>\n"))
    assert not opens_reasoning(tokenizer, ids("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    assert not opens_reasoning(tokenizer, ids("<|im_start|>assistant\n"))


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def thinking_model(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def relay(loop_thread, thinking_model):
    options = ServeOptions(model=str(thinking_model), shards=1, use_ray=False, max_context=256, port=0,
                           http_port=0)
    relay = loop_thread.run(Relay.start(options))
    yield relay
    loop_thread.run(relay.stop(grace=0))


@pytest.fixture(scope="module")
def client(relay):
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as c:
        yield c


def _expected(full: str, in_reasoning: bool) -> tuple[str, str]:
    return _split(full, in_reasoning, [])


def test_template_options_reach_the_template(client, thinking_model):
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    thinking = client.tokenize(messages=MESSAGES)
    quiet = client.tokenize(messages=MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(thinking.token_ids).endswith("<|im_start|>assistant\n<think>")
    assert tokenizer.decode(quiet.token_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    run = client.generate(messages=MESSAGES, max_new_tokens=4, chat_template_kwargs={"enable_thinking": False})
    assert run.prompt_tokens == quiet.count


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "not-thinking"])
def test_reasoning_apart_over_grpc_and_http(client, relay, thinking_model, thinking):
    params = dict(max_new_tokens=MAX_NEW, ignore_eos=True, chat_template_kwargs={"enable_thinking": thinking})
    full = client.generate(messages=MESSAGES, **params)
    assert full.reasoning == ""  # not asked: text carries everything, as before
    reasoning, answer = _expected(full.text, in_reasoning=thinking)
    if thinking:
        assert reasoning  # the prompt opened the block: the model's words are reasoning
    else:
        assert reasoning == "" and answer == full.text

    unary = client.generate(messages=MESSAGES, separate_reasoning=True, **params)
    assert (unary.reasoning, unary.text, unary.token_ids) == (reasoning, answer, full.token_ids)
    chunks = list(client.stream(messages=MESSAGES, separate_reasoning=True, **params))
    assert ("".join(c.reasoning for c in chunks), "".join(c.text for c in chunks)) == (reasoning, answer)

    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{relay.http_port}/v1", api_key="unused", max_retries=0)
    body = dict(model=str(thinking_model), messages=MESSAGES, max_tokens=MAX_NEW, temperature=0,
                extra_body={"ignore_eos": True, "separate_reasoning": True,
                            "chat_template_kwargs": {"enable_thinking": thinking}})
    message = oai.chat.completions.create(**body).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (reasoning, answer)
    deltas = [c.choices[0].delta for c in oai.chat.completions.create(stream=True, **body) if c.choices]
    streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert (streamed, "".join(d.content or "" for d in deltas)) == (reasoning, answer)


def test_template_options_are_allow_listed(client):
    for options, fragment in (({"add_generation_prompt": False}, "not an allowed option"),
                              ({"enable_thinking": "no"}, "must be a bool")):
        with pytest.raises(grpc.RpcError) as err:
            client.generate(messages=MESSAGES, chat_template_kwargs=options)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("chat_template_kwargs:") and fragment in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.generate("plain prompt", chat_template_kwargs={"enable_thinking": False})
    assert "only applies to messages" in err.value.details()


def test_client_builds_template_options():
    request = build_generate_request(messages=MESSAGES, chat_template_kwargs={"enable_thinking": False, "k": 2},
                                     separate_reasoning=True)
    assert request.chat_template_kwargs["enable_thinking"].bool_value is False
    assert request.chat_template_kwargs["k"].number_value == 2 and request.separate_reasoning
    assert not build_generate_request("x").chat_template_kwargs  # unset stays unset (old servers see nothing)
    with pytest.raises(TypeError):
        build_generate_request(messages=MESSAGES, chat_template_kwargs={"tools": [1]})
    assert template_option("enable_thinking=false") == ("enable_thinking", False)
    for bad in ("enable_thinking", "enable_thinking=nope", "=true", "x=[1]"):
        with pytest.raises(argparse.ArgumentTypeError):
            template_option(bad)
