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

import asyncio
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from qwen_relay.ray_common.local_ray import LocalRay
from qwen_relay.shards.dtypes import resolve_dtype
from qwen_relay.shards.hub import local_folder

from .cluster import (
    WorkerResourcesError,
    WorkerShare,
    node_cpus,
    shortfall,
    wait_for_worker_resources,
    worker_share,
)
from .data import Example, PreparedData, collate, prepare_dataset, split_train_eval
from .loop import (
    LineWriter,
    TrainState,
    batch_fingerprint,
    epoch_batches,
    evaluate,
    loss_sums,
    make_optimizer,
    make_scheduler,
    seed_step,
    unwrap,
)
from .lora import LoraSettings, build_lora_model
from .summary import write_summary

__all__ = [
    "ADAPTER_FILES",
    "FingerprintMismatch",
    "TrainConfig",
    "run_training",
    "train_loop_per_worker",
]

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


# ---------------------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class _Placement:
    """Where the workers go: each one's resources and threads, and whether this call initialized Ray
    (started a node or connected), so that it also shuts it down."""

    resources: dict[str, float]
    threads: int
    owns_ray: bool
    local_ray: LocalRay | None  # the node this call started, in a session of its own (stopped last)


def _starts_own_node(cfg: TrainConfig) -> bool:
    """Whether ``train`` starts a Ray node of its own: no cluster given and no ``ray.init`` made already."""
    import ray

    return not (cfg.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def _place_workers(cfg: TrainConfig) -> _Placement:
    """Start a Ray node of our own, or join the cluster already there, and make sure the workers fit.

    On our own node the workers are sized to fit it (or refused at once); on an existing cluster (given by
    ``--ray-address``, ``RAY_ADDRESS``, or a ``ray.init`` the caller already made) the wait for their
    resources is logged and bounded by ``--placement-timeout``.
    """
    import ray

    owns = not ray.is_initialized()
    started = _starts_own_node(cfg)
    local_ray = None
    if started:
        cpus = node_cpus()
        share = worker_share(cfg.workers, cpus, cfg.cpus_per_worker)
        # As serve does (docs/local-ray.md): Ray in a session of its own, so a signal to this process group
        # reaches the driver alone and Ray is stopped by it, last, instead of dying underneath it.
        local_ray = asyncio.run(LocalRay.start(cpus, dashboard=True))  # Ray Train asks its state API
        ray.init(address=local_ray.address)
    else:
        if owns:
            ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        cpus_per_worker = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else 1.0
        share = WorkerShare(cpus_per_worker, max(1, int(cpus_per_worker)))
    resources: dict[str, float] = {"CPU": share.cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1
    if started:
        missing = shortfall(resources, cfg.workers, ray.cluster_resources())
        if missing:
            ray.shutdown()
            local_ray.stop()
            needs = ", ".join(f"{need:g} {name} (the node has {have:g})" for name, (need, have) in missing.items())
            raise WorkerResourcesError(f"--workers {cfg.workers} need {needs}: lower --workers")
    else:
        wait_for_worker_resources(resources, cfg.workers, cfg.placement_timeout)
    return _Placement(resources, share.threads, owns, local_ray)


def _exit_on_signals(where: str, local_ray: LocalRay | None) -> None:
    """From now on SIGINT (Ctrl-C) and SIGTERM end the process promptly with status 128 + the signal.

    Installed after ``ray.init``, which puts in its own handlers (SIGTERM: ``sys.exit`` then a slow
    ``ray.shutdown``, or a native stack dump and abort). Everything worth keeping is already on disk: each
    checkpoint is complete in the run's storage before training goes on, and ``--resume`` continues from
    the newest. The Ray node that ``train`` started (``local_ray``) is stopped; on an
    existing cluster the end of this driver ends its training run. Not ``ray.shutdown()``: when the signal
    went to the whole process group Ray's processes are already stopping, and it waits on them for
    seconds to minutes, then Ray ends the process with status 1.
    """

    def handler(signum: int, _frame: Any) -> None:
        log.warning(
            "training stopped by %s; its checkpoints so far are kept in %s: continue with --resume",
            signal.Signals(signum).name,
            where,
        )
        if local_ray is not None:
            local_ray.stop(grace=0)  # its workers would train on until killed: nothing to wait for
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def _fit_in_thread(trainer: Any) -> Any:
    """``trainer.fit()`` in a thread while the main thread waits, so the process's own signal handling
    stays in force: Ray Train would otherwise replace SIGINT's with a graceful abort that needs Ray's
    processes alive, which a signal to the whole process group has already ended. Ctrl-C in a script
    then raises KeyboardInterrupt here, and ``qwen-relay train`` exits at once (:func:`_exit_on_signals`)."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _check_resume(run_dir: Path, fingerprint: str) -> None:
    """Before any worker starts: refuse to resume a run whose checkpoints were trained on other batches."""
    for state_file in sorted(run_dir.glob(f"checkpoint-*/{STATE_FILE}"), reverse=True):
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8")).get("fingerprint", "")
        except (OSError, ValueError):
            continue  # a checkpoint cut short by a crash; an older one tells the same
        check_fingerprint(saved, fingerprint, f"--resume: run {run_dir.name}")
        return


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


def _num_records(examples: list[Example]) -> int:
    """Records, not sequences: a record gives one sequence per reply under some templates (train/data.py)."""
    return len({e.location for e in examples})


def prepare_job_data(cfg: TrainConfig, tokenizer: Any) -> tuple[PreparedData, list[Example], list[Example]]:
    """Validate and encode the data file, then split it; runs on the driver, before any worker exists."""
    data = prepare_dataset(
        cfg.data, tokenizer, cfg.max_length, truncation=cfg.truncation, bad_records=cfg.bad_records
    )
    train, evals = split_train_eval(data.examples, cfg.eval_fraction, cfg.seed)
    log.info(
        "%s: %d record%s, %d usable (%d skipped, %d truncated): %d train, %d eval; %d sequences",
        cfg.data,
        data.num_records,
        "s" * (data.num_records != 1),
        data.num_used,
        data.num_skipped,
        data.num_truncated,
        _num_records(train),
        _num_records(evals),
        len(data.examples),
    )
    if cfg.eval_fraction > 0 and not evals:
        log.warning("one usable record: no eval set (--eval-fraction needs at least 2 records to hold one out)")
    return data, train, evals


def run_training(cfg: TrainConfig, exit_on_signal: bool = False) -> dict[str, Any]:
    """Run the whole job and write the adapter, tokenizer and training summary into ``cfg.output``.

    ``exit_on_signal`` (the ``train`` command): once Ray is up, SIGINT and SIGTERM end the process at once,
    keeping the checkpoints so far (:func:`_exit_on_signals`).

    Returns the summary (also written as ``training_summary.json``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    wall_start = time.perf_counter()
    folder = local_folder(cfg.model)
    if folder is not None:  # absolute: Ray Train runs each worker in the run's own directory, not in ours
        cfg.model = str(folder.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except OSError as e:  # transformers' own, clear message (no network, no such repo): no traceback
        raise RuntimeError(f"cannot load the tokenizer of {cfg.model}: {e}") from e
    if _starts_own_node(cfg):  # a request this machine can never hold: refused before the data is read
        worker_share(cfg.workers, node_cpus(), cfg.cpus_per_worker)
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cfg.output = str(output)
    # Local storage as an absolute path (Ray Train requires one); URIs (s3://, gs://, ...) as given.
    storage = cfg.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    run_name = _pick_run_name(storage, cfg)

    data, train, evals = prepare_job_data(cfg, tokenizer)
    fingerprint = batch_fingerprint(train, evals, cfg.seed, cfg.batch_size)
    if cfg.resume and "://" not in storage:
        _check_resume(Path(storage) / run_name, fingerprint)
    # Ray Train's own collectives (the barrier in every report) get the same bound as torch's.
    os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", f"{cfg.collective_timeout:g}")
    placement = _place_workers(cfg)
    if exit_on_signal:
        _exit_on_signals(f"{storage}/{run_name}", placement.local_ray)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "train_ref": ray.put(train),
                "eval_ref": ray.put(evals),
                "pad_token_id": _pad_token_id(tokenizer),
                "fingerprint": fingerprint,
                "threads": placement.threads,
            },
            torch_config=TorchConfig(
                backend="nccl" if cfg.use_gpu else "gloo", timeout_s=math.ceil(cfg.collective_timeout)
            ),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=placement.resources
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.keep_checkpoints)),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        log.info(
            "training %s on %d %s worker(s) (%s each, %d torch thread(s)), run %s in %s",
            cfg.model,
            cfg.workers,
            "GPU" if cfg.use_gpu else "CPU",
            placement.resources,
            placement.threads,
            run_name,
            storage,
        )
        result = _fit_in_thread(trainer)
    finally:
        if placement.owns_ray:
            ray.shutdown()
        if placement.local_ray is not None:
            placement.local_ray.stop(grace=0)  # Ray Train's helper actors do not stop on SIGTERM; all is on disk
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
            "used": data.num_used,
            "skipped": data.num_skipped,
            "truncated": data.num_truncated,
            "train": _num_records(train),
            "eval": _num_records(evals),
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
