"""`qwen-relay demo`: one chat turn end to end on a fresh machine.

Starts a local Ray cluster, serves a checkpoint in 2 slices (each its own Ray actor) behind the gRPC
server on loopback, sends one chat message through the real Python client, and prints the streamed reply,
the layer layout and the timings. With no `--model`, it builds a tiny random-weight Qwen2 checkpoint first
(no model hub is reachable here), so the reply is fluent only with a real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from qwen_relay.client.aio import AsyncRelayClient
from qwen_relay.server.app import Relay, ServeOptions


async def _demo(options: ServeOptions, message: str, max_new_tokens: int) -> None:
    started = time.perf_counter()
    relay = await Relay.start(options)
    loaded = time.perf_counter()
    try:
        async with AsyncRelayClient(f"127.0.0.1:{relay.port}") as client:
            info = await client.model_info()
            print(f"model {info.model_id}: {info.num_layers} layers, {info.dtype}, health "
                  f"{await client.health()}")
            for s in info.slices:
                print(f"  slice {s.index}: layers {s.first_layer}-{s.last_layer} on {s.device}, "
                      f"actor {s.actor_id[:12]}, node {s.node_id[:12]}"
                      f"{', embeddings' if s.has_embeddings else ''}{', lm head' if s.has_lm_head else ''}, "
                      f"{s.weight_bytes / 2**20:.1f} MiB weights")
            print(f"user> {message}\nassistant> ", end="", flush=True)
            sent = time.perf_counter()
            first = None
            async for chunk in client.stream(messages=[{"role": "user", "content": message}],
                                             max_new_tokens=max_new_tokens):
                if first is None:
                    first = time.perf_counter()
                print(chunk.text, end="", flush=True)
                last = chunk
            done = time.perf_counter()
    finally:
        await relay.stop(grace=1)
    per_token = (done - first) / max(last.completion_tokens - 1, 1) * 1000
    print(f"\n[{last.finish_reason}; {last.prompt_tokens} prompt + {last.completion_tokens} new tokens]")
    print(f"timings: start-up {loaded - started:.1f} s, time to first token {(first - sent) * 1000:.0f} ms, "
          f"{per_token:.1f} ms/token after it, total {done - sent:.2f} s")


def run_demo(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        from qwen_relay.checkpoints.synthetic import build_checkpoint

        model = str(args.workdir)
        if not (Path(model) / "config.json").exists():
            print(f"building a tiny random-weight Qwen2 checkpoint in {model} (no model hub here)")
            build_checkpoint(model, "tiny")
    import ray  # not at module level: the CLI that holds this command also serves on machines without Ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    try:
        options = ServeOptions(model=model, shards=2, port=0, max_context=1024)
        asyncio.run(_demo(options, args.message, args.max_new_tokens))
    finally:
        ray.shutdown()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="local Ray + 2 slices + gRPC + one chat turn, with timings")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: build a tiny one)")
    parser.add_argument("--workdir", type=Path, default=Path("demo-model"),
                        help="where the tiny checkpoint is built")
    parser.add_argument("--message", default="Merhaba! Nasılsın?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.set_defaults(func=run_demo)
