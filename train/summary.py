"""The training summary a person reads after a run: ``training_summary.json`` and ``loss_curve.png``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import Example, PreparedData
from .loop import TrainState

__all__ = ["SUMMARY_FILE", "LOSS_CURVE_FILE", "build_summary", "num_records", "plot_loss_curve", "write_summary"]

log = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"


def plot_loss_curve(
    path: str | Path,
    history: Sequence[dict[str, Any]],
    eval_history: Sequence[dict[str, Any]],
    title: str = "LoRA fine-tuning",
) -> Path:
    """Per-step train loss and per-epoch eval loss against the step, as a PNG.

    Uses matplotlib's Agg backend explicitly: training runs on headless machines, and an interactive
    backend would fail there or pop up windows elsewhere.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if history:
        ax.plot(
            [h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train loss (per step)"
        )
    if eval_history:
        ax.plot(
            [e["step"] for e in eval_history],
            [e["eval_loss"] for e in eval_history],
            "o-",
            label="eval loss (per epoch)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history or eval_history:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write the JSON summary and the loss curve into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / SUMMARY_FILE
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    png_path = plot_loss_curve(
        out / LOSS_CURVE_FILE,
        summary.get("history", []),
        summary.get("eval_history", []),
        title=f"LoRA fine-tuning of {Path(str(summary.get('model', ''))).name}",
    )
    log.info("wrote %s and %s", json_path, png_path)
    return json_path, png_path


def num_records(examples: list[Example]) -> int:
    """Records, not sequences: a record gives one sequence per reply under some templates (train/data.py)."""
    return len({e.location for e in examples})


def build_summary(
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
    """What ``training_summary.json`` holds: the run, its records, its config and its losses."""
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
            "used": data.num_used,
            "skipped": data.num_skipped,
            "truncated": data.num_truncated,
            "train": num_records(train),
            "eval": num_records(evals),
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
