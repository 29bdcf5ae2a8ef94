"""`qwen-relay loadtest`: a bounded `grpc.aio` load generator that can kill a slice mid-run.

Why it exists: the fault tests prove one stream or one batch survives a slice dying; this proves a steady
load of many overlapping requests does, with numbers (latency, time to first token, errors by code) an
operator can compare across builds. Every request streams (`GenerateStream`), so time to first token is
measured, and the load is bounded twice: a fixed number of requests and a wall-clock limit for the run.

"Wrong" needs an expected answer. Requests are greedy and drawn from a small set of distinct seeded prompts
(token ids), so every answer is known in advance: `--verify baseline` first sends each distinct request once,
with no fault, and the measured run must reproduce those token ids exactly; `--verify reference` takes them
from Hugging Face `generate()` on the whole checkpoint instead (the parity contract of the test suite).

"Lost" is a request that did not end with a final chunk (finish_reason set): an error status, a stream that
ended early, or a request the time limit kept from being sent at all.

Killing a slice needs a handle on its Ray actor, so fault injection works when the load generator starts
the relay itself in this process (`--model`): `ray.kill(relay.pipeline.actors[i], no_restart=False)` (Ray
restarts it, as after a crash) or SIGKILL of the actor's process. Against an external `--target` it only
measures (actors are not named, so another process cannot look them up by id).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KILL_HOWS = ("ray.kill", "sigkill")
VERIFY_MODES = ("baseline", "reference", "none")
NOT_SENT = "NOT_SENT"  # the run's time limit passed before this request could start


@dataclass(frozen=True)
class LoadConfig:
    """How much load: `requests` calls, at most `concurrency` in flight, within `time_limit` seconds."""

    requests: int = 200
    concurrency: int = 16
    distinct: int = 32  # distinct prompts; request i sends prompt i % distinct, so answers repeat and are known
    prompt_tokens: tuple[int, int] = (4, 32)  # inclusive range of prompt lengths
    max_new_tokens: tuple[int, int] = (16, 32)  # inclusive range of completion lengths
    ignore_eos: bool = False  # True: every completion runs to max_new_tokens (fixed work per request)
    seed: int = 0
    time_limit: float = 600.0  # the whole run; requests not started by then are NOT_SENT, in-flight ones cut
    request_timeout: float = 120.0  # per-request gRPC deadline

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.distinct < 1:
            raise ValueError("requests, concurrency and distinct must be at least 1")
        for name in ("prompt_tokens", "max_new_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}: need 1 <= low <= high, got {low}-{high}")
        if self.time_limit <= 0 or self.request_timeout <= 0:
            raise ValueError("time_limit and request_timeout must be positive")


@dataclass(frozen=True)
class LoadRequest:
    """One call of the run; `key` names its distinct prompt (requests with one key expect one answer)."""

    index: int
    key: int
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool = False

    def to_proto(self) -> relay_pb2.GenerateRequest:
        return relay_pb2.GenerateRequest(
            request_id=f"loadgen-{self.index}", prompt_token_ids=self.prompt_token_ids,
            max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos)  # temperature 0: greedy


def make_requests(config: LoadConfig, vocab_size: int) -> list[LoadRequest]:
    """The run's requests, the same for the same config and vocabulary (seeded)."""
    rng = random.Random(config.seed)
    prompts = []
    for _ in range(config.distinct):
        length = rng.randint(*config.prompt_tokens)
        prompts.append((tuple(rng.randrange(vocab_size) for _ in range(length)), rng.randint(*config.max_new_tokens)))
    return [LoadRequest(i, i % config.distinct, *prompts[i % config.distinct], ignore_eos=config.ignore_eos)
            for i in range(config.requests)]


def distinct_requests(requests: Sequence[LoadRequest]) -> list[LoadRequest]:
    """The first request of each key, in key order."""
    first: dict[int, LoadRequest] = {}
    for request in requests:
        first.setdefault(request.key, request)
    return [first[k] for k in sorted(first)]


@dataclass
class RequestResult:
    index: int
    key: int
    code: str  # gRPC status code name, or NOT_SENT
    latency: float | None = None  # seconds from sending to the end of the stream (or the error)
    ttft: float | None = None  # seconds from sending to the first chunk with tokens
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    wrong: bool | None = None  # None: not checked (no expected answer)
    started: float | None = None  # seconds into the run

    @property
    def lost(self) -> bool:
        return self.code != "OK" or self.finish_reason is None


@dataclass
class FaultPlan:
    """Run `action` once, `after` seconds into the run and once `after_requests` requests have ended.

    The request count makes a test's kill land mid-run however slow the machine is; `action` returns a
    description of what it did.
    """

    action: Callable[[], Awaitable[str]]
    after: float = 0.0
    after_requests: int = 0


@dataclass
class FaultEvent:
    at: float  # seconds into the run
    description: str
    in_flight: int  # requests streaming when it struck
    completed: int  # requests already finished
    error: str = ""  # the action itself failed


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LoadReport:
    config: LoadConfig
    results: list[RequestResult]
    wall: float  # seconds from the first request sent to the last one ended
    verify: str = "none"
    fault: FaultEvent | None = None
    restarts_before: list[int] = field(default_factory=list)
    restarts_after: list[int] = field(default_factory=list)
    health_after: str = ""
    target: str = ""

    @property
    def codes(self) -> dict[str, int]:
        return dict(Counter(r.code for r in self.results).most_common())

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.results)

    @property
    def wrong(self) -> int:
        return sum(bool(r.wrong) for r in self.results)

    @property
    def checked(self) -> int:
        return sum(r.wrong is not None for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    def _latencies(self) -> list[float]:
        return [r.latency for r in self.results if r.code == "OK" and r.latency is not None]

    def _ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.code == "OK" and r.ttft is not None]

    def _spans_fault(self, r: RequestResult) -> bool:
        return (self.fault is not None and r.started is not None and r.latency is not None
                and r.started <= self.fault.at <= r.started + r.latency)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (seconds), as JSON-ready data."""
        latencies, ttfts = self._latencies(), self._ttfts()
        # Requests in flight when the fault struck carry the recovery stall; the rest show the steady state.
        spanning = [r.latency for r in self.results if r.code == "OK" and self._spans_fault(r)]
        others = [r.latency for r in self.results if r.code == "OK" and r.latency is not None
                  and not self._spans_fault(r)]
        return {
            "target": self.target, "requests": len(self.results), "concurrency": self.config.concurrency,
            "codes": self.codes, "lost": self.lost, "wrong": self.wrong, "checked": self.checked,
            "verify": self.verify,
            "latency_p50": percentile(latencies, 50), "latency_p95": percentile(latencies, 95),
            "latency_max": max(latencies, default=None),
            "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "tokens": self.tokens, "wall": self.wall,
            "tokens_per_s": self.tokens / self.wall if self.wall > 0 else None,
            "requests_per_s": len(self.results) / self.wall if self.wall > 0 else None,
            "fault": asdict(self.fault) if self.fault else None,
            "spanning_fault": len(spanning), "spanning_latency_max": max(spanning, default=None),
            "others_latency_p95": percentile(others, 95),
            "restarts_before": self.restarts_before, "restarts_after": self.restarts_after,
            "health_after": self.health_after,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "config": asdict(self.config),
                "results": [asdict(r) for r in self.results]}

    def to_markdown(self) -> str:
        s = self.summary()

        def sec(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f} s"

        codes = ", ".join(f"{code} {count}" for code, count in s["codes"].items())
        if self.checked:
            wrong = f"{s['wrong']} of {s['checked']} checked (expected: {self.verify})"
        else:
            wrong = "not checked (--verify none)"
        rows = [
            ("requests / concurrency", f"{s['requests']} / {s['concurrency']}"),
            ("status codes", codes),
            ("lost (no final chunk)", str(s["lost"])),
            ("wrong (token ids differ)", wrong),
            ("latency p50 / p95 / max", f"{sec(s['latency_p50'])} / {sec(s['latency_p95'])} / "
                                        f"{sec(s['latency_max'])}"),
            ("time to first token p50 / p95", f"{sec(s['ttft_p50'])} / {sec(s['ttft_p95'])}"),
            ("tokens generated", f"{s['tokens']} ({s['tokens_per_s'] or 0:.1f} tokens/s, "
                                 f"{s['requests_per_s'] or 0:.2f} requests/s)"),
            ("wall time", sec(s["wall"])),
        ]
        if self.fault is not None:
            f = self.fault
            rows.append(("fault", f"{f.description} at {f.at:.2f} s, {f.in_flight} in flight, "
                                  f"{f.completed} done{'; failed: ' + f.error if f.error else ''}"))
            rows.append(("latency: spanning the fault (max) / the others (p95)",
                         f"{s['spanning_fault']} requests ({sec(s['spanning_latency_max'])}) / "
                         f"{len(self.results) - s['spanning_fault']} requests ({sec(s['others_latency_p95'])})"))
        if self.restarts_after:
            rows.append(("slice restarts (before -> after)",
                         f"{self.restarts_before} -> {self.restarts_after}"))
        if self.health_after:
            rows.append(("health after the run", self.health_after))
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


async def _one(stub: relay_pb2_grpc.TextGenerationStub, request: LoadRequest, run_start: float, deadline: float,
               timeout: float, metadata: tuple[tuple[str, str], ...]) -> RequestResult:
    result = RequestResult(request.index, request.key, NOT_SENT)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return result
    sent = time.monotonic()
    result.started = sent - run_start
    call = stub.GenerateStream(request.to_proto(), timeout=min(timeout, remaining), metadata=metadata)
    try:
        async for response in call:
            if response.token_ids and result.ttft is None:
                result.ttft = time.monotonic() - sent
            result.tokens.extend(response.token_ids)
            if response.finish_reason:
                result.finish_reason = relay_pb2.FinishReason.Name(response.finish_reason)
        result.code = "OK"
    except grpc.aio.AioRpcError as e:
        result.code = e.code().name
        result.error = (e.details() or "")[:300]
    except asyncio.CancelledError:
        call.cancel()
        raise
    result.latency = time.monotonic() - sent
    return result


@dataclass(frozen=True)
class Endpoint:
    """A relay to load and how to reach it: plaintext or TLS, with a bearer token on every call if set."""

    target: str
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.target, self.credentials, options=_CHANNEL_OPTIONS)


async def run_load(endpoint: Endpoint, requests: Sequence[LoadRequest], config: LoadConfig, *,
                   expected: dict[int, list[int]] | None = None, fault: FaultPlan | None = None,
                   verify: str = "none") -> LoadReport:
    """Send `requests` at `config.concurrency`, optionally strike `fault`, and compare with `expected`."""
    async with endpoint.channel() as channel:
        stub = relay_pb2_grpc.TextGenerationStub(channel)
        restarts_before = await _restarts(stub, endpoint.metadata)
        gate = asyncio.Semaphore(config.concurrency)
        in_flight = 0
        done = 0
        run_start = time.monotonic()
        deadline = run_start + config.time_limit

        async def guarded(request: LoadRequest) -> RequestResult:
            nonlocal in_flight, done
            async with gate:
                in_flight += 1
                try:
                    return await _one(stub, request, run_start, deadline, config.request_timeout, endpoint.metadata)
                finally:
                    in_flight -= 1
                    done += 1

        event: FaultEvent | None = None

        async def strike(plan: FaultPlan) -> None:
            nonlocal event
            await asyncio.sleep(plan.after)
            while done < plan.after_requests:
                await asyncio.sleep(0.01)
            at, flying, finished = time.monotonic() - run_start, in_flight, done
            try:
                description = await plan.action()
                event = FaultEvent(at, description, flying, finished)
            except Exception as e:  # noqa: BLE001 - a failed injection is reported, the run goes on
                log.exception("fault injection failed")
                event = FaultEvent(at, "fault injection", flying, finished, error=f"{type(e).__name__}: {e}")
            log.warning("fault at %.2f s (%d in flight, %d done): %s", at, flying, finished,
                        event.description)

        striker = asyncio.create_task(strike(fault)) if fault is not None else None
        log.info("load: %d requests at concurrency %d against %s (limit %.0f s)", len(requests),
                 config.concurrency, endpoint.target, config.time_limit)
        try:
            # The per-request deadlines already end every call by the limit; the outer bound is a backstop.
            results = await asyncio.wait_for(asyncio.gather(*(guarded(r) for r in requests)),
                                             config.time_limit + 30)
        finally:
            if striker is not None:
                striker.cancel()
                await asyncio.gather(striker, return_exceptions=True)
        wall = max((r.started + r.latency for r in results if r.latency is not None), default=0.0)
        if fault is not None and event is None:
            event = FaultEvent(wall, "not struck: the run ended first", 0, len(results))
        for r in results:
            if expected is not None and r.key in expected and not r.lost:
                r.wrong = r.tokens != expected[r.key]
        restarts_after = await _restarts(stub, endpoint.metadata) if restarts_before else []
        health = await _health(channel)
    report = LoadReport(config, results, wall, verify=verify, fault=event, restarts_before=restarts_before,
                        restarts_after=restarts_after, health_after=health, target=endpoint.target)
    log.info("load done: %s", {k: v for k, v in report.summary().items() if k in ("codes", "lost", "wrong")})
    return report


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


async def _restarts(stub: relay_pb2_grpc.TextGenerationStub, metadata: tuple[tuple[str, str], ...]) -> list[int]:
    try:
        info = await stub.GetModelInfo(relay_pb2.GetModelInfoRequest(), timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        log.warning("GetModelInfo failed: %s", e.code().name)
        return []
    return [s.restarts for s in info.slices]


async def _health(channel: grpc.aio.Channel) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def vocab_size(endpoint: Endpoint) -> int:
    async with endpoint.channel() as channel:
        info = await relay_pb2_grpc.TextGenerationStub(channel).GetModelInfo(
            relay_pb2.GetModelInfoRequest(), timeout=60, metadata=endpoint.metadata)
    return info.vocab_size


async def baseline_expected(endpoint: Endpoint, requests: Sequence[LoadRequest],
                            config: LoadConfig) -> dict[int, list[int]]:
    """Each distinct request once, no fault: the answers the measured run must reproduce."""
    firsts = distinct_requests(requests)
    report = await run_load(endpoint, firsts, config)
    failed = [r for r in report.results if r.lost]
    if failed:
        raise RuntimeError(f"the no-fault baseline pass failed for {len(failed)} of {len(firsts)} requests: "
                           f"{failed[0].code} {failed[0].error}")
    return {r.key: r.tokens for r in report.results}


def reference_expected(model: str, requests: Sequence[LoadRequest]) -> dict[int, list[int]]:
    """Greedy Hugging Face `generate()` on the whole checkpoint (fp32, CPU) for each distinct request."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_relay.shards.hub import model_dir

    hf = AutoModelForCausalLM.from_pretrained(model_dir(model), dtype=torch.float32).eval()
    expected = {}
    with torch.inference_mode():
        for r in distinct_requests(requests):
            config = copy.deepcopy(hf.generation_config)
            config.update(max_new_tokens=r.max_new_tokens, do_sample=False)
            if r.ignore_eos:
                config.eos_token_id = None  # EOS is just another token, as the relay treats it
            out = hf.generate(torch.tensor([list(r.prompt_token_ids)]), generation_config=config)
            expected[r.key] = out[0, len(r.prompt_token_ids):].tolist()
    return expected


def kill_slice(pipeline: Any, index: int, how: str = "ray.kill") -> Callable[[], Awaitable[str]]:
    """An action that kills slice `index` of a `RayPipeline` the way a crash would; Ray restarts it."""
    if not hasattr(pipeline, "actors"):
        raise ValueError("killing a slice needs Ray slice actors (not --no-ray)")
    if how not in KILL_HOWS:
        raise ValueError(f"kill: unknown method {how!r} (expected one of {', '.join(KILL_HOWS)})")
    if not 0 <= index < len(pipeline.actors):
        raise ValueError(f"kill: slice {index} does not exist (there are {len(pipeline.actors)})")

    async def action() -> str:
        import ray

        actor = pipeline.actors[index]
        if how == "ray.kill":
            ray.kill(actor, no_restart=False)
            return f"ray.kill(slice {index}, no_restart=False)"
        pid = (await actor.stats.remote()).pid
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to slice {index} (pid {pid})"

    return action


async def _expected(mode: str, endpoint: Endpoint, model: str | None, requests: Sequence[LoadRequest],
                    config: LoadConfig) -> dict[int, list[int]] | None:
    if mode == "baseline":
        return await baseline_expected(endpoint, requests, config)
    if mode == "reference":
        if model is None:
            raise ValueError("--verify reference needs --model (the checkpoint generate() runs on)")
        return await asyncio.to_thread(reference_expected, model, requests)
    return None


def endpoint_from_args(args: argparse.Namespace) -> Endpoint:
    """--target and its TLS and token flags (the client CLI's; the token falls back to the environment)."""
    from qwen_relay.client.base import call_metadata, channel_credentials
    from qwen_relay.server.security import AUTH_TOKEN_ENV

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = channel_credentials(args.tls, read(args.ca_cert), read(args.client_key), read(args.client_cert))
    token = args.auth_token or os.environ.get(AUTH_TOKEN_ENV) or None
    return Endpoint(args.target, credentials, call_metadata(token))


async def _loadtest(args: argparse.Namespace, config: LoadConfig) -> LoadReport:
    relay = None
    endpoint = endpoint_from_args(args) if args.target else None
    if args.model:
        from qwen_relay.server.app import Relay, ServeOptions

        relay = await Relay.start(ServeOptions(model=args.model, shards=args.shards, port=0,
                                               max_context=args.max_context, max_batch=args.max_batch,
                                               recovery_timeout=args.recovery_timeout))
        endpoint = Endpoint(f"127.0.0.1:{relay.port}")
    try:
        fault = None
        if args.kill_slice is not None:
            fault = FaultPlan(kill_slice(relay.pipeline, args.kill_slice, args.kill_how), after=args.kill_after,
                              after_requests=args.kill_after_requests)
        requests = make_requests(config, await vocab_size(endpoint))
        expected = await _expected(args.verify, endpoint, args.model, requests, config)
        return await run_load(endpoint, requests, config, expected=expected, fault=fault, verify=args.verify)
    finally:
        if relay is not None:
            await relay.stop(grace=1)


def run_loadtest(args: argparse.Namespace) -> int:
    """CLI handler: 0 when nothing was lost or wrong, 1 otherwise."""
    if bool(args.model) == bool(args.target):
        raise ValueError("loadtest: give exactly one of --model (start a relay here) or --target (an existing one)")
    if args.kill_slice is not None and not args.model:
        raise ValueError("loadtest: --kill-slice needs --model: only a relay started here exposes its slice actors")
    config = LoadConfig(requests=args.requests, concurrency=args.concurrency, distinct=args.distinct,
                        prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                        ignore_eos=args.ignore_eos, seed=args.seed, time_limit=args.time_limit,
                        request_timeout=args.request_timeout)
    if not getattr(args, "verbose", False):  # two lines per request from the gateway would bury the report
        logging.getLogger("qwen_relay.server.frontend").setLevel(logging.WARNING)
    started_ray = False
    if args.model:
        import ray

        if not ray.is_initialized():
            # Logical CPUs: one per slice must fit even on a 2-core machine; slices set their own threads.
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
            started_ray = True
    try:
        report = asyncio.run(_loadtest(args, config))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(report.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0 if report.lost == 0 and report.wrong == 0 else 1


def parse_range(text: str) -> tuple[int, int]:
    """`N` or `LOW-HIGH` (inclusive) from the command line."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from e


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `loadtest` on the `qwen-relay` CLI."""
    p = subparsers.add_parser("loadtest", help="bounded gRPC load test, optionally killing a slice mid-run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("what to load")
    where.add_argument("--model", help="checkpoint folder: start a relay on Ray in this process (loopback)")
    where.add_argument("--target", help="host:port of a running relay (no fault injection)")
    where.add_argument("--auth-token", help="with --target: bearer token on every call (default: "
                       "$QWEN_RELAY_AUTH_TOKEN)")
    where.add_argument("--tls", action="store_true", help="with --target: TLS (system roots unless --ca-cert)")
    where.add_argument("--ca-cert", metavar="PEM", help="with --target: CA certificate to trust; implies --tls")
    where.add_argument("--client-cert", metavar="PEM", help="with --target: client certificate (mutual TLS)")
    where.add_argument("--client-key", metavar="PEM", help="with --target: client private key (mutual TLS)")
    where.add_argument("--shards", type=int, default=2, help="slices of the relay started with --model")
    where.add_argument("--max-batch", type=int, default=16, help="--model relay's cache slots")
    where.add_argument("--max-context", type=int, default=1024, help="--model relay's context limit")
    where.add_argument("--recovery-timeout", type=float, default=120.0,
                       help="--model relay: seconds in-flight calls wait for a killed slice")
    load = p.add_argument_group("load")
    load.add_argument("--requests", type=int, default=200)
    load.add_argument("--concurrency", type=int, default=16)
    load.add_argument("--distinct", type=int, default=32, help="distinct seeded prompts the requests cycle through")
    load.add_argument("--prompt-tokens", type=parse_range, default=(4, 32), metavar="LOW-HIGH")
    load.add_argument("--max-new-tokens", type=parse_range, default=(16, 32), metavar="LOW-HIGH")
    load.add_argument("--ignore-eos", action="store_true", help="every completion runs to its max_new_tokens")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole measured run")
    load.add_argument("--request-timeout", type=float, default=120.0, help="per-request deadline, seconds")
    load.add_argument("--verify", choices=VERIFY_MODES, default="baseline",
                      help="expected answers: a no-fault pass first (baseline), HF generate() (reference), none")
    fault = p.add_argument_group("fault injection (--model only)")
    fault.add_argument("--kill-slice", type=int, help="kill this slice's actor during the run")
    fault.add_argument("--kill-after", type=float, default=5.0, help="seconds into the run")
    fault.add_argument("--kill-after-requests", type=int, default=0, metavar="N",
                       help="and not before N requests have ended")
    fault.add_argument("--kill-how", choices=KILL_HOWS, default="ray.kill",
                       help="ray.kill(actor, no_restart=False), or SIGKILL of the actor's process")
    p.add_argument("--json", help="also write the report and every request's result here")
    p.set_defaults(func=run_loadtest)
