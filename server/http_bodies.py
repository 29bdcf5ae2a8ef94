"""OpenAI request bodies (pydantic models: JSON types only, every limit is checked by validation.py) and the
error an HTTP answer carries (`ApiError`: OpenAI's error JSON with its HTTP status)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .frontend import OPENAI_ERROR_TYPES, Status

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, status: Status, message: str, param: str | None = None) -> ApiError:
        """The HTTP side of a row of `frontend.ERRORS`."""
        return cls(status.http, message, param, status.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": OPENAI_ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _AsciiJSON(self.body(), status_code=self.status)


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote the client's text, and a lone surrogate in it (valid in
    JSON's `\\ud800`, not in UTF-8) must not turn the answer into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _utf8(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8 text (protobuf, the tokenizer) can
    hold: refused here, naming the field, instead of failing later as a 500."""
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    """Strict JSON types, unknown parameters refused (a misspelt option must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ResponseFormat(_Body):
    type: Text


class Sampling(_Body):
    """What chat and text completions share."""

    model: Text
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = None  # unset: 1.0, as OpenAI's API (gRPC's unset is 0, greedy)
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)  # an extra (vLLM's); -1 or 0: no top-k filter
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extra, as vLLM's
    return_token_ids: bool = False  # an extra, as vLLM's: the generated token ids beside the text
    user: Text | None = None  # accepted and unused, as OpenAI's own API does not act on it either
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[Text, float] | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    chat_template_kwargs: dict[Text, Any] | None = None  # as vLLM's; allowed names: validation.py
    separate_reasoning: bool = False  # answer <think>...</think> as reasoning_content (SGLang's name)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Text | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Text | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None


def refuse_unsupported(body: Sampling) -> None:
    """400 naming the first option the relay cannot honour."""
    checks: list[tuple[str, bool, str]] = [
        ("n", body.n != 1, "only n=1 is supported"),
        ("presence_penalty", body.presence_penalty != 0, "penalties are not supported"),
        ("frequency_penalty", body.frequency_penalty != 0, "penalties are not supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ("stream_options", body.stream_options is not None and not body.stream,
         "stream_options needs stream: true"),
    ]
    if isinstance(body, ChatCompletionRequest):
        checks += [
            ("logprobs", bool(body.logprobs) or body.top_logprobs is not None, "logprobs are not supported"),
            ("tools", bool(body.tools), "tools are not supported"),
            ("tool_choice", body.tool_choice not in (None, "none"), "tools are not supported"),
            ("functions", bool(body.functions), "functions are not supported"),
            ("function_call", body.function_call not in (None, "none"), "functions are not supported"),
            ("response_format", body.response_format is not None and body.response_format.type != "text",
             "only the text response format is supported"),
        ]
    else:
        assert isinstance(body, CompletionRequest)
        checks += [
            ("logprobs", body.logprobs is not None, "logprobs are not supported"),
            ("echo", body.echo, "echo is not supported"),
            ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
            ("suffix", body.suffix is not None, "suffix is not supported"),
        ]
    for param, bad, why in checks:
        if bad:
            raise ApiError(400, f"{param}: {why}", param, "unsupported_parameter")
    for i, message in enumerate(getattr(body, "messages", ())):
        if message.name is not None:  # the chat template has no place for it: it would be dropped
            raise ApiError(400, f"messages[{i}].name: message names are not supported", "messages",
                           "unsupported_parameter")
