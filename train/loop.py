"""Pieces of the training loop shared by the Ray Train workers and the single-process baseline.

Everything here is deterministic given the seed: the batch order of an epoch, the dropout RNG of a step
(re-seeded from ``(seed, step, rank)``) and the optimizer. That is what lets a run resumed from a
checkpoint, after a crash or with ``--resume``, continue with exactly the losses an uninterrupted run has.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, collate

__all__ = [
    "LR_SCHEDULES",
    "LineWriter",
    "TrainState",
    "batch_fingerprint",
    "epoch_batches",
    "evaluate",
    "loss_sums",
    "make_optimizer",
    "make_scheduler",
    "seed_step",
    "train_single_process",
    "unwrap",
]

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainState:
    """Where training stands; saved as JSON in every checkpoint so a restart continues from it."""

    step: int = 0  # optimizer steps done, over all epochs
    epoch: int = 0  # the epoch in progress (or the next one when step_in_epoch == 0)
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    world_size: int = 1
    train_seconds: float = 0.0  # time in training steps only (no startup, eval or checkpointing)
    tokens: int = 0  # non-padding tokens trained on, all workers
    samples: int = 0  # conversations trained on, all workers (repeats that even out shards included)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    eval_history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    restarts: list[int] = field(default_factory=list)  # the step each restart or resume began from
    fingerprint: str = ""  # batch_fingerprint of the data and settings this run trains on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def batch_fingerprint(
    train: Sequence[Example], evals: Sequence[Example], seed: int, batch_size: int
) -> str:
    """A hash of everything that decides which batches each step sees: the encoded train and eval
    examples in order (so the data file's content, the tokenizer, --max-length, --truncation,
    --bad-records and the split) and the seed and per-worker batch size. The worker count is left out:
    a resume on another count is handled by skipping to the next epoch; --epochs and --lr are left out so
    a run can be continued for more epochs or at another rate."""
    h = hashlib.sha256(json.dumps({"seed": seed, "batch_size": batch_size}).encode())
    for name, examples in (("train", train), ("eval", evals)):
        h.update(f"\n{name} {len(examples)}\n".encode())
        for e in examples:
            h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's batches of example indices for one epoch.

    The epoch's order is one seeded permutation shared by all ranks; rank r takes every world_size-th
    index from r. When the examples do not divide evenly, the permutation is padded with its own first
    indices (as ``DistributedSampler`` does) so every rank runs the same number of steps: DDP needs that.
    """
    if num_examples <= 0:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    per_rank = math.ceil(num_examples / world_size)
    padded = (order * math.ceil(per_rank * world_size / num_examples))[: per_rank * world_size]
    mine = padded[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Re-seed torch's RNG (LoRA dropout) for one step, so a resumed step draws what the original drew."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def loss_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of labelled positions).

    Sums rather than a mean so losses over several batches or workers combine exactly, weighted by
    tokens. Labels are shifted here: position t predicts token t + 1.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> tuple[float, int]:
    """(loss sum, labelled tokens) over ``examples`` with dropout off; the caller combines across ranks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_token_id).items()}
        loss_sum, n = loss_sums(model, batch)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total, count


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters only, in a fixed order so its state can be restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 over ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, not {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LineWriter:
    """A file for tqdm that turns each refresh into its own line.

    Ray forwards a worker's stderr to the driver line by line, so tqdm's usual carriage-return redraws
    would show up only when the bar closes; one line per refresh (tqdm's ``mininterval``) reads well
    in the driver's console and in log files.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def train_single_process(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    pad_token_id: int,
    seed: int = 0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_steps: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainState:
    """The same training as one Ray worker does, in this process, without Ray or DDP: the baseline the
    distributed job is benchmarked against, and a way to train where Ray is not installed."""
    device = next(model.parameters()).device
    steps_per_epoch = len(epoch_batches(len(examples), batch_size, seed, 0))
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = make_scheduler(optimizer, schedule, warmup_steps, epochs * steps_per_epoch)
    state = TrainState(steps_per_epoch=steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        for indices in epoch_batches(len(examples), batch_size, seed, epoch):
            start = time.perf_counter()
            seed_step(seed, state.step, 0)
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_token_id).items()
            }
            loss_sum, n = loss_sums(model, batch)
            (loss_sum / max(n, 1)).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.train_seconds += time.perf_counter() - start
            state.tokens += int(batch["attention_mask"].sum())
            state.samples += len(indices)
            loss = float(loss_sum.detach()) / max(n, 1)
            state.history.append({"step": state.step, "epoch": epoch + 1, "loss": loss})
            if on_step is not None:
                on_step(state.step, loss)
        state.epoch = epoch + 1
    return state
