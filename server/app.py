"""Assemble and run the gateway: tokenizer and limits, slices (Ray actors or in-process), engine, gRPC, and
with `http_port` the OpenAI-compatible HTTP API (server/http.py) on the same engine.

The gRPC port opens first with health NOT_SERVING, so an orchestrator can watch the slices load; health
turns SERVING only once every slice has loaded its weights and run a warm-up step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoTokenizer, GenerationConfig

from qwen_relay.ray_common.local_ray import LocalRay, local_ray_cpus
from qwen_relay.shards.dtypes import resolve_dtype
from qwen_relay.shards.hub import model_dir
from qwen_relay.shards.loader import load_config
from qwen_relay.shards.runner import SliceSpec
from qwen_relay.shards.tensor_parallel import check_shardable
from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .adapters import AdapterPolicy, AdapterRegistry
from .admin import AdapterAdminServicer
from .decoding import ParseInCallInterceptor
from .engine import Engine, EngineConfig
from .frontend import Frontend
from .kv_capacity import has_recurrent_layers, kv_capacity
from .layout import balanced_split, describe, model_costs, parse_layers
from .metrics import Metrics, RequestMetricsInterceptor
from .pipeline import LocalPipeline, Pipeline
from .placement import check_fits_node, local_cpu_share, slice_bundle
from .security import BearerTokenInterceptor, server_credentials, warn_if_exposed
from .servicer import ModelMeta, TextGenerationServicer
from .validation import MAX_MESSAGE_BYTES, Limits

if TYPE_CHECKING:
    from .http import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAME = relay_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
ADMIN_SERVICE_NAME = relay_pb2.DESCRIPTOR.services_by_name["AdapterAdmin"].full_name
STOP_SLACK_S = 2.0  # after the grace period, for calls to send the UNAVAILABLE they were failed with
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Long unary generations send nothing for minutes: keep idle connections alive, allow client pings.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class ServeOptions:
    model: str
    shards: int = 2
    layers: str | None = None  # "0-15,16-31"; overrides shards
    tensor_parallel: int = 1  # ranks per slice, each holding 1/N of every layer (shards/tensor_parallel.py)
    dtype: str = "auto"
    device: str = "auto"  # auto: a GPU per slice (per rank under tensor_parallel) when the cluster has enough, else CPU
    host: str = "127.0.0.1"
    port: int = 50051
    ray_address: str | None = None
    local_ray_cpus: int | None = None  # CPUs of the local Ray serve starts without ray_address (None: all cores)
    use_ray: bool = True  # False: every slice in this process (no actors)
    max_batch: int = 16
    max_context: int = 2048  # prompt + new tokens of one request (a limit; KV memory is --kv-cache-tokens)
    kv_cache_tokens: int | None = None  # KV cache size in tokens (server/kv_capacity.py); None: the default
    kv_cache_memory: int | None = None  # or in bytes per slice (overrides kv_cache_tokens)
    block_size: int = 16  # tokens per KV block
    prefix_cache: bool = True  # reuse cached prefixes (blocks) across requests
    max_step_tokens: int = 512  # a step's token budget: decodes, then chunks of prompts
    default_max_new_tokens: int | None = None  # None: 128, or the cap if lower
    max_new_tokens_cap: int = 1024
    cpus_per_slice: float | None = None  # Ray CPUs per CPU slice; None: 1, or a share of a local node
    threads: int = 0
    prepack: bool = True  # CPU fp32 or bf16: linear weights prepacked for oneDNN (shards/packed.py)
    decode_step: str = "auto"  # auto, dynamic, static or compiled (shards/runner.py)
    placement_strategy: str = "PACK"
    placement_timeout: float = 600.0  # seconds to wait for Ray to place the slices (an autoscaler may add nodes)
    max_restarts: int = -1  # Ray restarts of a dead slice actor (-1: unlimited)
    recovery_timeout: float = 60.0
    max_queue: int = 256
    max_in_flight: int = 0  # step batches in the pipe at once; 0: one per slice, 1 where slices share cores
    slice_transport: str = "auto"  # between Ray slices: auto (GPU: compiled graph, CPU: actor calls), compiled, calls
    graph_idle_teardown: float = 10.0  # seconds without a step before a compiled graph is torn down; 0: keep it
    grace_seconds: float = 10.0
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters NAME -> PATH, loaded before SERVING
    adapter_roots: tuple[str, ...] = ()  # LoadAdapter reads only under these; none: LoadAdapter is off
    max_adapters: int = 16
    max_adapter_bytes: int = 1 << 30
    tls_cert: str | None = None  # PEM server certificate chain; with tls_key, the port speaks TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    auth_token: str | None = field(default=None, repr=False)  # bearer token on every RPC but health; never logged
    admin_token: str | None = field(default=None, repr=False)  # if set, AdapterAdmin needs it (not auth_token)
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port; 0: off
    stats_interval: float = 5.0  # seconds between the slice-stats snapshots the metrics report
    http_port: int | None = None  # OpenAI-compatible HTTP API on host:http_port (0: any free port); None: off


class Relay:
    """A running gateway; `await Relay.start(options)`, then `await relay.stop()`."""

    def __init__(self, options: ServeOptions, local_ray: LocalRay | None = None) -> None:
        self.options = options
        self.local_ray = local_ray  # the Ray node serve started itself: it cannot grow, so fit it
        folder = model_dir(options.model)
        self.config = load_config(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_ids = eos_token_ids(folder, self.tokenizer)
        self.max_context = min(options.max_context, self.config.max_position_embeddings)
        self.ranges = slice_ranges(options, self.config)
        check_shardable(self.config, options.tensor_parallel)
        self.limits = Limits(vocab_size=self.config.vocab_size, max_context=self.max_context,
                             default_max_new_tokens=options.default_max_new_tokens,
                             max_new_tokens_cap=options.max_new_tokens_cap)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.pipeline: Pipeline | None = None
        self.metrics = Metrics()
        self.kv = kv_capacity(self.config, self.ranges, kv_dtype(options), options.block_size,
                              options.kv_cache_tokens, options.kv_cache_memory, options.tensor_parallel)
        prefix_cache = options.prefix_cache and not has_recurrent_layers(self.config)
        if options.prefix_cache and not prefix_cache:
            log.warning("prefix cache off: %s has linear-attention layers, whose recurrent state the cached blocks "
                        "do not hold (docs/design.md, \"KV blocks and shared prefixes\")", self.config.model_type)
        log.info("KV cache: %s per slice; prefix cache %s; a step takes up to %d tokens", self.kv.describe(),
                 "on" if prefix_cache else "off", options.max_step_tokens)
        self.engine = Engine(
            EngineConfig(max_batch=options.max_batch, max_context=self.max_context, eos_ids=self.eos_ids,
                         num_blocks=self.kv.num_blocks, block_size=self.kv.block_size, prefix_cache=prefix_cache,
                         max_step_tokens=options.max_step_tokens,
                         max_queue=options.max_queue, recovery_timeout=options.recovery_timeout,
                         max_in_flight=options.max_in_flight),
            metrics=self.metrics)
        self.engine.health_changed.subscribe(self._set_health)
        self.adapters = AdapterRegistry(self.config, options.model, self.engine, AdapterPolicy(
            roots=options.adapter_roots, max_adapters=options.max_adapters, max_bytes=options.max_adapter_bytes))
        self.frontend = Frontend(self.engine, self.tokenizer, self.limits, self.adapters, self.metrics)
        self.servicer = TextGenerationServicer(
            self.frontend,
            ModelMeta(model_id=options.model, num_layers=self.config.num_hidden_layers, max_batch=options.max_batch))
        self._stats_task: asyncio.Task | None = None
        self._server_stop: asyncio.Future | None = None
        self._http_stop: asyncio.Future | None = None
        self.port = 0
        self.http: HttpServer | None = None  # with --http-port: the OpenAI-compatible API on this engine
        self.http_port = 0
        self.serving = False  # what health says; HTTP /health mirrors it
        self.started = time.time()

    @classmethod
    async def start(cls, options: ServeOptions, local_ray: LocalRay | None = None) -> Relay:
        """Open the port, then load the slices; on any failure or cancellation, release what was started."""
        relay = cls(options, local_ray)
        await relay._open_port()
        try:
            await relay._load()
        except BaseException:
            await relay.stop(grace=0)
            raise
        return relay

    async def _open_port(self) -> None:
        opts = self.options
        credentials = server_credentials(opts.tls_cert, opts.tls_key, opts.tls_client_ca)  # fails before binding
        interceptors = [RequestMetricsInterceptor(self.metrics)]  # first: it also counts refused calls
        if opts.auth_token or opts.admin_token:
            interceptors.append(BearerTokenInterceptor(opts.auth_token, opts.admin_token))
        interceptors.append(ParseInCallInterceptor())  # last: a body protobuf refuses is INVALID_ARGUMENT
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        await self._set_health(False)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        relay_pb2_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        relay_pb2_grpc.add_AdapterAdminServicer_to_server(
            AdapterAdminServicer(self.adapters, self.frontend.check_ready), self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{self.options.host}:{self.options.port}"
        warn_if_exposed(opts.host, tls=credentials is not None, token=bool(opts.auth_token))
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if not self.port:
            raise RuntimeError(f"cannot listen on {address}")
        if opts.metrics_port:
            self.metrics.serve(opts.metrics_port, opts.host)
        await self.server.start()
        if opts.http_port is not None:
            from .http import HttpHandle, HttpServer, HttpSettings  # only here: FastAPI loads only when asked for

            self.http = HttpServer(HttpHandle(
                self.frontend, self.adapters, serving=lambda: self.serving, requests=self.metrics.requests,
                created=int(self.started), settings=HttpSettings(
                    host=opts.host, port=opts.http_port, model_id=opts.model, auth_token=opts.auth_token,
                    admin_token=opts.admin_token, tls_cert=opts.tls_cert, tls_key=opts.tls_key,
                    tls_client_ca=opts.tls_client_ca, grace_seconds=opts.grace_seconds)))
            self.http_port = self.http.port
            self.http.start()
            log.info("HTTP (OpenAI-compatible) on %s:%d", opts.host, self.http_port)
        security = ("mutual TLS" if opts.tls_client_ca else "TLS" if credentials is not None else "plaintext") + (
            ", bearer token required" if opts.auth_token else "") + (
            ", admin token required for AdapterAdmin" if opts.admin_token else "")
        log.info("listening on %s:%d, %s (NOT_SERVING until every slice is warm)", opts.host, self.port, security)

    async def _load(self) -> None:
        opts = self.options
        use_gpu = False
        if opts.use_ray:
            import ray  # only here: --no-ray serves on machines without Ray

            if not ray.is_initialized():
                ray.init(address=self.local_ray.address if self.local_ray else opts.ray_address,
                         log_to_driver=True)
            # A slice reserves a GPU per tensor-parallel rank (server/placement.py, `slice_bundle`).
            use_gpu = opts.device == "cuda" or (opts.device == "auto" and ray.cluster_resources().get("GPU", 0)
                                                >= len(self.ranges) * opts.tensor_parallel)
        device = "cuda" if use_gpu else ("cpu" if opts.use_ray else opts.device)
        if self._shares_cores(use_gpu):
            log.info("slices share this machine's cores: %d torch thread(s) each, %d step(s) in flight",
                     self._threads(use_gpu), min(self._in_flight(use_gpu) or len(self.ranges), len(self.ranges)))
        specs = [SliceSpec(model=opts.model, first=a, end=b, dtype=opts.dtype, device=device,
                           max_slots=opts.max_batch, max_len=self.max_context, num_blocks=self.kv.num_blocks,
                           block_size=self.kv.block_size, threads=self._threads(use_gpu),
                           prepack=opts.prepack, decode=opts.decode_step, tensor_parallel=opts.tensor_parallel)
                 for a, b in self.ranges]
        if opts.use_ray:
            from .ray_pipeline import RayPipeline

            cpus = self._cpus_per_slice(ray.cluster_resources(), use_gpu)
            log.info("loading %d slice%s (layers %s) of %s, %g Ray CPU each", len(specs), "s" * (len(specs) != 1),
                     describe(self.ranges), opts.model, cpus)
            self.pipeline = await RayPipeline.start(
                specs, use_gpu=use_gpu, cpus_per_slice=cpus, strategy=opts.placement_strategy,
                placement_timeout=opts.placement_timeout, max_restarts=opts.max_restarts,
                transport=opts.slice_transport, idle_teardown=opts.graph_idle_teardown)
        else:
            log.info("loading %d slice%s (layers %s) of %s in this process", len(specs), "s" * (len(specs) != 1),
                     describe(self.ranges), opts.model)
            self.pipeline = await asyncio.to_thread(LocalPipeline, specs, self._in_flight(use_gpu))
        stats = await self.pipeline.stats()
        self.metrics.update_slices(stats)  # the baseline: warm-up forwards are not step time
        self.engine.config = replace(self.engine.config, max_in_flight=self._in_flight(use_gpu))
        self.engine.start(self.pipeline)
        for name, path in opts.adapters.items():  # before SERVING, so no request races them
            await self.adapters.load(name, path, trusted=True)
        if opts.metrics_port:
            self._stats_task = asyncio.create_task(self._push_slice_stats(), name="slice-stats")
        await self._set_health(True)
        self.layout = stats
        log.info("SERVING %s", self.describe_layout())

    def _shares_cores(self, use_gpu: bool) -> bool:
        """Whether every slice runs on this machine's CPU cores: the local Ray serve starts, or --no-ray."""
        return not use_gpu and (not self.options.use_ray or self.local_ray is not None)

    def _threads(self, use_gpu: bool) -> int:
        """Torch threads per CPU slice: --threads, else, where the slices share this machine's cores, every core
        for each slice if one step is in flight (`_in_flight`: the working slice uses the cores the idle ones
        leave), or the cores split between the slices that work at once when --max-in-flight keeps several
        in flight, so they do not oversubscribe the cores. 0 elsewhere: a slice on a cluster node uses that
        node's cores."""
        opts = self.options
        if opts.threads or not self._shares_cores(use_gpu):
            return opts.threads
        cores = self.local_ray.num_cpus if self.local_ray is not None else (os.cpu_count() or 1)
        working = min(len(self.ranges), self._in_flight(use_gpu) or len(self.ranges)) * opts.tensor_parallel
        return max(1, cores // working)

    def _in_flight(self, use_gpu: bool) -> int:
        """Steps in the pipe at once (0: one per slice): --max-in-flight, else 1 where the slices share this
        machine's cores with no --threads given. Slices on the same cores add no compute by pipelining: it
        only splits the batch into smaller micro-batches, each slice on a share of the cores, so a lone
        stream ran at one core's speed (docs/benchmarks.md, "One machine's cores"). Slices on devices of
        their own, or with --threads set, keep one step per slice in flight."""
        opts = self.options
        if opts.max_in_flight or opts.threads or not self._shares_cores(use_gpu):
            return opts.max_in_flight
        return 1

    def _cpus_per_slice(self, cluster: dict[str, float], use_gpu: bool) -> float:
        """--cpus-per-slice, else 1 CPU per slice (per rank of a tensor-parallel slice), or on a local node a share
        that lets every slice fit."""
        opts, count = self.options, len(self.ranges)
        if self.local_ray is None:
            return float(opts.tensor_parallel) if opts.cpus_per_slice is None else opts.cpus_per_slice
        cpus = local_slice_cpus(opts, cluster.get("CPU", 0), count)
        bundle = slice_bundle(cpus, use_gpu, opts.tensor_parallel)
        check_fits_node([bundle] * count, opts.placement_strategy, cluster)
        return cpus

    async def _push_slice_stats(self) -> None:
        """Feed the metrics a fresh snapshot of the slices' stats every `stats_interval` seconds."""
        while True:
            await asyncio.sleep(self.options.stats_interval)
            self.metrics.update_slices(await self.pipeline.stats())

    async def _set_health(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def describe_layout(self) -> str:
        return "; ".join(
            f"slice {i}: layers {s.first}-{s.end - 1} on {s.device}"
            f"{' node ' + s.node_id[:8] if s.node_id else ''}"
            f"{' +embed' if s.has_embeddings else ''}{' +head' if s.has_lm_head else ''}"
            for i, s in enumerate(self.layout))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight calls finish for up to `grace` s, end the
        rest UNAVAILABLE, release the slices. Safe to call again (with grace 0) to cut a stop short."""
        grace = self.options.grace_seconds if grace is None else grace
        self.serving = False
        await self.health.enter_graceful_shutdown()
        log.info("draining %d requests for up to %.0f s", len(self.engine.scheduler), grace)
        # Both servers stay up while the engine drains, and the engine refuses new calls UNAVAILABLE itself
        # (HTTP: 503, and /health 503): a gRPC server already shutting down ends a call that arrives before a
        # handler takes it CANCELLED (grpc/grpc#41785), which tells the client it gave up, not that it should
        # retry elsewhere; a stopped HTTP server refuses the connection, which says nothing at all.
        await self.engine.drain(grace)
        if self.server is not None and self._server_stop is None:
            self._server_stop = asyncio.ensure_future(self.server.stop(STOP_SLACK_S))
        if self.http is not None and self._http_stop is None:
            self._http_stop = asyncio.ensure_future(self.http.stop(STOP_SLACK_S))
        stopping = [s for s in (self._server_stop, self._http_stop) if s is not None]
        if stopping:  # the slack lets calls failed by the drain send their UNAVAILABLE
            _, late = await asyncio.wait([asyncio.shield(s) for s in stopping], timeout=STOP_SLACK_S)
            if late:
                log.warning("calls still open after the grace period; stopping anyway")
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.gather(self._stats_task, return_exceptions=True)
        await self.engine.stop()
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            await pipeline.close()
        self.metrics.close()
        log.info("stopped")


def slice_ranges(options: ServeOptions, config) -> list[tuple[int, int]]:
    """The [first, end) layer range of each slice: --layers as given, else --shards slices of equal cost."""
    if options.layers:
        return parse_layers(options.layers, config.num_hidden_layers)
    return balanced_split(model_costs(config), options.shards)


def kv_dtype(options: ServeOptions) -> torch.dtype:
    """The dtype the slices will hold KV in, for sizing `--kv-cache-memory`: the weights'. `auto` counts fp32
    bytes unless `--device cuda` says the slices get GPUs (bf16 there): never more blocks than fit."""
    return resolve_dtype(options.dtype, "cpu") if options.dtype != "auto" or options.device != "cuda" \
        else torch.bfloat16


def refuse_what_local_ray_cannot_hold(options: ServeOptions) -> None:
    """Before starting local Ray: its CPU count is known now, so slices that can never fit it (or bad --layers)
    are refused at once instead of after Ray has started for them. GPUs are counted by Ray: checked once it runs."""
    count = len(slice_ranges(options, load_config(model_dir(options.model))))
    cpus = local_ray_cpus(options.local_ray_cpus)
    check_fits_node([{"CPU": local_slice_cpus(options, cpus, count)}] * count, options.placement_strategy,
                    {"CPU": cpus})


def local_slice_cpus(options: ServeOptions, node_cpus: float, count: int) -> float:
    """Ray CPUs per CPU slice on a local node: --cpus-per-slice, else a share that lets every slice fit."""
    return local_cpu_share(node_cpus, count) if options.cpus_per_slice is None else options.cpus_per_slice


def eos_token_ids(folder, tokenizer) -> frozenset[int]:
    """End-of-sequence ids as `generate()` uses them: the generation config's, else the tokenizer's."""
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class Stopped(Exception):
    """A signal arrived before serve was up; what had started is released, and serve exits 0."""


async def _unless_stopped(work, stop: asyncio.Event):
    """Run `work` to its end, or cancel it (it cleans up after itself) and raise Stopped once `stop` is set."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise Stopped
    return task.result()


async def serve(options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully; a second signal cuts the grace period short, and a signal
    while starting ends the start.

    Without --ray-address, serve starts local Ray in a session of its own, so a signal to serve's process group
    does not stop Ray under the draining gateway, and stops it last (docs/local-ray.md).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: asyncio.Queue[int] = asyncio.Queue()

    def on_signal(sig: int) -> None:
        stop.set()
        signals.put_nowait(sig)

    def handle_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

    handle_signals()
    local_ray: LocalRay | None = None
    ray = None
    try:
        if options.use_ray:
            import ray

            if not options.ray_address:
                refuse_what_local_ray_cannot_hold(options)
                local_ray = await _unless_stopped(LocalRay.start(options.local_ray_cpus), stop)
            ray.init(address=local_ray.address if local_ray else options.ray_address, log_to_driver=True)
            handle_signals()  # ray.init put its own SIGTERM handler (sys.exit) in place of ours
        relay = await _unless_stopped(Relay.start(options, local_ray), stop)
        log.info("qwen-relay listening on %s:%d; %s", options.host, relay.port, relay.describe_layout())
        await signals.get()
        log.info("signal received: draining for up to %.0f s (a second signal stops at once)",
                 options.grace_seconds)
        graceful = asyncio.ensure_future(relay.stop())
        second = asyncio.ensure_future(signals.get())
        await asyncio.wait({graceful, second}, return_when=asyncio.FIRST_COMPLETED)
        if graceful.done():
            second.cancel()
            await graceful
        else:
            log.warning("second signal: stopping now")
            graceful.cancel()
            await asyncio.gather(graceful, return_exceptions=True)
            await relay.stop(grace=0)
    except Stopped:
        log.info("signal received while starting: stopped")
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if local_ray is not None:
            local_ray.stop()
