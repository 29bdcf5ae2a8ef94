"""The training summary a person reads after a run: ``training_summary.json`` and ``loss_curve.png``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_FILE", "LOSS_CURVE_FILE", "plot_loss_curve", "write_summary"]

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
