"""Client subcommands for the ``qwen-relay`` console script: ``generate`` and ``chat``.

The server's CLI owns the top-level parser and calls ``add_parsers(subparsers)``; each subcommand sets
``args.func(args) -> int`` (the exit code). ``python -m qwen_relay.client.cli`` runs them standalone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from .base import DEFAULT_TARGET, describe_rpc_error
from .chat import HELP, run_chat
from .client import RelayClient

AUTH_TOKEN_ENV = "QWEN_RELAY_AUTH_TOKEN"

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """Flags that say where the gateway is and how to reach it (shared by every client subcommand)."""
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, help="gateway host:port (default: %(default)s)")
    group.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline per call in seconds (default: 60 s + 2 s per new token for a generation, 30 s otherwise; "
        "a stream's covers the whole stream)",
    )
    group.add_argument(
        "--auth-token",
        default=None,
        help=f"bearer token sent on every call (default: ${AUTH_TOKEN_ENV})",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    group.add_argument("--ca-cert", metavar="PEM", help="CA certificate to trust; implies --tls")
    group.add_argument("--client-cert", metavar="PEM", help="client certificate chain (mutual TLS)")
    group.add_argument("--client-key", metavar="PEM", help="client private key (mutual TLS)")
    group.add_argument("--server-name", help="name to check the server certificate against")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Generation parameters; unset flags leave the server's defaults in place."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=None, help="0 or unset: the server default")
    group.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    group.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop sequence (repeatable)"
    )
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    group.add_argument("--adapter", default=None, help="LoRA adapter name (default: the base model)")
    group.add_argument(
        "--template-option", action="append", type=template_option, default=None, metavar="NAME=JSON",
        help="chat-template option for chat messages, e.g. enable_thinking=false (repeatable)",
    )


def template_option(value: str) -> tuple[str, Any]:
    """``NAME=JSON`` of --template-option: ``enable_thinking=false`` gives ("enable_thinking", False)."""
    name, sep, raw = value.partition("=")
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        parsed = None
    if not sep or not name or not isinstance(parsed, bool | int | float | str):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON (a bool, number or quoted string), got {value!r}")
    return name, parsed


def add_parsers(subparsers: Any) -> None:
    """Registers ``generate`` and ``chat`` on the console script's subparsers."""
    gen = subparsers.add_parser(
        "generate",
        help="generate a completion from a running gateway",
        description="Send one prompt to a qwen-relay gateway and print the completion.",
    )
    gen.add_argument("prompt", help='the prompt; "-" reads it from stdin')
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template applied)"
    )
    gen.add_argument("--system", default=None, help="system prompt; implies --chat")
    gen.add_argument("--request-id", default=None, help="id to tag the request with (echoed back)")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument(
        "--json", action="store_true", help="print the result as JSON (one object per chunk with --stream)"
    )
    add_sampling_args(gen)
    add_connection_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = subparsers.add_parser(
        "chat",
        help="interactive chat with a running gateway",
        description="Chat in the terminal; the reply streams as it is generated. " + HELP.strip(),
    )
    chat.add_argument("--system", default=None, help="system prompt kept at the top of the conversation")
    add_sampling_args(chat)
    add_connection_args(chat)
    chat.set_defaults(func=cmd_chat)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def client_from_args(args: argparse.Namespace) -> RelayClient:
    """A RelayClient configured from the connection flags (the token falls back to the environment)."""
    return RelayClient(
        args.target,
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=_read(args.ca_cert),
        certificate_chain=_read(args.client_cert),
        private_key=_read(args.client_key),
        server_name_override=args.server_name,
        auth_token=args.auth_token or os.environ.get(AUTH_TOKEN_ENV) or None,
    )


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags as keyword arguments for RelayClient.generate / stream."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "adapter": args.adapter,
        "chat_template_kwargs": dict(args.template_option or ()),
    }


def _connect(args: argparse.Namespace) -> RelayClient | None:
    try:
        return client_from_args(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_generate(args: argparse.Namespace) -> int:
    """``qwen-relay generate PROMPT``: prints the completion (text, or JSON with --json)."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        source: dict[str, Any] = {"messages": messages}
    else:
        source = {"prompt": prompt}
    params = sampling_params(args)
    params["request_id"] = args.request_id
    client = _connect(args)
    if client is None:
        return EXIT_USAGE
    out = sys.stdout
    try:
        with client:
            if not args.stream:
                completion = client.generate(**source, **params)
                if args.json:
                    print(json.dumps(completion.to_dict(), ensure_ascii=False), file=out)
                else:
                    print(completion.text, file=out)
                return 0
            for chunk in client.stream(**source, **params):
                if args.json:
                    print(json.dumps(chunk.to_dict(), ensure_ascii=False), file=out, flush=True)
                else:
                    out.write(chunk.text)
                    out.flush()
            if not args.json:
                out.write("\n")
            return 0
    except grpc.RpcError as err:
        if args.stream and not args.json:
            out.write("\n")
        print(f"error: {describe_rpc_error(err)}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        out.write("\n")
        return EXIT_INTERRUPTED


def cmd_chat(args: argparse.Namespace) -> int:
    """``qwen-relay chat``: the interactive chat on stdin/stdout.

    Only warnings and errors are logged (to stderr) unless ``-v``: INFO lines would land in the middle of the
    conversation; a failed turn is reported inline with its status instead.
    """
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    client = _connect(args)
    if client is None:
        return EXIT_USAGE
    if sys.stdin.isatty():
        print(f"chatting with {args.target}. {HELP}", end="", file=sys.stderr)
    with client:
        return run_chat(client, sys.stdin, sys.stdout, system=args.system, **sampling_params(args))


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser holding just the client subcommands."""
    parser = argparse.ArgumentParser(prog="qwen-relay", description="qwen-relay client")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
