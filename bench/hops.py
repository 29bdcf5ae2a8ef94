"""What one hop between slices costs, apart from any forward: `python -m qwen_relay.bench.hops`.

Chains of 1..N identity actors, driven through the relay's own transports (server/transport.py): a compiled
graph and chained actor calls. Each actor has the slices' `step(batch, hidden)` signature and does no work:
the first makes a decode-shaped hidden state ([rows, 1, hidden] fp32), the middle ones pass it on, the last
returns one token id per row. A round trip through k actors crosses k + 1 boundaries (gateway -> slice 0,
k - 1 slice-to-slice hops, last slice -> gateway), so the cost of one more slice is the slope of round trip
over k; the round trip with `depth` = k steps in flight shows what pipelining leaves per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass

import ray
import torch

from qwen_relay.server.transport import build_transport
from qwen_relay.shards.batch import SamplingParams, StepBatch

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class IdentitySlice:
    """A slice that does nothing: the hop is all that is left to time."""

    def __init__(self, first: bool, last: bool, hidden_size: int) -> None:
        self.first, self.last, self.hidden_size = first, last, hidden_size
        torch.set_num_threads(1)

    def step(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[int]:
        if self.first:
            hidden = torch.zeros(len(batch), 1, self.hidden_size)
        return [0] * len(batch) if self.last else hidden


@dataclass(frozen=True)
class HopResult:
    transport: str
    slices: int
    in_flight: int
    round_trip_ms: float  # median per step (with steps in flight: wall / steps)


def decode_batch(rows: int) -> StepBatch:
    return StepBatch(slots=list(range(rows)), starts=[0] * rows, token_ids=[[1]] * rows,
                     blocks=[[row] for row in range(rows)], sampling=[SamplingParams()] * rows)


async def time_chain(actors: list, mode: str, rows: int, steps: int) -> list[HopResult]:
    transport = build_transport(actors, len(actors), mode=mode)
    batch = decode_batch(rows)
    try:
        for _ in range(10):  # warm-up: channels sized, code paths hot
            await transport.step(batch)
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            await transport.step(batch)
            samples.append(time.perf_counter() - start)
        results = [HopResult(transport.name, len(actors), 1, statistics.median(samples) * 1000)]
        if len(actors) > 1:
            start = time.perf_counter()
            gate = asyncio.Semaphore(len(actors))

            async def one() -> None:
                async with gate:
                    await transport.step(batch)

            await asyncio.gather(*(one() for _ in range(steps)))
            results.append(HopResult(transport.name, len(actors), len(actors),
                                     (time.perf_counter() - start) / steps * 1000))
        return results
    finally:
        await transport.close()


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of round trip (ms) over slice count: the cost of one more hop."""
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


async def run(max_slices: int, rows: int, hidden_size: int, steps: int) -> dict:
    results: list[HopResult] = []
    for mode in ("compiled", "calls"):
        for k in range(1, max_slices + 1):
            actors = [IdentitySlice.remote(i == 0, i == k - 1, hidden_size) for i in range(k)]
            ray.get([a.__ray_ready__.remote() for a in actors])
            results += await time_chain(actors, mode, rows, steps)
            for actor in actors:
                ray.kill(actor)
    per_hop = {}
    for name in dict.fromkeys(r.transport for r in results):
        points = [(r.slices, r.round_trip_ms) for r in results if r.transport == name and r.in_flight == 1]
        per_hop[name] = slope(points)
    return {"rows": rows, "hidden_size": hidden_size, "steps": steps, "per_hop_ms": per_hop,
            "results": [asdict(r) for r in results]}


def render(report: dict) -> str:
    out = [f"Hop cost: identity slices, a {report['rows']} x 1 x {report['hidden_size']} fp32 hidden state, "
           f"median of {report['steps']} steps", "", "| transport | slices | steps in flight | ms per step |",
           "|---|---:|---:|---:|"]
    out += [f"| {r['transport']} | {r['slices']} | {r['in_flight']} | {r['round_trip_ms']:.2f} |"
            for r in report["results"]]
    out += ["", "| transport | ms per extra hop (slope) |", "|---|---:|"]
    out += [f"| {name} | {ms:.2f} |" for name, ms in report["per_hop_ms"].items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_relay.bench.hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=3, help="longest chain (default 3)")
    parser.add_argument("--rows", type=int, default=16, help="decode rows per step (default 16)")
    parser.add_argument("--hidden-size", type=int, default=896, help="default: Qwen2.5-0.5B's")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per chain")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        report = asyncio.run(run(args.slices, args.rows, args.hidden_size, args.steps))
    finally:
        ray.shutdown()
    print(render(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    from qwen_relay.bench.hops import main as _main

    raise SystemExit(_main())
