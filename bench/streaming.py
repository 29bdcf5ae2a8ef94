"""Measuring a streaming server the same way whatever its protocol: the relay over gRPC and vLLM over
OpenAI HTTP go through these functions, so a difference between them is the servers', not the measurement's.

A `TokenStream` sends one request (greedy, `ignore_eos`) and yields each chunk's new token ids as they arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from .loadgen import percentile
from .measure import single_stream_stats
from .workloads import Conversation, Phase, Request

TokenStream = Callable[[Request], AsyncIterator[Sequence[int]]]


async def run_phase(stream: TokenStream, phase: Phase, repeats: int) -> dict[str, Any]:
    """A phase's figures: single stream (`repeats` runs), the chat turn by turn, else a load at its concurrency."""
    if phase.section == "single":
        return await stream_single(stream, phase.requests[0], repeats)
    if phase.conversation is not None:
        return await stream_chat(stream, phase.conversation)
    return await stream_load(stream, phase.requests, phase.concurrency)


async def _timed(stream: TokenStream, request: Request) -> tuple[float, list[float], list[int]]:
    """(start, arrival time of every new token, the new token ids); checks the count."""
    times: list[float] = []
    ids: list[int] = []
    start = time.perf_counter()
    async for chunk in stream(request):
        now = time.perf_counter()
        times.extend([now] * len(chunk))
        ids.extend(chunk)
    if len(times) != request.max_new_tokens:
        raise RuntimeError(f"the server returned {len(times)} tokens, expected {request.max_new_tokens}")
    return start, times, ids


async def stream_single(stream: TokenStream, request: Request, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        start, times, _ = await _timed(stream, request)
        runs.append((start, times))
    return single_stream_stats(runs, len(request.prompt_token_ids))


async def stream_load(stream: TokenStream, requests: Sequence[Request], concurrency: int) -> dict[str, Any]:
    """All requests with at most `concurrency` in flight; tokens/s over the whole wall time, TTFT per request."""
    gate = asyncio.Semaphore(concurrency)

    async def one(request: Request) -> tuple[int, float]:
        async with gate:
            start, times, _ = await _timed(stream, request)
            return len(times), (times[0] - start) * 1000

    start = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - start
    output = sum(count for count, _ in done)
    ttfts = [ttft for _, ttft in done]  # in request order
    return {"concurrency": concurrency, "requests": len(requests), "output_tokens": output,
            "generated_tokens": output, "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "wall_s": wall, "tokens_per_s": output / wall, "ttft_ms_p50": percentile(ttfts, 50),
            "ttft_ms_p95": percentile(ttfts, 95), "ttft_ms_all": ttfts}


async def stream_chat(stream: TokenStream, conversation: Conversation) -> dict[str, Any]:
    """The conversation turn by turn, each prompt the last one + the reply the server gave + the next user
    tokens, as a chat client sends it; time to first token per turn."""
    ttfts, prompts = [], []
    start = time.perf_counter()
    prompt: tuple[int, ...] = ()
    for user in conversation.turns():
        prompt = prompt + user
        began, times, reply = await _timed(stream, Request(prompt, conversation.reply))
        ttfts.append((times[0] - began) * 1000)
        prompts.append(len(prompt))
        prompt = prompt + tuple(reply)
    return chat_stats(ttfts, prompts, time.perf_counter() - start)


def chat_stats(ttfts: list[float], prompts: list[int], wall: float) -> dict[str, Any]:
    return {"turns": len(ttfts), "prompt_tokens": prompts, "ttft_ms": ttfts, "wall_s": wall}
