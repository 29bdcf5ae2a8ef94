"""A run's checkpoints: what each holds, and the checks that make ``--resume`` continue the same batches.

A checkpoint is the adapter, the optimizer and schedule, and the :class:`~qwen_relay.train.loop.TrainState`
(position, history, the fingerprint of what decides the batches). Rank 0 writes one through
``ray.train.report``; Ray Train keeps them in the run's folder of the storage path, where ``--resume`` finds
the run by name and Ray Train restores the newest.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .loop import TrainState, unwrap

__all__ = [
    "ADAPTER_FILES",
    "OPTIMIZER_FILE",
    "RUN_PREFIX",
    "SNAPSHOT_FILE",
    "STATE_FILE",
    "FingerprintMismatch",
    "check_fingerprint",
    "check_resume",
    "load_adapter_weights",
    "load_optimizer",
    "pick_run_name",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train v2 writes into a run's folder
RUN_PREFIX = "lora-"


def save_checkpoint(
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


def load_adapter_weights(directory: Path, model: torch.nn.Module) -> None:
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


def load_optimizer(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, lr: float
) -> None:
    """Restore AdamW's moments and the schedule position, keeping this run's --lr (``lr``) as the base rate."""
    saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(
        optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas], strict=True
    ):
        group["initial_lr"] = lr
        group["lr"] = lr * factor


class FingerprintMismatch(ValueError):
    """A checkpoint was trained on other data or batch settings than this run has."""


def check_fingerprint(saved: str, current: str, where: str) -> None:
    """Refuse to continue a checkpoint on data or settings that make other batches.

    Refusing rather than starting over: the user asked to continue that checkpoint, and quietly dropping
    it would throw away training they meant to keep; a new run is one flag away.
    """
    if not saved:
        log.warning("%s has no data fingerprint (written by an older version): cannot check that the data "
                    "and batch settings are unchanged", where)
        return
    if saved != current:
        raise FingerprintMismatch(
            f"{where} was trained on other data or batch settings (fingerprint {saved[:12]} here "
            f"{current[:12]}): the data file, its tokenization (--max-length, --truncation, --bad-records), "
            "--eval-fraction, --seed or --batch-size changed, so resuming would not continue its batches. "
            "Resume with the original data and settings, or start a new run (without --resume, or with a "
            "new --run-name)"
        )


def check_resume(run_dir: Path, fingerprint: str) -> None:
    """Before any worker starts: refuse to resume a run whose checkpoints were trained on other batches."""
    for state_file in sorted(run_dir.glob(f"checkpoint-*/{STATE_FILE}"), reverse=True):
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8")).get("fingerprint", "")
        except (OSError, ValueError):
            continue  # a checkpoint cut short by a crash; an older one tells the same
        check_fingerprint(saved, fingerprint, f"--resume: run {run_dir.name}")
        return


def pick_run_name(storage: str, cfg: TrainConfig) -> str:
    """A new timestamped run, or with ``resume`` the latest run in ``storage`` that has a checkpoint.

    Ray Train v2 restores a run from its checkpoint snapshot when a trainer starts with the same name and
    storage path; that is all ``--resume`` needs to do.
    """
    local = "://" not in storage
    if cfg.run_name:
        if cfg.resume and local and not (Path(storage) / cfg.run_name / SNAPSHOT_FILE).exists():
            raise FileNotFoundError(f"--resume: no checkpoint of run {cfg.run_name!r} in {storage}")
        return cfg.run_name
    if cfg.resume:
        if not local:
            raise ValueError("--resume with remote storage needs --run-name")
        runs = sorted(p.parent.name for p in Path(storage).glob(f"{RUN_PREFIX}*/{SNAPSHOT_FILE}"))
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run with a checkpoint in {storage}")
        return runs[-1]
    return f"{RUN_PREFIX}{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
