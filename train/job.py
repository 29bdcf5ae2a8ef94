"""The distributed LoRA job's driver: ``run_training``, behind ``qwen-relay train``.

The driver validates and tokenizes the data once, so a bad file fails before any worker starts, checks a
``--resume`` against the run's checkpoints (:mod:`~qwen_relay.train.checkpoints`), places the workers
(:mod:`~qwen_relay.train.cluster`), then puts the encoded examples in the Ray object store and runs a Ray
Train ``TorchTrainer`` of :func:`~qwen_relay.train.worker.train_loop_per_worker` workers. ``--resume`` starts
a new job on the same Ray Train run, which restores its newest checkpoint. At the end it copies the adapter
out of the last checkpoint and writes the tokenizer and the training summary beside it.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

from qwen_relay.ray_common.local_ray import LocalRay
from qwen_relay.shards.hub import local_folder

from .checkpoints import ADAPTER_FILES, STATE_FILE, check_resume, pick_run_name
from .cluster import node_cpus, place_workers, starts_own_node, worker_share
from .config import TrainConfig
from .data import Example, PreparedData, prepare_dataset, split_train_eval
from .loop import TrainState, batch_fingerprint
from .summary import build_summary, num_records, write_summary
from .worker import train_loop_per_worker

__all__ = ["prepare_job_data", "run_training"]

log = logging.getLogger(__name__)


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
        "%s: %d record%s, %d usable (%d skipped, %d truncated): %d train, %d eval; %d sequences",
        cfg.data,
        data.num_records,
        "s" * (data.num_records != 1),
        data.num_used,
        data.num_skipped,
        data.num_truncated,
        num_records(train),
        num_records(evals),
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
    if starts_own_node(cfg):  # a request this machine can never hold: refused before the data is read
        worker_share(cfg.workers, node_cpus(), cfg.cpus_per_worker)
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cfg.output = str(output)
    # Local storage as an absolute path (Ray Train requires one); URIs (s3://, gs://, ...) as given.
    storage = cfg.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    run_name = pick_run_name(storage, cfg)

    data, train, evals = prepare_job_data(cfg, tokenizer)
    fingerprint = batch_fingerprint(train, evals, cfg.seed, cfg.batch_size)
    if cfg.resume and "://" not in storage:
        check_resume(Path(storage) / run_name, fingerprint)
    # Ray Train's own collectives (the barrier in every report) get the same bound as torch's.
    os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", f"{cfg.collective_timeout:g}")
    placement = place_workers(cfg)
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

    summary = build_summary(
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
