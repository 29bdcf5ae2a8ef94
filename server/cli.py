"""The `qwen-relay` console script: serve, demo, and the client, training and checkpoint subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .app import ServeOptions, serve
from .security import AUTH_TOKEN_ENV


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint folder or hub id")
    parser.add_argument("--shards", type=int, default=2, help="number of contiguous layer slices (even split)")
    parser.add_argument("--layers", help="explicit inclusive ranges in order, e.g. 0-15,16-31")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: one GPU per slice when the cluster has enough GPUs, else CPU")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto); default: start local Ray")
    parser.add_argument("--local-ray-cpus", type=int, default=None,
                        help="CPUs of the local Ray node serve starts without --ray-address (default: all cores)")
    parser.add_argument("--no-ray", action="store_true", help="run every slice in this process, without Ray")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache slots)")
    parser.add_argument("--max-context", type=int, default=2048, help="prompt + new tokens per sequence")
    parser.add_argument("--max-new-tokens-cap", type=int, default=1024)
    parser.add_argument("--cpus-per-slice", type=float, default=None,
                        help="Ray CPUs reserved per CPU slice (default: 1; on the local Ray serve starts, a share "
                        "of the node small enough for every slice to fit, since slices take turns on the cores)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per CPU slice (0: all cores)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="keep CPU weights dense (stock PyTorch kernels) instead of prepacked for oneDNN")
    parser.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        help="Ray placement-group strategy for the slices")
    parser.add_argument("--placement-timeout", type=float, default=600.0,
                        help="seconds to wait for an existing cluster (--ray-address) to place the slices, e.g. "
                        "while an autoscaler adds nodes; logged every 15 s (default 600)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--recovery-timeout", type=float, default=60.0,
                        help="seconds in-flight calls wait for a lost slice before UNAVAILABLE")
    parser.add_argument("--max-restarts", type=int, default=-1, help="Ray restarts per slice actor (-1: unlimited)")
    parser.add_argument("--adapter", action="append", type=adapter_argument, metavar="NAME=PATH",
                        help="load a PEFT LoRA adapter folder under NAME before serving (repeatable)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS only")
    security.add_argument("--tls-key", metavar="PEM", help="server private key (with --tls-cert)")
    security.add_argument("--tls-client-ca", metavar="PEM",
                          help="require client certificates signed by this CA (mutual TLS; needs --tls-cert)")
    security.add_argument("--auth-token", help=f"bearer token required on every RPC but health (default: "
                          f"${AUTH_TOKEN_ENV}; prefer the variable, a command line is visible to other users)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on --host:PORT/metrics (default 0: off)")


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
    return ServeOptions(
        adapters=parse_adapters(args.adapter or []),
        model=args.model, shards=args.shards, layers=args.layers, dtype=args.dtype, device=args.device,
        host=args.host, port=args.port, ray_address=args.ray_address, use_ray=not args.no_ray,
        local_ray_cpus=args.local_ray_cpus,
        max_batch=args.max_batch, max_context=args.max_context, max_new_tokens_cap=args.max_new_tokens_cap,
        cpus_per_slice=args.cpus_per_slice, threads=args.threads, prepack=not args.no_prepack,
        placement_strategy=args.placement, placement_timeout=args.placement_timeout,
        grace_seconds=args.grace, max_queue=args.max_queue, recovery_timeout=args.recovery_timeout,
        max_restarts=args.max_restarts, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, auth_token=args.auth_token or os.environ.get(AUTH_TOKEN_ENV) or None,
        metrics_port=args.metrics_port,
    )


def run_serve(args: argparse.Namespace) -> int:
    asyncio.run(serve(serve_options(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qwen_relay.bench.loadgen import add_parser as add_loadtest_parser
    from qwen_relay.bench.relay import add_parser as add_bench_parser
    from qwen_relay.checkpoints.synthetic import add_parser as add_checkpoint_parser
    from qwen_relay.client.cli import add_parsers as add_client_parsers
    from qwen_relay.demo.main import add_parser as add_demo_parser
    from qwen_relay.train.cli import add_parsers as add_train_parsers

    parser = argparse.ArgumentParser(prog="qwen-relay", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="serve a model in layer slices behind gRPC")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=run_serve)
    add_demo_parser(sub)
    add_loadtest_parser(sub)
    add_client_parsers(sub)
    add_train_parsers(sub)
    add_checkpoint_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
