"""What a training run is asked to do: the ``train`` flags as one dataclass, which the driver hands to every
worker as a dict (:meth:`TrainConfig.to_dict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .lora import LoraSettings

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI flags map onto these fields one to one."""

    model: str
    data: str
    output: str
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: a share of the node train starts, 1 on an existing cluster
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
    placement_timeout: float = 600.0  # seconds to wait for the worker group's resources
    collective_timeout: float = 300.0  # seconds any one collective (all-reduce, barrier) may take
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
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval-fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("cpus_per_worker", "placement_timeout", "collective_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)
