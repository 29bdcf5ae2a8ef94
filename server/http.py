"""The OpenAI-compatible HTTP API, served beside gRPC from the same process, engine and validation.

Why FastAPI on uvicorn: it is the stack vLLM's and SGLang's OpenAI servers use, so clients meet the behaviour
they know; pydantic models parse the OpenAI request bodies (types only: every limit is checked by the one
path gRPC requests take, `validation.prepare`); and uvicorn runs on the gateway's own asyncio loop, so an HTTP
handler submits to the same `Engine` as a gRPC handler, with no thread hop, second process or second copy of
the model. TLS comes from the same PEM files through Python's `ssl` (a client CA makes it mutual TLS), and the
bearer token is the gRPC token, checked on every route but `/health` (as gRPC exempts only health).

A request is turned into a `GenerateRequest` and validated exactly as gRPC validates it; errors come back as
OpenAI's error JSON naming the OpenAI parameter. Options the relay cannot honour are refused, not ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field

from qwen_relay.v1 import relay_pb2

from .engine import Overloaded, Unavailable
from .reasoning import ReasoningSplitter
from .sequence import Delta, FinishReason, Sequence
from .servicer import run, split, splitter
from .validation import InvalidRequest, UnknownAdapter, prepare

if TYPE_CHECKING:
    from .app import Relay

log = logging.getLogger(__name__)

T = TypeVar("T")
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length"}
PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"})  # metric labels
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system messages


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """Strict JSON types, unknown parameters refused (a misspelt option must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = None  # unset: 1.0, as OpenAI's API (gRPC's unset is 0, greedy)
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)  # an extra (vLLM's); -1 or 0: no top-k filter
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extra, as vLLM's
    return_token_ids: bool = False  # an extra, as vLLM's: the generated token ids beside the text
    user: str | None = None  # accepted and unused, as OpenAI's own API does not act on it either
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    chat_template_kwargs: dict[str, Any] | None = None  # as vLLM's; allowed names: validation.py
    separate_reasoning: bool = False  # answer <think>...</think> as reasoning_content (SGLang's name)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def _refuse_unsupported(body: _Sampling) -> None:
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


def _template_value(value: Any, name: str) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=value)
    raise ApiError(400, f"chat_template_kwargs: {name} must be a boolean, number or string",
                   "chat_template_kwargs", "invalid_value")


def _generate_request(body: _Sampling, adapter: str) -> relay_pb2.GenerateRequest:
    """The gRPC request this HTTP request means; `validation.prepare` then checks it like any other."""
    request = relay_pb2.GenerateRequest(
        adapter=adapter, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(body.top_k or 0, 0), ignore_eos=body.ignore_eos,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or ()))
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.seed is not None:
        request.seed = body.seed
    if isinstance(body, ChatCompletionRequest):
        request.max_new_tokens = body.max_completion_tokens or body.max_tokens or 0
        for i, message in enumerate(body.messages):
            if isinstance(message.content, list):
                content = "".join(part.text for part in message.content)
            elif message.content is None:
                raise ApiError(400, f"messages[{i}].content: required", "messages", "invalid_value")
            else:
                content = message.content
            request.messages.add(role=ROLE_ALIASES.get(message.role, message.role), content=content)
        for name, value in (body.chat_template_kwargs or {}).items():
            request.chat_template_kwargs[name].CopyFrom(_template_value(value, name))
        request.separate_reasoning = body.separate_reasoning
    else:
        request.max_new_tokens = body.max_tokens or 0
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: only one prompt per request (a batch would need n choices)",
                               "prompt", "unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
    return request


def _param(error: InvalidRequest, body: _Sampling) -> str:
    """The OpenAI parameter a validation error is about (validation names the gRPC field)."""
    chat = isinstance(body, ChatCompletionRequest)
    max_name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    names = {"max_new_tokens": max_name, "prompt_token_ids": "prompt", "adapter": "model",
             "prompt": "messages" if chat else "prompt"}
    return names.get(error.field, error.field)


# -------------------------------------------------------------------------------------------- responses


@dataclass
class _Reply:
    """One request's identity in every response object and chunk."""

    seq: Sequence
    model: str
    chat: bool
    created: int
    separates_reasoning: bool  # unary chat answers carry reasoning_content (maybe empty)
    token_ids: bool  # choices carry the generated token ids (return_token_ids)

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{self.seq.request_id}", "object": kind,
                "created": self.created, "model": self.model}

    def usage(self) -> dict[str, Any]:
        prompt, completion = len(self.seq.prompt_ids), self.seq.num_generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.seq.cached_tokens or 0}}

    def choice(self, reasoning: str, text: str, reason: FinishReason | None, chunk: bool,
               token_ids: list[int]) -> dict[str, Any]:
        finish = FINISH_REASONS.get(reason) if reason is not None else None
        ids = {"token_ids": token_ids} if self.token_ids else {}
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **ids}
        message: dict[str, Any] = {} if chunk else {"role": "assistant", "content": text}
        if chunk and text:
            message["content"] = text
        if reasoning or (not chunk and self.separates_reasoning):
            message["reasoning_content"] = reasoning
        return {"index": 0, ("delta" if chunk else "message"): message, "logprobs": None, "finish_reason": finish,
                **ids}


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), None, "queue_full")
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), None, "unavailable")
    return ApiError(500, f"generation failed: {e}", None, "generation_failed")


async def _unless_disconnected(request: Request, work: Awaitable[T], seq: Sequence) -> T:
    """Await `work` (a unary answer) unless the client goes away first; then cancel it, which cancels the
    generation and frees its cache slots, as gRPC does for a cancelled unary call."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    log.info("request %s: the client disconnected; generation cancelled", seq.request_id)
    raise ApiError(499, "the client closed the connection", None, "client_closed")


class _ClosingStream(StreamingResponse):
    """Closes the body generator however the response ends. Starlette cancels the sending task when the
    client disconnects, which may leave the generator suspended at a `yield`; closing it runs the engine's
    cleanup at once, so the sequence is cancelled and its cache slot freed on every slice."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def _events(reply: _Reply, first: Delta, rest: AsyncIterator[Delta], reasoning: ReasoningSplitter | None,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: (chat: a role chunk), deltas, a finish chunk, maybe a usage chunk, [DONE]."""
    usage = {"usage": None} if include_usage else {}
    try:
        if reply.chat:
            yield _sse({**reply.head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}], **usage})
        delta: Delta | None = first
        while delta is not None:
            thought, text = split(reasoning, delta)
            if thought or text or delta.finish_reason is not None or reply.token_ids:
                choice = reply.choice(thought, text, delta.finish_reason, True, delta.token_ids)
                yield _sse({**reply.head(True), "choices": [choice], **usage})
            if delta.finish_reason is not None:
                break
            delta = await anext(rest, None)
        if include_usage:
            yield _sse({**reply.head(True), "choices": [], "usage": reply.usage()})
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        log.warning("request %s failed mid-stream: %s", reply.seq.request_id, e)
        yield _sse(_engine_error(e).body())
    finally:
        await rest.aclose()
    yield _sse("[DONE]")


# ------------------------------------------------------------------------------------------------ the app


class _CountRequests:
    """Counts every HTTP request in the gateway's request counter (as gRPC's interceptor counts RPCs), by
    "METHOD /path" and final HTTP status; a plain ASGI wrapper, so streaming and disconnects pass untouched."""

    def __init__(self, app: Any, counter: Any, paths: frozenset[str]) -> None:
        self.app, self.counter, self.paths = app, counter, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"  # bounded label values
        counted = False

        async def sending(message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start":  # counted before the caller can see the answer
                self.counter.labels(f"{scope['method']} {path}", str(message["status"])).inc()
                counted = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not counted:  # the client went away before any answer
                self.counter.labels(f"{scope['method']} {path}", "499").inc()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def build_app(relay: Relay) -> FastAPI:
    """The FastAPI app over `relay`'s servicer state (engine, tokenizer, limits, adapters, metrics)."""
    opts = relay.options
    token = opts.auth_token.encode() if opts.auth_token else None
    # Like gRPC reflection, the API's self-description is for callers holding the token.
    docs = {} if token is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qwen-relay", description="OpenAI-compatible API of a qwen-relay gateway", **docs)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"][1:] if not isinstance(p, int)] or ["body"]
        param = loc[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][2:])
        return ApiError(400, f"{param}{where}: {err['msg']}", param, "invalid_value").response()

    async def authorize(request: Request) -> None:
        if token is None:
            return
        given = _bearer(request)
        if given is not None and hmac.compare_digest(given.encode(), token):
            return
        reason = "missing bearer token" if given is None else "invalid bearer token"
        log.warning("refused HTTP %s: %s", request.url.path, reason)
        raise ApiError(401, f"{reason} (send 'Authorization: Bearer <token>')", None, "invalid_api_key")

    api = APIRouter(dependencies=[Depends(authorize)])

    def engine():
        if not relay.engine.ready:
            raise ApiError(503, "the model is still loading; retry shortly", None, "loading")
        return relay.engine

    def adapter_for(model: str) -> str:
        if model == opts.model:
            return ""
        if model in relay.adapters:
            return model
        raise ApiError(404, f"model: no model or adapter named {model!r} is served (GET /v1/models lists them)",
                       "model", "model_not_found")

    async def complete(body: _Sampling, http_request: Request) -> Any:
        eng = engine()
        _refuse_unsupported(body)
        request = _generate_request(body, adapter_for(body.model))
        servicer = relay.servicer
        try:
            seq = await servicer.off_loop(prepare, request, servicer.tokenizer, servicer.limits,
                                             relay.adapters.fingerprints())
        except InvalidRequest as e:
            param = _param(e, body)
            message = str(e)
            if param != e.field:  # name the OpenAI parameter in the message too
                message = param + message[len(e.field):]
            raise ApiError(400, message, param, "invalid_value") from None
        except UnknownAdapter as e:
            raise ApiError(404, str(e), "model", "model_not_found") from None
        reply = _Reply(seq, body.model, isinstance(body, ChatCompletionRequest), int(time.time()),
                       request.separate_reasoning, body.return_token_ids)
        reasoning = splitter(request, seq, servicer.tokenizer)
        deltas = run(eng, seq, servicer.metrics)
        try:
            first = await anext(deltas)  # queue full / slice down answer with their status, streaming or not
        except Exception as e:  # noqa: BLE001 - mapped to a status
            raise _engine_error(e) from None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _ClosingStream(_events(reply, first, deltas, reasoning, include_usage),
                                  media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async def collect() -> dict[str, Any]:
            thoughts, texts, delta = [], [], first
            try:
                while True:
                    thought, text = split(reasoning, delta)
                    thoughts.append(thought)
                    texts.append(text)
                    if delta.finish_reason is not None:
                        break
                    delta = await anext(deltas)
            except Exception as e:  # noqa: BLE001 - mapped to a status
                raise _engine_error(e) from None
            finally:
                await deltas.aclose()
            choice = reply.choice("".join(thoughts), "".join(texts), delta.finish_reason, False, seq.generated)
            return {**reply.head(False), "choices": [choice], "usage": reply.usage()}

        return await _unless_disconnected(http_request, collect(), seq)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await complete(body, request)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(body, request)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(relay.started)
        base = {"id": opts.model, "object": "model", "created": created, "owned_by": "qwen-relay",
                "root": opts.model, "parent": None}
        adapters = [{"id": spec.name, "object": "model", "created": created, "owned_by": "qwen-relay",
                     "root": spec.path, "parent": opts.model} for spec in relay.adapters.list()]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Mirrors gRPC health: SERVING once every slice is warm, NOT_SERVING while loading, recovering or
        draining (503, so a load balancer's plain HTTP check takes the gateway out of rotation)."""
        status = "SERVING" if relay.serving else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if relay.serving else 503)

    app.include_router(api)
    app.add_middleware(_CountRequests, counter=relay.metrics.requests, paths=PATHS)
    return app


# ----------------------------------------------------------------------------------------------- the port


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The gateway owns SIGINT/SIGTERM (app.serve drains gRPC and HTTP together); uvicorn must not."""
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound now so a taken port fails at start and port 0 has its number at once."""
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as e:  # as the gRPC port reports it: the CLI prints the reason, not a traceback
        raise RuntimeError(f"cannot listen on {host}:{port} (HTTP): {e.strerror or e}") from e


class HttpServer:
    """uvicorn on the running event loop, serving `build_app(relay)`."""

    def __init__(self, relay: Relay) -> None:
        opts = relay.options
        self.socket = _listen(opts.host, opts.http_port)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            build_app(relay), host=opts.host, port=self.port, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=opts.grace_seconds, ssl_certfile=opts.tls_cert,
            ssl_keyfile=opts.tls_key, ssl_ca_certs=opts.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if opts.tls_client_ca else ssl.CERT_NONE)
        try:
            config.load()  # reads the certificates now: a bad file fails the start, not the first request
        except BaseException:
            self.socket.close()
            raise
        self.tls = config.ssl is not None
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="http-server")

    async def stop(self, grace: float) -> None:
        """Stop accepting, give open responses up to `grace` seconds, then cancel what is left."""
        # uvicorn reports a zero timeout as exceeded even with nothing open: give it a moment at least.
        self.server.config.timeout_graceful_shutdown = max(grace, 0.1)
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.socket.close()
