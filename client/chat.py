"""Interactive terminal chat against a qwen-relay gateway.

The client keeps the whole conversation and sends it every turn (the server is stateless between
requests), streaming the assistant's reply to the terminal as it arrives.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TextIO

import grpc

from .base import describe_rpc_error
from .results import Chunk, CompletionBuilder

logger = logging.getLogger(__name__)

PROMPT = "> "
HELP = "/reset clears the conversation, /exit (or end of input) quits, /help shows this.\n"


class StreamingClient(Protocol):
    """What run_chat needs from a client: RelayClient fits, and so does a test double."""

    def stream(self, *, messages: Sequence[dict[str, str]], **params: Any) -> Iterator[Chunk]: ...


def _fresh_history(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _stream_reply(
    client: StreamingClient, history: list[dict[str, str]], out: TextIO, params: dict[str, Any]
) -> str | None:
    """Streams one assistant turn to ``out``; its text, or None when the turn failed or was interrupted."""
    builder = CompletionBuilder()
    wrote = False
    try:
        chunks = client.stream(messages=list(history), **params)
        # closing() cancels the RPC at once if we stop early (Ctrl-C), rather than whenever GC runs.
        with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
            for chunk in chunks:
                builder.add(chunk)
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
                    wrote = True
    except grpc.RpcError as err:
        logger.debug("chat turn failed", exc_info=True)
        out.write(("\n" if wrote else "") + f"[error {describe_rpc_error(err)}]\n")
        return None
    except KeyboardInterrupt:
        out.write(("\n" if wrote else "") + "[interrupted]\n")
        return None
    out.write("\n")
    out.flush()
    return builder.text


def run_chat(
    client: StreamingClient,
    input_stream: TextIO,
    output_stream: TextIO,
    system: str | None = None,
    **params: Any,
) -> int:
    """Runs the chat loop until /exit or end of input; returns the exit code (0).

    A failed or interrupted turn prints the gRPC status and is dropped from the history (with its user
    message), so the next request is again a well-formed user/assistant alternation.
    ``params`` are generation parameters (temperature, max_new_tokens, ...) used on every turn.
    """
    history = _fresh_history(system)
    out = output_stream
    while True:
        out.write(PROMPT)
        out.flush()
        try:
            line = input_stream.readline()
        except KeyboardInterrupt:
            out.write("\n")
            break
        if not line:  # end of input
            out.write("\n")
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = _fresh_history(system)
            out.write("(conversation cleared)\n")
            continue
        if command == "/help":
            out.write(HELP)
            continue
        history.append({"role": "user", "content": text})
        reply = _stream_reply(client, history, out, params)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})
    out.flush()
    return 0
