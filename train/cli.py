"""``qwen-relay train`` and ``qwen-relay merge``."""

from __future__ import annotations

import argparse
import json
import logging

from .config import TrainConfig
from .lora import LoraSettings

__all__ = ["add_parsers", "config_from_args", "run_merge", "run_train"]

log = logging.getLogger(__name__)

_DEFAULTS = LoraSettings()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="LoRA fine-tune a chat model with Ray Train (DDP over N workers)",
        description=(
            "LoRA fine-tuning on chat data ({'messages': [{'role', 'content'}, ...]} records, as a JSON "
            "array or JSON Lines) with Ray Train: DDP across workers (gloo on CPU, NCCL on GPU), loss on "
            "assistant tokens only, checkpoints every epoch, automatic restart of failed workers."
        ),
    )
    p.add_argument(
        "--model", required=True, help="base checkpoint: local folder or hub id (with a chat template)"
    )
    p.add_argument("--data", required=True, help="chat data: JSON array or JSON Lines of {'messages': [...]}")
    p.add_argument("--output", required=True, help="folder for the adapter, tokenizer and training summary")
    g = p.add_argument_group("workers")
    g.add_argument(
        "--workers", type=_positive_int, default=2, help="Ray Train workers (DDP ranks; default 2)"
    )
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (default: CPU, gloo)")
    g.add_argument(
        "--cpus-per-worker",
        type=_positive_float,
        default=None,
        help="Ray CPUs per worker; also its torch threads on CPU (default: an equal share of the node when "
        "train starts Ray itself, so any --workers fits; 1 on an existing cluster)",
    )
    g.add_argument(
        "--ray-address",
        help="an existing Ray cluster (e.g. auto; default $RAY_ADDRESS, else a Ray node of train's own)",
    )
    g.add_argument(
        "--placement-timeout",
        type=_positive_float,
        default=600.0,
        help="seconds to wait for an existing cluster to place the workers, logging what is awaited every "
        "15 s (default 600)",
    )
    g.add_argument(
        "--collective-timeout",
        type=_positive_float,
        default=300.0,
        help="seconds one collective across the workers (all-reduce, report barrier) may wait before the "
        "run fails (default 300)",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts from the latest checkpoint before giving up (default 2)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=3)
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    g.add_argument(
        "--lr-schedule",
        choices=["constant", "linear", "cosine"],
        default="linear",
        help="after warmup (default linear decay to 0)",
    )
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=_positive_int, default=4, help="conversations per worker per step")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="base weights (auto: bfloat16 on GPU, float32 on CPU)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--max-length", type=_positive_int, default=1024, help="tokens per conversation (default 1024)"
    )
    g.add_argument(
        "--truncation",
        choices=["truncate", "drop"],
        default="truncate",
        help="longer conversations: keep the first --max-length tokens, or treat them as bad records",
    )
    g.add_argument(
        "--bad-records",
        choices=["error", "skip"],
        default="error",
        help="bad records: reject the file listing each one (default), or skip them with a count",
    )
    g.add_argument(
        "--eval-fraction", type=float, default=0.1, help="held out for eval loss each epoch (default 0.1)"
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=_positive_int, default=_DEFAULTS.r)
    g.add_argument("--lora-alpha", type=int, default=_DEFAULTS.alpha)
    g.add_argument("--lora-dropout", type=float, default=_DEFAULTS.dropout)
    g.add_argument(
        "--target-modules",
        default=",".join(_DEFAULTS.target_modules),
        help="comma-separated module names (default q_proj,v_proj)",
    )
    g = p.add_argument_group("progress and checkpoints")
    g.add_argument(
        "--report-every",
        type=_positive_int,
        default=10,
        help="steps between metric reports to Ray Train (default 10)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints besides the one at each epoch end (default 0: epochs only)",
    )
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2)
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest run in the storage path from its latest checkpoint",
    )
    g.add_argument(
        "--run-name", help="Ray Train run name (default: a new timestamped one, or the latest with --resume)"
    )
    g.add_argument(
        "--storage-path", help="Ray Train storage (default OUTPUT/ray; shared or s3:// on clusters)"
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (metrics still go to Ray Train)"
    )
    p.set_defaults(func=run_train)


def _add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model, writing a plain checkpoint",
        description="Write base + LoRA delta as a full safetensors checkpoint with tokenizer and configs; it "
        "serves like any other checkpoint.",
    )
    p.add_argument("--model", required=True, help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (qwen-relay train's --output)")
    p.add_argument("--output", required=True, help="folder for the merged checkpoint")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights of the merged checkpoint (auto: the base checkpoint's)",
    )
    p.set_defaults(func=run_merge)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``merge`` on a CLI's subparsers; each handler is ``args.func(args)``."""
    _add_train_parser(subparsers)
    _add_merge_parser(subparsers)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~qwen_relay.train.config.TrainConfig` for parsed ``train`` arguments."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return TrainConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        workers=args.workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        lora=LoraSettings(
            r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets
        ),
        dtype=args.dtype,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        truncation=args.truncation,
        bad_records=args.bad_records,
        report_every=args.report_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        max_failures=args.max_failures,
        resume=args.resume,
        run_name=args.run_name,
        storage_path=args.storage_path,
        ray_address=args.ray_address,
        placement_timeout=args.placement_timeout,
        collective_timeout=args.collective_timeout,
        progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace) -> int:
    from .job import run_training

    summary = run_training(config_from_args(args), exit_on_signal=True)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "output",
                    "steps",
                    "epochs",
                    "final_train_loss",
                    "final_eval_loss",
                    "tokens_per_s",
                    "samples_per_s",
                    "wall_seconds",
                )
            },
            indent=2,
        )
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    print(merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype))
    return 0
