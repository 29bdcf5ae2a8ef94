"""Transport security and caller authentication for the gateway.

TLS (and mutual TLS with a client CA) protects every RPC on the port, health included. The bearer token is
checked by a server interceptor on every RPC except `grpc.health.v1.Health`: orchestrators and load
balancers probe health without holding secrets, and health reveals nothing but SERVING / NOT_SERVING.
Reflection is NOT exempt: it is a free map of the API for whoever reaches the port, and tools such as
grpcurl send the token as easily as any other header.

Administration (the AdapterAdmin service: it makes the gateway and every slice read folders) can require a
token of its own (`--admin-token` / $QWEN_RELAY_ADMIN_TOKEN): then the generation token does not open it, so
the many clients that generate need not hold the power to load adapters. Without one, the generation token
covers both (adapter loads are still confined to --adapter-root, server/adapters.py).

The token itself is never logged: it stays out of `ServeOptions.__repr__`, and log lines say only whether
a token is configured.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "QWEN_RELAY_AUTH_TOKEN"  # the client CLI reads the same variable
ADMIN_TOKEN_ENV = "QWEN_RELAY_ADMIN_TOKEN"
ADMIN_PREFIX = "/qwen_relay.v1.AdapterAdmin/"  # methods the admin token guards, when one is set
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)  # methods callable without the token
_BEARER = "bearer"


def server_credentials(cert: str | None, key: str | None,
                       client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext. With `client_ca`, clients must present a
    certificate signed by it (mutual TLS). Half a configuration is an error, never a silent plaintext port."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if cert is None:
        return None
    chain, private_key = Path(cert).read_bytes(), Path(key).read_bytes()
    roots = Path(client_ca).read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach; any other name counts as exposed."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, tls: bool, token: bool) -> None:
    """Log a warning for each protection missing on a port other machines can reach."""
    if is_loopback(host):
        return
    if not tls:
        log.warning("binding %s without TLS: prompts, completions and any token cross the network in "
                    "plaintext (use --tls-cert/--tls-key)", host)
    if not token:
        log.warning("binding %s without an auth token: anyone who reaches the port can generate "
                    "(use --auth-token or $%s)", host, AUTH_TOKEN_ENV)


def _bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            return token.strip() if scheme.lower() == _BEARER else None
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that ends the call UNAUTHENTICATED, reading nothing."""

    async def abort(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    if handler is not None and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else \
            grpc.unary_stream_rpc_method_handler
        return make(abort_stream)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but health; UNAUTHENTICATED otherwise. With an
    `admin_token`, AdapterAdmin methods require that one instead; with only an admin token, generation is open.

    The comparison is constant-time (`hmac.compare_digest`), so response timing does not leak how much of a
    guessed token was right.
    """

    def __init__(self, token: str | None, admin_token: str | None = None) -> None:
        if not token and not admin_token:
            raise ValueError("an empty auth token would let everyone in")
        self._token = token.encode() if token else None
        self._admin_token = admin_token.encode() if admin_token else None

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(token=<redacted>)"

    def _expected(self, method: str) -> bytes | None:
        if self._admin_token is not None and method.startswith(ADMIN_PREFIX):
            return self._admin_token
        return self._token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        expected = self._expected(method)
        if expected is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(handler_call_details)
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode(), expected):
            return await continuation(handler_call_details)
        reason = "missing bearer token" if token is None else "invalid bearer token"
        log.warning("refused %s: %s", method, reason)
        return _refusal(await continuation(handler_call_details), f"{reason} (send 'authorization: Bearer <token>')")
