"""HTTP against gRPC on one server: time to first text and tokens/s at each concurrency, in one run.

Why it exists: the OpenAI-compatible front door shares the engine with gRPC, so any difference between the
two is the front door's own cost (HTTP/1.1 + JSON + SSE against HTTP/2 + protobuf). The same greedy
requests (token-id prompts, `ignore_eos`, a fixed length) go through each front door in turn, streaming;
"first text" is when the first chunk that carries text arrives, the same event on both sides.

Run: `python -m qwen_relay.bench.http --target 127.0.0.1:51300 --http 127.0.0.1:51301 --model MODEL`
against `qwen-relay serve ... --port 51300 --http-port 51301` (started apart, so the load generator does
not share the gateway's event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import grpc

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc


@dataclass(frozen=True)
class Row:
    front: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


async def grpc_one(stub, prompt: list[int], max_new: int) -> tuple[float, int]:
    started, first, tokens = time.perf_counter(), None, 0
    request = relay_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=max_new, ignore_eos=True)
    async for chunk in stub.GenerateStream(request):
        if first is None and chunk.text:
            first = time.perf_counter() - started
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return first, tokens


async def http_one(address: str, model: str, prompt: list[int], max_new: int) -> tuple[float, int]:
    """One streamed completion over a fresh HTTP/1.1 connection, read with asyncio streams: a client with
    no cost of its own (httpx-based clients added ~40 ms per request on the 2-core machine)."""
    started, first, tokens = time.perf_counter(), None, 0
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_new, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    status = await reader.readline()
    assert status.split()[1] == b"200", status
    while await reader.readline() != b"\r\n":  # headers; the body is chunked, one event per chunk
        pass
    while size := int((await reader.readline()).strip(), 16):
        event = (await reader.readexactly(size + 2))[:-2].decode()
        if not event.startswith("data: {"):
            continue
        chunk = json.loads(event[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - started
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    return first, tokens


async def measure(front: str, call, work: list[list[int]], concurrency: int) -> Row:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(prompt):
        async with gate:
            return await call(prompt)

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in work))
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return Row(front, concurrency, len(work), sum(r[1] for r in results), wall,
               statistics.median(ttfts) * 1e3, ttfts[int(0.9 * (len(ttfts) - 1))] * 1e3)


async def main(args: argparse.Namespace) -> list[Row]:
    rows = []
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = relay_pb2_grpc.TextGenerationStub(channel)
        vocab = (await stub.GetModelInfo(relay_pb2.GetModelInfoRequest())).vocab_size
        fronts = {"grpc": lambda p: grpc_one(stub, p, args.max_new_tokens),
                  "http": lambda p: http_one(args.http, args.model, p, args.max_new_tokens)}
        for front in fronts.values():  # warm both paths (connections, first-call costs)
            await front(prompts(1, args.prompt_tokens, vocab, seed=99)[0])
        for concurrency in args.concurrency:
            work = prompts(args.requests_per_stream * concurrency, args.prompt_tokens, vocab)
            for name in ("grpc", "http", "grpc", "http") if args.repeat else ("grpc", "http"):
                rows.append(await measure(name, fronts[name], work, concurrency))
                print(json.dumps({**asdict(rows[-1]), "tokens_per_s": round(rows[-1].tokens_per_s, 1)}),
                      flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| front door | concurrency | requests | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p90 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.front} | {r.concurrency} | {r.requests} | {r.tokens} | {r.wall_s:.2f} | {r.tokens_per_s:.1f} "
              f"| {r.ttft_p50_ms:.1f} | {r.ttft_p90_ms:.1f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="gRPC host:port")
    parser.add_argument("--http", required=True, help="HTTP host:port of the same server")
    parser.add_argument("--model", required=True, help="the model name the server serves (its --model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests = this x concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", action="store_true", help="alternate grpc, http, grpc, http")
    print(table(asyncio.run(main(parser.parse_args()))))
