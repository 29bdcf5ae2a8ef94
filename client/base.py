"""What the sync and asyncio clients share apart from requests and results: deadlines, TLS and metadata, and
the base class that holds a connection's settings; the transport (``grpc`` vs ``grpc.aio``) is the only thing
the two client classes differ in."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_NEW_TOKENS = 128  # what the server uses for max_new_tokens 0 (ServeOptions.default_max_new_tokens)


@dataclass(frozen=True)
class Deadlines:
    """Default deadlines, so that a stuck or unreachable server never hangs a caller.

    A call that makes no tokens (health, tokenize, model info, adapters) gets ``connect`` seconds: enough to
    connect and answer. A generation gets ``start`` seconds (connecting, queueing for a slot, the prefill)
    plus ``per_token`` seconds for each requested new token; a stream's deadline covers the whole stream.
    ``per_token`` is generous for a model that fits its slices (tens to hundreds of ms per token on CPU).
    """

    connect: float = 30.0
    start: float = 60.0
    per_token: float = 2.0
    load_adapter: float = 300.0  # reads the adapter's weights on every slice

    def generation(self, max_new_tokens: int | None) -> float:
        """The deadline of a generation; 0 or None new tokens means the server's default (128)."""
        return self.start + self.per_token * (max_new_tokens or DEFAULT_MAX_NEW_TOKENS)


def describe_rpc_error(err: grpc.RpcError) -> str:
    """``"INVALID_ARGUMENT: top_p must lie in (0, 1]"``: the status code and message, for people to read."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code is not None else 'UNKNOWN'}: {details}"


def channel_credentials(
    tls: bool = False,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS setting is given, else None (plaintext).

    ``tls=True`` alone trusts the system roots; ``root_certificates`` pins a CA (a self-signed server);
    ``private_key`` + ``certificate_chain`` add a client certificate (mutual TLS) and only work as a pair.
    """
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate, mutual TLS)")
    if not (tls or root_certificates is not None or private_key is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def call_metadata(
    auth_token: str | None, extra: Iterable[tuple[str, str]] | None = None
) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token rides on every call (plaintext or TLS alike)."""
    metadata = [(key.lower(), value) for key, value in (extra or ())]
    if auth_token:
        metadata.append(("authorization", f"Bearer {auth_token}"))
    return tuple(metadata)


class BaseClient:
    """Connection settings both clients share; subclasses only open their kind of channel.

    Args:
        target: ``host:port`` of the gateway.
        timeout: one deadline in seconds for every call (a stream's deadline covers the whole stream), in place
            of ``deadlines``; ``math.inf`` waits forever. Each method takes ``timeout=`` to override it per call.
        deadlines: the default deadlines when ``timeout`` is None (see ``Deadlines``).
        tls: use TLS with the system roots even when no certificate is given.
        root_certificates / private_key / certificate_chain: PEM bytes for ``grpc.ssl_channel_credentials``.
        server_name_override: the name to check the server certificate against (a test certificate issued
            to "localhost" while dialling 127.0.0.1).
        auth_token: sent as ``authorization: Bearer <token>`` on every call.
        metadata: extra ``(key, value)`` pairs sent on every call.
        options: extra channel options, e.g. ``[("grpc.max_receive_message_length", ...)]``.
        wait_for_ready: queue calls while the server is not up yet instead of failing with UNAVAILABLE.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        deadlines: Deadlines = Deadlines(),
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name_override: str | None = None,
        auth_token: str | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        wait_for_ready: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.deadlines = deadlines
        self._credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
        self._options = list(options or ())
        if server_name_override:
            self._options.append(("grpc.ssl_target_name_override", server_name_override))
        self._metadata = call_metadata(auth_token, metadata)
        self._wait_for_ready = wait_for_ready
        logger.debug("opening channel to %s (tls=%s)", target, self._credentials is not None)
        self._channel = self._open_channel()
        # Generated stubs work over sync and aio channels alike; ``stub`` is the raw API for what the
        # wrapper methods do not cover.
        self.stub = relay_pb2_grpc.TextGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.admin = relay_pb2_grpc.AdapterAdminStub(self._channel)  # LoRA adapter management

    @property
    def channel(self) -> Any:
        return self._channel

    @property
    def secure(self) -> bool:
        return self._credentials is not None

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _call_kwargs(self, timeout: float | None, default: float | None = None) -> dict[str, Any]:
        """Keyword arguments of one call: its deadline is ``timeout``, else the client's ``timeout``, else
        ``default`` (the ``Deadlines`` value for this kind of call), else ``deadlines.connect``."""
        chosen = next(t for t in (timeout, self.timeout, default, self.deadlines.connect) if t is not None)
        return {
            "timeout": None if math.isinf(chosen) else chosen,
            "metadata": self._metadata,
            "wait_for_ready": self._wait_for_ready,
        }

    def _generation_kwargs(self, request: relay_pb2.GenerateRequest, timeout: float | None) -> dict[str, Any]:
        return self._call_kwargs(timeout, self.deadlines.generation(request.max_new_tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, tls={self.secure})"
