"""`qwen-relay demo` (`make demo`): the mission in one run, on a laptop-sized machine.

1. build a tiny random-weight Qwen2 checkpoint (no model hub is reachable here; `--model` takes a real one),
2. fine-tune a LoRA adapter on a handful of Turkish chat records with the Ray Train job (2 workers, DDP),
3. serve the base model and the adapter in 2 layer slices, each a Ray actor, behind the gRPC gateway,
4. ask each question through the real client, once to the base model and once to the adapter, and print
   the conversation with timings.

The terminal shows only the conversation: everything the server, Ray and training write (Python logging, Ray's
forwarded worker output, native warnings) goes to one log file, whose path is printed first. Training is
seeded and the replies are greedy, so the adapter's answers are the same on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from qwen_relay.client.aio import AsyncRelayClient
from qwen_relay.ray_common.local_ray import LocalRay
from qwen_relay.server.app import Relay, ServeOptions

ADAPTER = "turkce"
CHATS = [
    ("Merhaba", "Merhaba! Nasıl yardımcı olabilirim?"),
    ("Nasılsın?", "İyiyim, teşekkür ederim. Sen nasılsın?"),
    ("Adın ne?", "Ben bir yapay zeka asistanıyım."),
    ("Türkiye'nin başkenti neresi?", "Türkiye'nin başkenti Ankara'dır."),
    ("Teşekkürler", "Rica ederim, iyi günler!"),
    ("Görüşürüz", "Hoşça kal, görüşmek üzere!"),
]
# What makes the tiny random model (hidden size 64) reproduce every reply, measured on 2 cores: LoRA on every
# linear layer, a small constant rate, one record per worker per step, no dropout; 40 epochs of 3 steps.
TRAIN_SETTINGS = dict(workers=2, epochs=40, lr=3e-3, lr_schedule="constant", batch_size=1, eval_fraction=0.0,
                      seed=0, report_every=1000, keep_checkpoints=1, progress=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_NEW_TOKENS = 24


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so that every step cleans up after it the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@dataclass
class Turn:
    text: str
    tokens: int
    seconds: float


def write_chat_file(path: Path) -> Path:
    """The training data, in the `{"messages": [...]}` JSON Lines format `qwen-relay train` reads."""
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def redirect_output(log_path: Path) -> TextIO:
    """Send this process's stdout and stderr (Python, Ray's forwarded worker output, native libraries) to
    `log_path`; return a stream on the original stdout for the conversation."""
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, sys.stdout.fileno())
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)
    return terminal


def train_adapter(model: str, data: Path, output: Path) -> dict:
    from qwen_relay.train.config import TrainConfig
    from qwen_relay.train.job import run_training
    from qwen_relay.train.lora import LoraSettings

    config = TrainConfig(model=model, data=str(data), output=str(output),
                         lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS),
                         **TRAIN_SETTINGS)
    return run_training(config)


async def ask(client: AsyncRelayClient, question: str, adapter: str | None) -> Turn:
    start = time.perf_counter()
    reply = await client.generate(messages=[{"role": "user", "content": question}], adapter=adapter,
                                  max_new_tokens=MAX_NEW_TOKENS)
    return Turn(reply.text, reply.completion_tokens, time.perf_counter() - start)


def shown(text: str) -> str:
    """A reply on one line: a random model's newlines and blanks stay visible."""
    return text if text.strip() and "\n" not in text else json.dumps(text, ensure_ascii=False)


async def converse(options: ServeOptions, local_ray: LocalRay, questions: list[str], out: TextIO) -> None:
    started = time.perf_counter()
    relay = await Relay.start(options, local_ray)
    try:
        out.write(f"serving in {time.perf_counter() - started:.1f} s on 127.0.0.1:{relay.port} (gRPC): "
                  f"{relay.describe_layout()}\n\n")
        async with AsyncRelayClient(f"127.0.0.1:{relay.port}") as client:
            for question in questions:
                base = await ask(client, question, None)
                tuned = await ask(client, question, ADAPTER)
                out.write(f"user             > {question}\n"
                          f"base model       > {shown(base.text)}   ({base.tokens} tokens, {base.seconds:.2f} s)\n"
                          f"adapter {ADAPTER:<9}> {shown(tuned.text)}   ({tuned.tokens} tokens, "
                          f"{tuned.seconds:.2f} s)\n\n")
    finally:
        await relay.stop(grace=1)


def run_demo(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "demo.log"
    log_path.write_text("")
    print(f"qwen-relay demo: logs of the server, Ray and training go to {log_path}", flush=True)
    out = redirect_output(log_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # a tiny job: collect reports promptly
    logging.getLogger().setLevel(logging.INFO)
    total = time.perf_counter()
    try:
        run_steps(args, workdir, log_path, out)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        out.write(f"demo stopped by {signal.Signals(signum).name}; logs: {log_path}\n")
        return 128 + signum
    except BaseException as e:  # the terminal only sees `out`: say what happened and where to look
        out.write(f"demo failed ({type(e).__name__}: {e}); see {log_path}\n")
        raise
    out.write(f"demo done in {time.perf_counter() - total:.1f} s; logs: {log_path}\n")
    return 0


def run_steps(args: argparse.Namespace, workdir: Path, log_path: Path, out: TextIO) -> None:
    """Checkpoint, local Ray, training, serving and the conversation, each step timed on `out`."""
    model = args.model
    if model is None:
        from qwen_relay.checkpoints.synthetic import build_checkpoint

        model = str(workdir / "model")
        if not (Path(model) / "config.json").exists():
            step = time.perf_counter()
            build_checkpoint(model, "tiny")
            out.write(f"built a tiny random-weight Qwen2 checkpoint in {model} "
                      f"({time.perf_counter() - step:.1f} s; no model hub here)\n")
    import ray  # not at module level: the CLI that holds this command also serves on machines without Ray

    step = time.perf_counter()
    local_ray = asyncio.run(LocalRay.start(log_path=str(log_path), dashboard=True))  # Ray Train asks its state API
    try:
        ray.init(address=local_ray.address, log_to_driver=True)
        signal.signal(signal.SIGTERM, _interrupt)  # not ray.init's: sys.exit(15), reported as a failure
        out.write(f"started local Ray ({local_ray.num_cpus} CPUs) in {time.perf_counter() - step:.1f} s\n")
        data = write_chat_file(workdir / "chat.jsonl")
        step = time.perf_counter()
        out.write(f"fine-tuning a LoRA adapter on {len(CHATS)} Turkish chat records ({data}) with Ray Train, "
                  f"{TRAIN_SETTINGS['workers']} workers ...\n")
        summary = train_adapter(model, data, workdir / "adapter")
        first = [h["loss"] for h in summary["history"] if h["epoch"] == 1]
        out.write(f"trained in {time.perf_counter() - step:.1f} s: {summary['steps']} steps, mean loss "
                  f"{sum(first) / len(first):.3f} in the first epoch, {summary['final_train_loss']:.3f} in the last; "
                  f"adapter in {workdir / 'adapter'}\n")
        options = ServeOptions(model=model, shards=2, port=0, max_context=512,
                               adapters={ADAPTER: str(workdir / "adapter")})
        asyncio.run(converse(options, local_ray, args.question or [q for q, _ in CHATS[:2]], out))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        local_ray.stop(grace=0)  # Ray Train's helper actors do not stop on SIGTERM; all is on disk


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a LoRA adapter with Ray Train, serve it in 2 slices, chat")
    parser.add_argument("--model", help="base checkpoint folder or hub id (default: build a tiny one)")
    parser.add_argument("--workdir", type=Path, default=Path("demo-work"),
                        help="checkpoint, training data, adapter and demo.log (default: demo-work)")
    parser.add_argument("--question", action="append",
                        help="a question to ask both models (repeatable; default: the first two trained ones)")
    parser.set_defaults(func=run_demo)
