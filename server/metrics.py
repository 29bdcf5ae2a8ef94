"""Prometheus metrics for one gateway (`--metrics-port`; 0 leaves the HTTP endpoint off).

Each `Metrics` owns its own `CollectorRegistry`, so several relays in one process (tests) never collide.
Where the numbers come from:

- `qwen_relay_requests_total{method,code}`: `RequestMetricsInterceptor`, around every RPC (health included).
- `qwen_relay_time_to_first_token_seconds`, `qwen_relay_time_per_output_token_seconds`,
  `qwen_relay_generated_tokens_total`: the servicer, per delta (`GenerationTimer`). The clock starts when
  the validated request is handed to the engine, so TTFT = queueing + prefill + streaming the first token.
- `qwen_relay_queue_depth`, `qwen_relay_active_sequences`: pushed by the engine whenever they change.
- `qwen_relay_step_seconds`: the engine, one histogram sample per step through every slice.
- `qwen_relay_kv_blocks{state}` (used, free), `qwen_relay_prefix_cache_prompt_tokens_total`,
  `qwen_relay_prefix_cache_hit_tokens_total` (hit rate: the ratio of their rates), `qwen_relay_preemptions_total`:
  pushed by the engine with the load (server/block_manager.py).
- `qwen_relay_slice_forward_seconds_total{slice}` (slice compute,
  cumulative; restarts from 0 when a slice restarts), `qwen_relay_slice_healthy{slice}`: the slices' own
  stats, pushed by the gateway's stats poller (`update_slices`) every few seconds. A scrape never calls a
  slice: a stats call waits behind the slice's steps, and scrapes would add to that queue.
- `qwen_relay_hop_transfer_seconds_total`: derived, not measured: (time inside steps - slice compute time
  over those steps) / hops, with hops = slices + 1 (gateway -> slice 0, slice i -> i+1, last -> gateway).
  It is everything a step spends outside `SliceRunner.step` (serialization, object transfer, Ray
  scheduling), spread evenly over the hops. Mean per-hop time per step:
  `rate(qwen_relay_hop_transfer_seconds_total[5m]) / rate(qwen_relay_step_seconds_count[5m])`.
- `qwen_relay_slice_restarts_total{slice}`: the pipeline's per-slice restart count (`SliceStats.restarts`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwen_relay.shards.stats import SliceStats

from .block_manager import KvStats

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GenerationTimer:
    """Times one request's token stream: TTFT at the first token, TPOT (the decode gaps) when it ends."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last = 0.0
        self.num_tokens = 0

    def tokens(self, count: int) -> None:
        """Record `count` new tokens arriving now."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._metrics.time_to_first_token.observe(now - self._start)
        self._last = now
        self.num_tokens += count
        self._metrics.generated_tokens.inc(count)

    @property
    def ttft(self) -> float | None:
        return None if self._first is None else self._first - self._start

    def finish(self) -> None:
        """Record the mean gap between output tokens after the first (needs two tokens to mean anything)."""
        if self._first is not None and self.num_tokens > 1:
            self._metrics.time_per_output_token.observe((self._last - self._first) / (self.num_tokens - 1))


class Metrics:
    """Every metric of one relay, in its own registry; `serve(port)` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen_relay_requests", "RPCs handled, by method and final status code",
                                ["method", "code"], registry=r)
        self.time_to_first_token = Histogram(
            "qwen_relay_time_to_first_token_seconds",
            "From handing a request to the engine to its first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "qwen_relay_time_per_output_token_seconds",
            "Per request: mean time between output tokens after the first", buckets=TPOT_BUCKETS, registry=r)
        self.generated_tokens = Counter("qwen_relay_generated_tokens", "Tokens generated and streamed", registry=r)
        self.queue_depth = Gauge("qwen_relay_queue_depth", "Requests waiting to run", registry=r)
        self.active_sequences = Gauge("qwen_relay_active_sequences", "Sequences running (decoding or prefilling)",
                                      registry=r)
        self.step_seconds = Histogram("qwen_relay_step_seconds", "One engine step through every slice",
                                      buckets=STEP_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._slices: list[SliceStats] = []  # the latest snapshot
        self._kv: KvStats | None = None  # the engine's latest
        self._restarts: dict[int, int] = {}
        self._step_total = 0.0  # seconds inside successful steps
        self._forward_last: dict[int, float] = {}  # last cumulative forward_seconds seen, per slice
        self._forward_total = 0.0  # slice compute time since the first snapshot, summed over slices
        self._hop_total = 0.0
        self._http: Any = None
        self.port = 0
        r.register(_SliceCollector(self))

    # ---------------------------------------------------------------------------------------------- hooks

    def generation(self) -> GenerationTimer:
        """A timer for one request; call `.tokens(n)` per delta and `.finish()` once at the end."""
        return GenerationTimer(self)

    def observe_step(self, seconds: float) -> None:
        """One successful engine step took `seconds` (gateway wall time, all slices and hops)."""
        self.step_seconds.observe(seconds)
        with self._lock:
            self._step_total += seconds

    def observe_load(self, waiting: int, active: int) -> None:
        """Requests waiting to run, and sequences running."""
        self.queue_depth.set(waiting)
        self.active_sequences.set(active)

    def observe_kv(self, stats: KvStats) -> None:
        """The KV cache's blocks, prefix-cache counters and preemptions, as the engine last saw them."""
        with self._lock:
            self._kv = stats

    def update_slices(self, stats: list[SliceStats]) -> None:
        """Fold one snapshot of the slices' stats into the per-slice series, restart counts and the
        hop-transfer estimate. The first snapshot (taken before any step) is the baseline: warm-up forwards do
        not count as step time."""
        with self._lock:
            self._slices = list(stats)
            for i, s in enumerate(stats):
                self._restarts[i] = max(self._restarts.get(i, 0), s.restarts)
                if not s.healthy:
                    continue
                last = self._forward_last.get(i)
                if last is not None:
                    now = s.forward_seconds
                    self._forward_total += now - last if now >= last else now  # restarted: counts from 0
                self._forward_last[i] = s.forward_seconds
            transfer = (self._step_total - self._forward_total) / (len(stats) + 1)
            self._hop_total = max(self._hop_total, transfer)  # a counter never goes down

    # ------------------------------------------------------------------------------------------ exposure

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on `host:port` from a daemon thread; returns the bound port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {e}") from e
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _SliceCollector(Collector):
    """Per-slice series from the latest pushed snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not fetch stats

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        with m._lock:
            stats, hop, restarts, kv = list(m._slices), m._hop_total, dict(m._restarts), m._kv
        if kv is not None:
            blocks = GaugeMetricFamily("qwen_relay_kv_blocks", "KV blocks (every slice holds as many)",
                                       labels=["state"])
            blocks.add_metric(["used"], kv.blocks_used)
            blocks.add_metric(["free"], kv.blocks_free)
            yield blocks
            yield CounterMetricFamily("qwen_relay_prefix_cache_prompt_tokens", "Prompt tokens of admitted requests",
                                      value=kv.prompt_tokens)
            yield CounterMetricFamily("qwen_relay_prefix_cache_hit_tokens",
                                      "Prompt tokens whose KV came from the prefix cache", value=kv.hit_tokens)
            yield CounterMetricFamily("qwen_relay_preemptions", "Sequences preempted for want of KV blocks",
                                      value=kv.preemptions)
        if stats:
            forward = CounterMetricFamily("qwen_relay_slice_forward_seconds",
                                          "Slice compute time (cumulative; restarts from 0 with the slice)",
                                          labels=["slice"])
            healthy = GaugeMetricFamily("qwen_relay_slice_healthy", "1 when the slice answered its stats call",
                                        labels=["slice"])
            for i, s in enumerate(stats):
                forward.add_metric([str(i)], s.forward_seconds)
                healthy.add_metric([str(i)], 1.0 if s.healthy else 0.0)
            yield from (forward, healthy)
        yield CounterMetricFamily("qwen_relay_hop_transfer_seconds",
                                  "Step time outside slice compute, divided by hops (slices + 1)", value=hop)
        family = CounterMetricFamily("qwen_relay_slice_restarts", "Times a slice was restarted", labels=["slice"])
        for i, n in sorted(restarts.items()):
            family.add_metric([str(i)], n)
        yield family


# ------------------------------------------------------------------------------------- request counting

Behavior = Callable[..., Any]


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the caller went away
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:  # an unhandled exception: gRPC answers UNKNOWN
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC once, by method and the status code it ended with. Install it first, so it also sees
    calls a later interceptor refuses (UNAUTHENTICATED)."""

    def __init__(self, metrics: Metrics) -> None:
        self._counter = metrics.requests

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED without us
            return None
        method = handler_call_details.method.lstrip("/")
        counter = self._counter

        def record(context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            counter.labels(method, _final_code(context, error)).inc()

        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext):
                try:
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for response in result:
                            yield response
                    else:  # a coroutine that writes with context.write()
                        await result
                except BaseException as e:
                    record(context, e)
                    raise
                record(context, None)

            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else \
                grpc.unary_stream_rpc_method_handler
            return make(streaming, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)

        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
            except BaseException as e:
                record(context, e)
                raise
            record(context, None)
            return response

        make_unary = grpc.stream_unary_rpc_method_handler if handler.request_streaming else \
            grpc.unary_unary_rpc_method_handler
        return make_unary(unary, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
