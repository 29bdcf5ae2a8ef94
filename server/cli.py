"""The `qwen-relay` console script: serve, demo, and the client, training and checkpoint subcommands."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from .security import ADMIN_TOKEN_ENV, AUTH_TOKEN_ENV

if TYPE_CHECKING:
    from .app import ServeOptions

# Where each subcommand but serve is defined: "module:function" adding its subparser(s). A command imports
# only its own module (the help, all of them): they import torch, transformers' model code or the gateway,
# and `qwen-relay train` or `generate` should not spend 5 s importing the others before it reads its flags.
SUBCOMMANDS = {
    "demo": "qwen_relay.demo.main:add_parser",
    "loadtest": "qwen_relay.bench.loadgen:add_parser",
    "generate": "qwen_relay.client.cli:add_parsers",
    "chat": "qwen_relay.client.cli:add_parsers",
    "train": "qwen_relay.train.cli:add_parsers",
    "merge": "qwen_relay.train.cli:add_parsers",
    "build-checkpoint": "qwen_relay.checkpoints.synthetic:add_parser",
    "bench": "qwen_relay.bench.relay:add_parser",
}


def bounded(kind: type, low: float, high: float | None = None):
    """An argparse type: `kind` within [low, high], named in the error otherwise (`--max-batch 0` is refused)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if value != value or value < low or (high is not None and value > high):  # NaN too
            raise argparse.ArgumentTypeError(f"must lie in {low}..{high if high is not None else ''}, got {text}")
        return value

    return parse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint folder or hub id")
    parser.add_argument("--shards", type=bounded(int, 1), default=2,
                        help="number of contiguous layer slices, sized to even out their cost (LM head included)")
    parser.add_argument("--layers", help="explicit inclusive ranges in order, e.g. 0-15,16-31")
    parser.add_argument("--tensor-parallel", type=bounded(int, 1), default=1, metavar="N",
                        help="ranks per slice, each holding 1/N of every layer's heads and MLP width, all on one "
                             "node: N GPUs per slice (NCCL), or CPU processes (shared memory); default 1")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on GPU; on CPU the checkpoint's bfloat16 or float32 (float16: float32)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: one GPU per slice (per rank with --tensor-parallel) when the cluster has enough "
                             "GPUs, else CPU")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=bounded(int, 0, 65535), default=50051)
    parser.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto); default: start local Ray")
    parser.add_argument("--local-ray-cpus", type=bounded(int, 1), default=None,
                        help="CPUs of the local Ray node serve starts without --ray-address (default: all cores)")
    parser.add_argument("--no-ray", action="store_true", help="run every slice in this process, without Ray")
    parser.add_argument("--max-batch", type=bounded(int, 1), default=16,
                        help="sequences running at once (decoding, or prefilling in chunks)")
    parser.add_argument("--max-in-flight", type=bounded(int, 0), default=0,
                        help="step batches in the pipe at once (default 0: one per slice, so every slice works; "
                             "but 1 where slices share this machine's cores and --threads is not set)")
    parser.add_argument("--slice-transport", default="auto", choices=["auto", "compiled", "calls"],
                        help="how hidden states move between Ray slices: a compiled graph (auto on GPU slices) or "
                             "chained actor calls (auto on CPU slices, where the graph's channel polling costs CPU)")
    parser.add_argument("--graph-idle-teardown", type=bounded(float, 0), default=10.0, metavar="SECONDS",
                        help="tear the compiled graph down after this long without a step (its slices and the "
                             "gateway poll a core each while it idles); the next step builds it again. 0: keep it")
    parser.add_argument("--max-context", type=bounded(int, 2), default=2048, help="prompt + new tokens per sequence")
    parser.add_argument("--kv-cache-tokens", type=bounded(int, 1), default=None,
                        help="KV cache size in tokens, the same on every slice (default 32768); sequences take "
                             "blocks as their tokens fill them, so --max-context reserves nothing")
    parser.add_argument("--kv-cache-memory", type=bounded(float, 0.001), default=None, metavar="GIB",
                        help="KV cache size in GiB per slice (per rank with --tensor-parallel) instead of "
                             "--kv-cache-tokens")
    parser.add_argument("--block-size", type=bounded(int, 1), default=16, help="tokens per KV block")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="do not reuse cached prompt prefixes across requests (on by default)")
    parser.add_argument("--max-step-tokens", type=bounded(int, 2), default=512,
                        help="tokens one step may take: running decodes first, then chunks of prompts, so a long "
                             "prompt never stalls running streams for its whole prefill")
    parser.add_argument("--max-new-tokens-cap", type=bounded(int, 1), default=1024)
    parser.add_argument("--default-max-new-tokens", type=bounded(int, 1),
                        help="new tokens for a request that does not say (default: 128, or the cap if lower)")
    parser.add_argument("--cpus-per-slice", type=bounded(float, 0.01), default=None,
                        help="Ray CPUs reserved per CPU slice (default: 1; on the local Ray serve starts, a share "
                        "of the node small enough for every slice to fit, since slices take turns on the cores)")
    parser.add_argument("--threads", type=bounded(int, 0), default=0, help="torch threads per CPU slice (0: all cores)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="keep CPU weights dense (stock PyTorch kernels) instead of prepacked for oneDNN")
    parser.add_argument("--decode-step", default="auto", choices=["auto", "dynamic", "static", "compiled"],
                        help="decode steps (one token per row) of dense slices: static shapes, run eagerly or "
                        "compiled (torch.compile; CUDA graphs on a GPU), or the dynamic path prefills take "
                        "(default auto: compiled on a GPU, and on a CPU for slices of 64 MiB of weights or more; "
                        "static below)")
    parser.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        help="Ray placement-group strategy for the slices")
    parser.add_argument("--placement-timeout", type=bounded(float, 0), default=600.0,
                        help="seconds to wait for an existing cluster (--ray-address) to place the slices, e.g. "
                        "while an autoscaler adds nodes; logged every 15 s (default 600)")
    parser.add_argument("--grace", type=bounded(float, 0), default=10.0, help="seconds in-flight calls get on shutdown")
    parser.add_argument("--max-queue", type=bounded(int, 1), default=256,
                        help="requests waiting for a slot before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--recovery-timeout", type=bounded(float, 0), default=60.0,
                        help="seconds in-flight calls wait for a lost slice before UNAVAILABLE")
    parser.add_argument("--max-restarts", type=bounded(int, -1), default=-1,
                        help="Ray restarts per slice actor (-1: unlimited)")
    parser.add_argument("--adapter", action="append", type=adapter_argument, metavar="NAME=PATH",
                        help="load a PEFT LoRA adapter folder under NAME before serving (repeatable)")
    parser.add_argument("--adapter-root", action="append", metavar="DIR",
                        help="LoadAdapter may read adapter folders under DIR (repeatable); without it, adapters "
                             "load only from --adapter")
    parser.add_argument("--max-adapters", type=bounded(int, 1), default=16, help="adapters loaded at once")
    parser.add_argument("--max-adapter-mib", type=bounded(float, 0.001), default=1024.0,
                        help="largest adapter weights file loaded, in MiB")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS only")
    security.add_argument("--tls-key", metavar="PEM", help="server private key (with --tls-cert)")
    security.add_argument("--tls-client-ca", metavar="PEM",
                          help="require client certificates signed by this CA (mutual TLS; needs --tls-cert)")
    security.add_argument("--auth-token", help=f"bearer token required on every RPC but health (default: "
                          f"${AUTH_TOKEN_ENV}; prefer the variable, a command line is visible to other users)")
    security.add_argument("--admin-token", help=f"bearer token the AdapterAdmin service requires instead of "
                          f"--auth-token (default: ${ADMIN_TOKEN_ENV}); without it, --auth-token covers both")
    parser.add_argument("--metrics-port", type=bounded(int, 0, 65535), default=0,
                        help="serve Prometheus metrics on --host:PORT/metrics (default 0: off)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                             "/v1/models, /health) on --host:PORT, with the same TLS and token (default: off)")


def adapter_argument(value: str) -> tuple[str, str]:
    """`NAME=PATH` of --adapter; the name itself is checked when the adapter loads."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def parse_adapters(pairs: list[tuple[str, str]]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for name, path in pairs:
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def serve_options(args: argparse.Namespace) -> ServeOptions:
    from .app import ServeOptions

    return ServeOptions(
        adapters=parse_adapters(args.adapter or []),
        model=args.model, shards=args.shards, layers=args.layers, tensor_parallel=args.tensor_parallel,
        dtype=args.dtype, device=args.device,
        host=args.host, port=args.port, ray_address=args.ray_address, use_ray=not args.no_ray,
        local_ray_cpus=args.local_ray_cpus,
        max_batch=args.max_batch, max_in_flight=args.max_in_flight, slice_transport=args.slice_transport,
        graph_idle_teardown=args.graph_idle_teardown,
        max_context=args.max_context, kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None,
        block_size=args.block_size, prefix_cache=not args.no_prefix_cache, max_step_tokens=args.max_step_tokens,
        max_new_tokens_cap=args.max_new_tokens_cap,
        default_max_new_tokens=args.default_max_new_tokens, adapter_roots=tuple(args.adapter_root or ()),
        max_adapters=args.max_adapters, max_adapter_bytes=int(args.max_adapter_mib * 2**20),
        cpus_per_slice=args.cpus_per_slice, threads=args.threads, prepack=not args.no_prepack,
        decode_step=args.decode_step,
        placement_strategy=args.placement, placement_timeout=args.placement_timeout,
        grace_seconds=args.grace, max_queue=args.max_queue, recovery_timeout=args.recovery_timeout,
        max_restarts=args.max_restarts, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, auth_token=_token(args.auth_token, AUTH_TOKEN_ENV),
        admin_token=_token(args.admin_token, ADMIN_TOKEN_ENV),
        metrics_port=args.metrics_port, http_port=args.http_port,
    )


def _token(flag: str | None, env: str) -> str | None:
    """A token from its flag or variable, stripped: a trailing newline from `$(cat file)` must not lock everyone
    out (the client strips the same way)."""
    return (flag or os.environ.get(env) or "").strip() or None


def run_serve(args: argparse.Namespace) -> int:
    from .app import serve

    asyncio.run(serve(serve_options(args)))
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; given a known `command`, only that command's subparser (and only its module imported)."""
    parser = argparse.ArgumentParser(prog="qwen-relay", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    if command == "serve" or command not in SUBCOMMANDS:
        serve_parser = sub.add_parser("serve", help="serve a model in layer slices behind gRPC")
        add_serve_arguments(serve_parser)
        serve_parser.set_defaults(func=run_serve)
    if command != "serve":
        wanted = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
        for target in dict.fromkeys(wanted):  # once each: a module may define several commands
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # -v is the only option before it
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as e:
        logging.getLogger("qwen_relay").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
