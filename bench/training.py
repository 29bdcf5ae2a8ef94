"""Benchmark: the N-worker Ray Train job against a single-process PEFT loop on the same data.

Both train the same LoRA setup for the same epochs with the same global batch (N workers x B per worker
against one process with N x B), so they take the same number of optimizer steps. Two throughputs each:

- *steady*: tokens (non-padding) and samples per second inside training steps only; for the job that is
  forward + backward + DDP all-reduce + optimizer on every worker, summed over workers.
- *end to end*: the same counts over the whole call, including model loading, Ray Train worker start-up,
  eval-free checkpointing at epoch ends and shutdown.

Run: ``python -m qwen_relay.bench.training [--model DIR] [--workers 2] ...``; without ``--model`` it builds
the synthetic tiny Qwen2 checkpoint. Prints a markdown table and the ratio job / single process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench", "main", "make_chat_data"]

log = logging.getLogger(__name__)

_USER = [
    "Merhaba",
    "Hello",
    "What is the capital of France?",
    "Teşekkürler",
    "Hava nasıl?",
    "Can you explain how a transformer generates text?",
    "Translate this sentence into Turkish, please.",
    "When does the meeting start?",
]
_ASSISTANT = [
    "Merhaba! Nasıl yardımcı olabilirim?",
    "Hello! How can I help you today?",
    "The capital of France is Paris.",
    "Teşekkür ederim, iyi günler dilerim!",
    "Bugün hava çok güzel, parkta yürüyüşe çıkalım mı?",
    "Each layer of the network reads the hidden state and writes a new one.",
    "Türkçe öğrenmek zor değil, sadece pratik gerekiyor.",
    "The meeting starts at 10:30 and ends at 12:15.",
]


def make_chat_data(path: str | Path, n: int, seed: int = 0) -> Path:
    """``n`` short chats (JSON Lines) with one to three exchanges each, drawn from fixed sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(_USER))
            messages += [
                {"role": "user", "content": _USER[i]},
                {"role": "assistant", "content": _ASSISTANT[i]},
            ]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _single_process(cfg: Any, threads: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from qwen_relay.shards.dtypes import resolve_dtype
    from qwen_relay.train.job import prepare_job_data
    from qwen_relay.train.loop import train_single_process
    from qwen_relay.train.lora import build_lora_model

    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        _, train, _ = prepare_job_data(cfg, tokenizer)
        torch.manual_seed(cfg.seed)
        model = build_lora_model(cfg.model, cfg.lora, resolve_dtype(cfg.dtype, "cpu"))
        state = train_single_process(
            model,
            train,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size * cfg.workers,
            lr=cfg.lr,
            pad_token_id=tokenizer.pad_token_id,
            seed=cfg.seed,
            schedule=cfg.lr_schedule,
        )
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "steps": state.step,
        "samples": state.samples,
        "tokens": state.tokens,
        "train_seconds": state.train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "final_loss": state.history[-1]["loss"],
    }


def _job(cfg: Any) -> dict[str, Any]:
    from qwen_relay.train.job import run_training

    start = time.perf_counter()
    summary = run_training(cfg)
    return {
        "steps": summary["steps"],
        "samples": summary["samples"],
        "tokens": summary["tokens"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": time.perf_counter() - start,
        "final_loss": summary["history"][-1]["loss"],
    }


def bench(
    model: str,
    data: str,
    out_dir: str,
    *,
    workers: int = 2,
    epochs: int = 2,
    batch_size: int = 2,
    max_length: int = 256,
    lr: float = 2e-4,
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Run each mode and return one row per mode (keys: mode, steps, samples, tokens, seconds, rates)."""
    from qwen_relay.train.config import TrainConfig

    cfg = TrainConfig(
        model=model,
        data=data,
        output=str(Path(out_dir) / "job"),
        workers=workers,
        cpus_per_worker=1.0,  # one thread per worker, as the single-process modes are sized against
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        lr=lr,
        eval_fraction=0.0,
        lr_schedule="constant",
        report_every=10**6,
        ray_address=ray_address,
        progress=False,
    )
    threads = max(1, int(workers * cfg.cpus_per_worker))
    modes = [
        (f"Ray Train, {workers} workers x 1 thread (DDP, gloo)", lambda: _job(cfg)),
        (f"single process, {threads} threads", lambda: _single_process(cfg, threads)),
    ]
    if threads > 1:  # one thread per process is what each worker gets, and small models often prefer it
        modes.append(("single process, 1 thread", lambda: _single_process(cfg, 1)))
    rows = []
    for mode, run in modes:
        log.info("bench: %s", mode)
        r = run()
        r["mode"] = mode
        r["samples_per_s"] = r["samples"] / r["train_seconds"]
        r["tokens_per_s"] = r["tokens"] / r["train_seconds"]
        r["e2e_samples_per_s"] = r["samples"] / r["wall_seconds"]
        r["e2e_tokens_per_s"] = r["tokens"] / r["wall_seconds"]
        rows.append(r)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| mode | steps | samples | tokens | train s | samples/s | tokens/s | wall s | e2e samples/s "
        "| e2e tokens/s | final loss |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    body = [
        f"| {r['mode']} | {r['steps']} | {r['samples']} | {r['tokens']} | {r['train_seconds']:.2f} "
        f"| {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['wall_seconds']:.1f} "
        f"| {r['e2e_samples_per_s']:.1f} | {r['e2e_tokens_per_s']:.0f} | {r['final_loss']:.4f} |"
        for r in rows
    ]
    job = rows[0]
    ratios = [
        f"ratio job / {single['mode']}: steady tokens/s {job['tokens_per_s'] / single['tokens_per_s']:.2f}x, "
        f"samples/s {job['samples_per_s'] / single['samples_per_s']:.2f}x; end to end tokens/s "
        f"{job['e2e_tokens_per_s'] / single['e2e_tokens_per_s']:.2f}x"
        for single in rows[1:]
    ]
    return "\n".join([head, *body, "", *ratios])


def main(argv: list[str] | None = None) -> int:
    """Command line: builds what is missing, runs both modes, prints the table (also written as JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m qwen_relay.bench.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="checkpoint folder (default: build the synthetic one, see --shape)")
    parser.add_argument(
        "--shape", default="tiny", help="synthetic checkpoint shape when --model is not given"
    )
    parser.add_argument("--data", help="chat data (default: --examples generated chats)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=2, help="per worker; the single process gets N x this"
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ray-address")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="qwen-relay-bench-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model is None:
            from qwen_relay.checkpoints.synthetic import build_checkpoint

            model = str(build_checkpoint(out / "model", args.shape))
        data = args.data or str(make_chat_data(out / "chat.jsonl", args.examples))
        rows = bench(
            model,
            data,
            str(out),
            workers=args.workers,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lr=args.lr,
            ray_address=args.ray_address,
        )
        (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"model {model}; "
            f"{args.examples if not args.data else 'given'} chats, {args.epochs} epochs"
        )
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
