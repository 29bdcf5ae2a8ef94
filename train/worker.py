"""One Ray Train worker of the LoRA job: a DDP rank (gloo on CPU, NCCL on GPU) training its shard.

Each worker builds the LoRA model, restores the latest checkpoint if there is one, takes its own shard of every
epoch (:func:`~qwen_relay.train.loop.epoch_batches`) and trains; rank 0 shows progress and saves checkpoints
(:mod:`~qwen_relay.train.checkpoints`) through ``ray.train.report``. A worker that dies is restarted by Ray
Train (``FailureConfig``) from the latest checkpoint.

Metrics go to Ray Train every ``report_every`` steps, not every step: each ``report`` is a barrier
that waits on the controller, and reporting every step throttled training to about one step per 2 s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qwen_relay.shards.dtypes import resolve_dtype

from .checkpoints import STATE_FILE, check_fingerprint, load_adapter_weights, load_optimizer, save_checkpoint
from .config import TrainConfig
from .data import Example, collate
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
from .lora import build_lora_model

__all__ = ["train_loop_per_worker"]

log = logging.getLogger(__name__)


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
    # Ray Train logs every report's whole metrics dict from every worker at INFO ("Reporting training result
    # N: TrainingReport(...)"), under a logger named by its file path, so no "ray.train" level reaches it;
    # the progress bar and the epoch lines already say what matters.
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    logger = logging.getLogger("qwen_relay")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


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


def _all_reduce(tensor: torch.Tensor, what: str, cfg: TrainConfig) -> None:
    """Sum ``tensor`` over the ranks, naming the step and the timeout if the collective fails."""
    import torch.distributed as dist

    try:
        dist.all_reduce(tensor)
    except Exception as e:
        raise RuntimeError(
            f"{what}: all-reduce across the workers failed or waited more than --collective-timeout "
            f"{cfg.collective_timeout:g} s ({e})"
        ) from e


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the LoRA model, restore the latest checkpoint if any, train its shard."""
    import ray
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    _setup_worker_logging()
    cfg = TrainConfig.from_dict(config["cfg"])
    train_examples: list[Example] = ray.get(config["train_ref"])
    eval_examples: list[Example] = ray.get(config["eval_ref"])
    pad_token_id: int = config["pad_token_id"]
    fingerprint: str = config["fingerprint"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    dtype = resolve_dtype(cfg.dtype, "cuda" if cfg.use_gpu else "cpu")

    torch.manual_seed(cfg.seed)  # same LoRA init on every rank (DDP also broadcasts rank 0's)
    model = build_lora_model(cfg.model, cfg.lora, dtype)
    batches_per_epoch = len(epoch_batches(len(train_examples), cfg.batch_size, cfg.seed, 0, rank, world))
    total_steps = cfg.epochs * batches_per_epoch
    state = TrainState(steps_per_epoch=batches_per_epoch, world_size=world, fingerprint=fingerprint)

    checkpoint = ray.train.get_checkpoint()
    restored_dir: tempfile.TemporaryDirectory | None = None
    if checkpoint is not None:
        restored_dir = tempfile.TemporaryDirectory(prefix="qwen-relay-restore-")
        directory = Path(checkpoint.to_directory(restored_dir.name))
        state = TrainState.from_dict(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))
        check_fingerprint(state.fingerprint, fingerprint, f"checkpoint at step {state.step}")
        state.fingerprint = fingerprint
        load_adapter_weights(directory, model)
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
        load_optimizer(Path(restored_dir.name), optimizer, scheduler, cfg.lr)
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
            save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
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
                _all_reduce(stats, f"step {state.step + 1} loss", cfg)
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
                    # Each rank evaluates its own slice (possibly empty) on the bare model: DDP's forward
                    # broadcasts buffers, a collective that ranks with different batch counts would not
                    # pair up. The one all-reduce below is then the only collective, on every rank.
                    shard = eval_examples[rank::world]
                    total, count = evaluate(unwrap(model), shard, cfg.batch_size, pad_token_id, device)
                    sums = torch.tensor([total, count], dtype=torch.float64, device=device)
                    if world > 1:
                        _all_reduce(sums, f"epoch {epoch + 1} eval loss", cfg)
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
