"""The distributed LoRA job: Ray Train ``TorchTrainer`` workers running DDP (gloo on CPU, NCCL on GPU).

The driver (:func:`run_training`) validates and tokenizes the data once, so a bad file fails before any
worker starts, then puts the encoded examples in the Ray object store. Each worker builds the LoRA model,
takes its own shard of every epoch (:func:`~qwen_relay.train.loop.epoch_batches`) and trains; rank 0
shows progress and saves checkpoints (adapter + optimizer + :class:`~qwen_relay.train.loop.TrainState`)
through ``ray.train.report``. A worker that dies is restarted by Ray Train (``FailureConfig``) from the
latest checkpoint; ``--resume`` starts a new job on the same Ray Train run, which restores it the same way.

Metrics go to Ray Train every ``report_every`` steps, not every step: each ``report`` is a barrier
that waits on the controller, and reporting every step throttled training to about one step per 2 s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .data import Example, PreparedData, collate, prepare_dataset, split_train_eval
from .loop import (
    LineWriter,
    TrainState,
    epoch_batches,
    evaluate,
    loss_sums,
    make_optimizer,
    make_scheduler,
    seed_step,
    unwrap,
)
from .lora import LoraSettings, build_lora_model, resolve_dtype
from .summary import write_summary

__all__ = ["ADAPTER_FILES", "TrainConfig", "run_training", "train_loop_per_worker"]

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train v2 writes into a run's folder
_RUN_PREFIX = "lora-"


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI flags map onto these fields one to one."""

    model: str
    data: str
    output: str
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 4  # per worker
    max_length: int = 1024
    eval_fraction: float = 0.1
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: str = "auto"
    weight_decay: float = 0.0
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    truncation: str = "truncate"
    bad_records: str = "error"
    report_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep_checkpoints: int = 2
    max_failures: int = 2
    resume: bool = False
    run_name: str | None = None
    storage_path: str | None = None  # default: <output>/ray
    ray_address: str | None = None
    progress: bool = True
    # Fault injection for tests: the last rank exits hard once at this step (0: never).
    crash_at_step: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        for name in ("workers", "epochs", "batch_size", "max_length", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# Worker side


def _setup_worker_logging() -> None:
    """Let our INFO lines through in a worker (its stderr reaches the driver), without duplicating them:
    Ray Train may already have put a handler on the root logger. Also drop transformers' per-load weight
    progress bars, which would interleave with the training progress of every worker."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # PEFT 0.21 still calls a transformers 5 deprecated property on every model build; once per worker
    # per restart it only clutters the training console.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logger = logging.getLogger("qwen_relay")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
) -> None:
    unwrap(model).save_pretrained(str(directory))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIMIZER_FILE
    )
    (directory / STATE_FILE).write_text(json.dumps(state.to_dict()), encoding="utf-8")


def _load_adapter_weights(directory: Path, model: torch.nn.Module) -> None:
    """Put a checkpoint's adapter weights into the (not yet DDP-wrapped) PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise RuntimeError(
            f"checkpoint {directory} does not fit this LoRA setup (e.g. {unexpected[:3]}); "
            "resume with the same --lora-r and --target-modules"
        )


def _load_optimizer(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig
) -> None:
    """Restore AdamW's moments and the schedule position, keeping this run's --lr as the base rate."""
    saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, factor in zip(
        optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas], strict=True
    ):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor


def _maybe_crash(cfg: TrainConfig, step: int, rank: int, world: int) -> None:
    """Fault injection: the last rank dies without cleanup, once, so tests see a real worker failure."""
    if not cfg.crash_at_step or step != cfg.crash_at_step or rank != world - 1:
        return
    marker = Path(cfg.output) / ".crash-injected"
    if marker.exists():
        return
    marker.touch()
    log.warning("fault injection: rank %d exits at step %d", rank, step)
    sys.stderr.flush()
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the LoRA model, restore the latest checkpoint if any, train its shard."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from tqdm import tqdm

    _setup_worker_logging()
    cfg = TrainConfig.from_dict(config["cfg"])
    train_examples: list[Example] = ray.get(config["train_ref"])
    eval_examples: list[Example] = ray.get(config["eval_ref"])
    pad_token_id: int = config["pad_token_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    dtype = resolve_dtype(cfg.dtype, cfg.use_gpu)

    torch.manual_seed(cfg.seed)  # same LoRA init on every rank (DDP also broadcasts rank 0's)
    model = build_lora_model(cfg.model, cfg.lora, dtype)
    batches_per_epoch = len(epoch_batches(len(train_examples), cfg.batch_size, cfg.seed, 0, rank, world))
    total_steps = cfg.epochs * batches_per_epoch
    state = TrainState(steps_per_epoch=batches_per_epoch, world_size=world)

    checkpoint = ray.train.get_checkpoint()
    restored_dir: tempfile.TemporaryDirectory | None = None
    if checkpoint is not None:
        restored_dir = tempfile.TemporaryDirectory(prefix="qwen-relay-restore-")
        directory = Path(checkpoint.to_directory(restored_dir.name))
        state = TrainState.from_dict(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))
        _load_adapter_weights(directory, model)
        if (state.world_size, state.steps_per_epoch) != (world, batches_per_epoch) and state.step_in_epoch:
            log.warning(
                "worker layout changed (%d workers, %d steps/epoch -> %d, %d): the rest of epoch %d "
                "is skipped",
                state.world_size,
                state.steps_per_epoch,
                world,
                batches_per_epoch,
                state.epoch + 1,
            )
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        state.world_size, state.steps_per_epoch = world, batches_per_epoch
        state.restarts.append(state.step)
        if rank == 0:
            log.info(
                "resuming from checkpoint at step %d (epoch %d, step %d of it)",
                state.step,
                state.epoch + 1,
                state.step_in_epoch,
            )

    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
    if restored_dir is not None:
        _load_optimizer(Path(restored_dir.name), optimizer, scheduler, cfg)
        restored_dir.cleanup()

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        name = f"checkpoint-{state.step:06d}"
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="qwen-relay-ckpt-") as tmp:
            _save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )

    bar = tqdm(
        total=total_steps,
        initial=min(state.step, total_steps),
        disable=rank != 0 or not cfg.progress,
        file=LineWriter(),
        mininterval=2.0,
        unit="step",
        ascii=True,
        dynamic_ncols=False,
        ncols=100,
        desc=f"train ({world} workers)",
    )
    window: list[float] = []  # per-step losses since the last report
    model.train()
    for epoch in range(state.epoch, cfg.epochs):
        batches = epoch_batches(len(train_examples), cfg.batch_size, cfg.seed, epoch, rank, world)
        first = state.step_in_epoch if epoch == state.epoch else 0
        for b in range(first, len(batches)):
            start = time.perf_counter()
            seed_step(cfg.seed, state.step, rank)
            examples = [train_examples[i] for i in batches[b]]
            batch = {k: v.to(device) for k, v in collate(examples, pad_token_id).items()}
            loss_sum, n = loss_sums(model, batch)
            (loss_sum / max(n, 1)).backward()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Global loss (token-weighted over all workers), tokens and samples for this step.
            stats = torch.tensor(
                [float(loss_sum.detach()), n, int(batch["attention_mask"].sum()), len(examples)],
                dtype=torch.float64,
                device=device,
            )
            if world > 1:
                dist.all_reduce(stats)
            stats = stats.cpu()
            elapsed = time.perf_counter() - start
            state.step += 1
            state.step_in_epoch = b + 1
            state.train_seconds += elapsed
            state.tokens += int(stats[2])
            state.samples += int(stats[3])
            loss = float(stats[0] / stats[1])
            window.append(loss)
            state.history.append(
                {
                    "step": state.step,
                    "epoch": round(epoch + (b + 1) / len(batches), 4),
                    "loss": loss,
                    "lr": lr,
                }
            )
            tokens_per_s = state.tokens / max(state.train_seconds, 1e-9)
            bar.set_postfix_str(
                f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} tok/s {tokens_per_s:,.0f}", refresh=False
            )
            bar.update(1)
            _maybe_crash(cfg, state.step, rank, world)

            metrics = {
                "step": state.step,
                "epoch": epoch + (b + 1) / len(batches),
                "loss": sum(window) / len(window),
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "samples_per_s": state.samples / max(state.train_seconds, 1e-9),
            }
            if b + 1 == len(batches):  # end of epoch: eval, then a checkpoint
                if eval_examples:
                    shard = eval_examples[rank::world]
                    total, count = (
                        evaluate(model, shard, cfg.batch_size, pad_token_id, device) if shard else (0, 0)
                    )
                    sums = torch.tensor([total, count], dtype=torch.float64, device=device)
                    if world > 1:
                        dist.all_reduce(sums)
                    eval_loss = float(sums[0] / sums[1]) if float(sums[1]) else float("nan")
                    metrics["eval_loss"] = eval_loss
                    state.eval_history.append(
                        {"epoch": epoch + 1, "step": state.step, "eval_loss": eval_loss}
                    )
                    if rank == 0:
                        log.info(
                            "epoch %d/%d: train loss %.4f, eval loss %.4f",
                            epoch + 1,
                            cfg.epochs,
                            sum(window) / len(window),
                            eval_loss,
                        )
                state.epoch, state.step_in_epoch = epoch + 1, 0
                report(metrics, with_checkpoint=True)
                window = []
            elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                report(metrics, with_checkpoint=True)
                window = []
            elif state.step % cfg.report_every == 0:
                report(metrics, with_checkpoint=False)
                window = []
    bar.close()


# ---------------------------------------------------------------------------------------------------------
# Driver side


def _init_ray(address: str | None) -> None:
    """Connect to ``address`` when given; else reuse a running local Ray or start one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init()


def _pick_run_name(storage: str, cfg: TrainConfig) -> str:
    """A new timestamped run, or with ``resume`` the latest run in ``storage`` that has a checkpoint.

    Ray Train v2 restores a run from its checkpoint snapshot when a trainer starts with the same name and
    storage path; that is all ``--resume`` needs to do.
    """
    local = "://" not in storage
    if cfg.run_name:
        if cfg.resume and local and not (Path(storage) / cfg.run_name / _SNAPSHOT_FILE).exists():
            raise FileNotFoundError(f"--resume: no checkpoint of run {cfg.run_name!r} in {storage}")
        return cfg.run_name
    if cfg.resume:
        if not local:
            raise ValueError("--resume with remote storage needs --run-name")
        runs = sorted(p.parent.name for p in Path(storage).glob(f"{_RUN_PREFIX}*/{_SNAPSHOT_FILE}"))
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run with a checkpoint in {storage}")
        return runs[-1]
    return f"{_RUN_PREFIX}{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def _pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return int(pad)


def prepare_job_data(cfg: TrainConfig, tokenizer: Any) -> tuple[PreparedData, list[Example], list[Example]]:
    """Validate and encode the data file, then split it; runs on the driver, before any worker exists."""
    data = prepare_dataset(
        cfg.data, tokenizer, cfg.max_length, truncation=cfg.truncation, bad_records=cfg.bad_records
    )
    train, evals = split_train_eval(data.examples, cfg.eval_fraction, cfg.seed)
    log.info(
        "%s: %d records, %d usable (%d skipped, %d truncated): %d train, %d eval",
        cfg.data,
        data.num_records,
        len(data.examples),
        data.num_skipped,
        data.num_truncated,
        len(train),
        len(evals),
    )
    return data, train, evals


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole job and write the adapter, tokenizer and training summary into ``cfg.output``.

    Returns the summary (also written as ``training_summary.json``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    wall_start = time.perf_counter()
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cfg.output = str(output)
    # Local storage as an absolute path (Ray Train requires one); URIs (s3://, gs://, ...) as given.
    storage = cfg.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    run_name = _pick_run_name(storage, cfg)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    data, train, evals = prepare_job_data(cfg, tokenizer)
    _init_ray(cfg.ray_address)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "train_ref": ray.put(train),
            "eval_ref": ray.put(evals),
            "pad_token_id": _pad_token_id(tokenizer),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.keep_checkpoints)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    log.info(
        "training %s on %d %s worker(s), run %s in %s",
        cfg.model,
        cfg.workers,
        "GPU" if cfg.use_gpu else "CPU",
        run_name,
        storage,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    with tempfile.TemporaryDirectory(prefix="qwen-relay-final-") as tmp:
        final = Path(result.checkpoint.to_directory(tmp))
        for name in ADAPTER_FILES:
            shutil.copy2(final / name, output / name)
        state = TrainState.from_dict(json.loads((final / STATE_FILE).read_text(encoding="utf-8")))
    tokenizer.save_pretrained(str(output))

    summary = _summary(
        cfg, data, train, evals, state, run_name, storage, result, time.perf_counter() - wall_start
    )
    write_summary(output, summary)
    log.info(
        "adapter written to %s (final train loss %s, eval loss %s)",
        output,
        summary["final_train_loss"],
        summary["final_eval_loss"],
    )
    return summary


def _summary(
    cfg: TrainConfig,
    data: PreparedData,
    train: list[Example],
    evals: list[Example],
    state: TrainState,
    run_name: str,
    storage: str,
    result: Any,
    wall_seconds: float,
) -> dict[str, Any]:
    last_epoch = [h["loss"] for h in state.history[-state.steps_per_epoch :]] if state.steps_per_epoch else []
    return {
        "model": cfg.model,
        "data": cfg.data,
        "output": cfg.output,
        "run": {
            "name": run_name,
            "storage_path": storage,
            "checkpoint": result.checkpoint.path,
            "restarts_from_step": state.restarts,
        },
        "records": {
            "total": data.num_records,
            "used": len(data.examples),
            "skipped": data.num_skipped,
            "truncated": data.num_truncated,
            "train": len(train),
            "eval": len(evals),
            "problems": [str(p) for p in data.problems],
        },
        "config": cfg.to_dict(),
        "steps": state.step,
        "epochs": state.epoch,
        "final_train_loss": (sum(last_epoch) / len(last_epoch)) if last_epoch else None,
        "final_eval_loss": state.eval_history[-1]["eval_loss"] if state.eval_history else None,
        "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds,
        "tokens": state.tokens,
        "samples": state.samples,
        "tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
        "samples_per_s": state.samples / state.train_seconds if state.train_seconds else None,
        "history": state.history,
        "eval_history": state.eval_history,
    }
