"""The OpenAI-compatible HTTP API, served beside gRPC from the same process, engine and validation: the server
and its routes, a thin adapter over the front-end core (server/frontend.py). Bodies: http_bodies.py;
conversion to request records and back to OpenAI's JSON and event stream: http_convert.py.

Why FastAPI on uvicorn: it is the stack vLLM's and SGLang's OpenAI servers use, so clients meet the behaviour
they know; pydantic models parse the OpenAI request bodies (types only: every limit is checked by the one
validation path gRPC requests take); and uvicorn runs on the gateway's own asyncio loop, so an HTTP handler
submits to the same `Engine` as a gRPC handler, with no thread hop, second process or second copy of the model.
TLS comes from the same PEM files through Python's `ssl` (a client CA makes it mutual TLS), and the bearer token
is the gRPC token, checked on every route but `/health` (as gRPC exempts only health). The token is checked,
and the body bounded to gRPC's message limit, by an ASGI wrapper before anything reads the body: FastAPI reads
and parses a body before its dependencies run, and uvicorn sets no size limit.

A request becomes a `GenerationRequest` and is validated exactly as a gRPC request is; errors come back as
OpenAI's error JSON naming the OpenAI parameter, with the status `frontend.ERRORS` gives them. Options the
relay cannot honour are refused, not ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter

from qwen_relay.shards.adapters import AdapterSpec

from .frontend import Frontend
from .http_bodies import ApiError, ChatCompletionRequest, CompletionRequest, Sampling, refuse_unsupported
from .http_convert import Reply, events, failure, invalid, to_request
from .validation import MAX_MESSAGE_BYTES, InvalidRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"})  # metric labels
OPEN_PATHS = frozenset({"/health"})  # answered without the token, as gRPC health


class AdapterListing(Protocol):
    """The gateway's adapter registry, as far as the HTTP API uses it."""

    def __contains__(self, name: object) -> bool: ...

    def list(self) -> list[AdapterSpec]: ...


@dataclass(frozen=True)
class HttpSettings:
    """The `serve` options the HTTP port needs."""

    host: str
    port: int
    model_id: str  # the base model's name in `model` (`--model` as given)
    auth_token: str | None = None
    admin_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grace_seconds: float = 10.0


@dataclass(frozen=True)
class HttpHandle:
    """What the HTTP API serves from (app.py builds it): the front-end core and a few facts, not the gateway."""

    frontend: Frontend
    adapters: AdapterListing
    serving: Callable[[], bool]  # what gRPC health says
    requests: Counter  # the gateway's request counter, which gRPC's interceptor also counts in
    created: int  # when the gateway started, as OpenAI's model objects say it
    settings: HttpSettings


async def _unless_disconnected(request: Request, work: Awaitable[T], what: str) -> T:
    """Await `work` unless the client goes away first; then cancel it, as gRPC cancels a cancelled call: a
    request waiting for the tokenizer or in the admission queue gives its place up at once (it used to keep it
    until its first token, costing a prefill and turning live clients away with 429), a running unary one
    stops generating and frees its KV blocks."""
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
    log.info("%s: the client disconnected; cancelled", what)
    raise ApiError(499, "the client closed the connection", None, "client_closed")


class _ClosingStream(StreamingResponse):
    """Closes the body generator however the response ends. Starlette cancels the sending task when the
    client disconnects, which may leave the generator suspended at a `yield`; closing it runs the engine's
    cleanup at once, so the sequence is cancelled and its KV blocks freed."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


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


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The bearer token of raw ASGI headers, if any."""
    value = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class _Gate:
    """Token first, then a bounded body, before the app sees the request (a plain ASGI wrapper).

    Without a valid token the answer is 401 before one byte of the body is read; a body over
    `max_bytes` (gRPC's message limit) is 413, refused from its Content-Length alone when it has one, else
    once the bytes read pass the limit. A body within the limit is read here and handed on, so the app's
    later `receive` calls see only what follows it (a disconnect). `scope["state"]["admin"]` says whether the
    caller presented the admin token (`GET /v1/models` shows adapter paths only then)."""

    def __init__(self, app: Any, token: bytes | None, admin_token: bytes | None, max_bytes: int) -> None:
        self.app, self.token, self.admin_token, self.max_bytes = app, token, admin_token, max_bytes

    def _refusal(self, scope) -> ApiError | None:
        given = _bearer(scope["headers"])
        admin = given is not None and self.admin_token is not None and hmac.compare_digest(given, self.admin_token)
        scope.setdefault("state", {})["admin"] = admin
        if self.token is None or scope["path"] in OPEN_PATHS or (admin and scope["path"] == "/v1/models"):
            return None
        if given is not None and hmac.compare_digest(given, self.token):
            return None
        reason = "missing bearer token" if given is None else "invalid bearer token"
        log.warning("refused HTTP %s: %s", scope["path"], reason)
        return ApiError(401, f"{reason} (send 'Authorization: Bearer <token>')", None, "invalid_api_key")

    def _too_large(self, size: int | str) -> ApiError:
        return ApiError(413, f"request body: {size} bytes is over the limit of {self.max_bytes} bytes", None,
                        "request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if refusal is None and length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            refusal = (self._too_large(int(length)) if length.isdigit()
                       else ApiError(400, "Content-Length: not a number", None, "invalid_value"))
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(f"more than {size}").response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        body: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict[str, Any]:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


def build_app(handle: HttpHandle) -> FastAPI:
    """The FastAPI app over `handle`."""
    opts, frontend = handle.settings, handle.frontend
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

    api = APIRouter()

    def adapter_for(model: str) -> str:
        if model == opts.model_id:
            return ""
        if model in handle.adapters:
            return model
        raise ApiError(404, f"model: no model or adapter named {model!r} is served (GET /v1/models lists them)",
                       "model", "model_not_found")

    async def complete(body: Sampling, http_request: Request) -> Any:
        try:
            frontend.check_ready()
            refuse_unsupported(body)
            request = to_request(body, adapter_for(body.model))
            prepared = await _unless_disconnected(http_request, frontend.prepare(request), "a request being prepared")
            reply = Reply(prepared, body.model, isinstance(body, ChatCompletionRequest), int(time.time()),
                          request.separate_reasoning, body.return_token_ids)
            pieces = frontend.pieces(prepared)
            # Queue full or a slice down answer with their status, streaming or not.
            first = await _unless_disconnected(http_request, anext(pieces),
                                               f"request {prepared.seq.request_id} (queued)")
        except ApiError:
            raise
        except InvalidRequest as e:
            raise invalid(e, body) from None
        except Exception as e:  # noqa: BLE001 - mapped to a status
            raise failure(e) from None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _ClosingStream(events(reply, first, pieces, include_usage), media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache"})

        async def collect() -> dict[str, Any]:
            try:
                return reply.completion(await frontend.fold(first, pieces, prepared))
            except Exception as e:  # noqa: BLE001 - mapped to a status
                raise failure(e) from None

        return await _unless_disconnected(http_request, collect(), f"request {prepared.seq.request_id}")

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await complete(body, request)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(body, request)

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        """Names only; where each adapter's folder is (`root`) only to a caller presenting the admin token, as
        gRPC's ListAdapters shows paths only to it."""
        admin, created = request.state.admin, handle.created
        base = {"id": opts.model_id, "object": "model", "created": created, "owned_by": "qwen-relay",
                "root": opts.model_id, "parent": None}
        adapters = [{"id": spec.name, "object": "model", "created": created, "owned_by": "qwen-relay",
                     "root": spec.path if admin else spec.name, "parent": opts.model_id}
                    for spec in handle.adapters.list()]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Mirrors gRPC health: SERVING once every slice is warm, NOT_SERVING while loading, recovering or
        draining (503, so a load balancer's plain HTTP check takes the gateway out of rotation)."""
        serving = handle.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    app.include_router(api)
    admin_token = opts.admin_token.encode() if opts.admin_token else None
    app.add_middleware(_Gate, token=token, admin_token=admin_token, max_bytes=MAX_MESSAGE_BYTES)
    app.add_middleware(_CountRequests, counter=handle.requests, paths=PATHS)  # outermost: counts refusals
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
    """uvicorn on the running event loop, serving `build_app(handle)`."""

    def __init__(self, handle: HttpHandle) -> None:
        opts = handle.settings
        self.socket = _listen(opts.host, opts.port)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            build_app(handle), host=opts.host, port=self.port, log_level="warning", access_log=False,
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
