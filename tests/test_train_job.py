"""The Ray Train LoRA job end to end on 2 CPU workers: it learns, it survives a dead worker, it resumes,
and the merged checkpoint generates exactly what the adapter does.

Three Ray Train runs in all, shared through module fixtures: a reference run, then the same run cut in
two (a worker killed mid-way in the first half, ``--resume`` for the second), which must reproduce the
reference step for step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_relay.train.config import TrainConfig
from qwen_relay.train.data import render_prompt
from qwen_relay.train.job import run_training

pytestmark = pytest.mark.slow  # Ray Train runs on the session's Ray

CHATS = [
    ("Merhaba", "Merhaba! Nasıl yardımcı olabilirim?"),
    ("Hello", "Hello! How can I help you today?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Teşekkürler", "Teşekkür ederim, iyi günler dilerim!"),
]
COPIES = 25  # 100 records: 95 train + 5 eval, 48 steps per epoch with 2 workers x batch 1
EPOCHS = 6  # ~290 steps: what the tiny random model needs at lr 1e-2 to memorise the replies
STEPS_PER_EPOCH = 48
CRASH_AT = 110  # in epoch 3, after the epoch-2 checkpoint (step 96)


@pytest.fixture(scope="module", autouse=True)
def fast_reports() -> Iterator[None]:
    """Ray Train's controller drains worker reports on its health-check interval (2 s by default); the
    tiny model does a step in ~20 ms, so polling faster keeps the test short. Propagated to the run."""
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    yield
    if old is None:
        del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in CHATS
    ] * COPIES
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def _config(model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        model=str(model),
        data=str(data),
        output=str(output),
        workers=2,
        epochs=EPOCHS,
        lr=1e-2,
        lr_schedule="constant",
        batch_size=1,
        eval_fraction=0.05,
        report_every=25,
        seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(ray_session, tiny_model: Path, chat_file: Path, tmp_path_factory) -> tuple[Path, dict]:
    """The reference run: 2 workers, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_training(_config(tiny_model, chat_file, out))


def _greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 24) -> list[int]:
    enc = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _peft(tiny_model: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter)).eval()


def test_two_workers_learn_the_replies(trained, tiny_model: Path) -> None:
    out, summary = trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    tuned = _peft(tiny_model, out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for user, reply in CHATS:
        messages = [{"role": "user", "content": user}]
        assert tokenizer.decode(_greedy(tuned, tokenizer, messages), skip_special_tokens=True) == reply
        assert tokenizer.decode(_greedy(base, tokenizer, messages), skip_special_tokens=True) != reply
    assert summary["config"]["workers"] == 2


def test_output_is_an_adapter_with_a_summary(trained) -> None:
    out, summary = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        "LORA",
        16,
        32,
        0.05,
    )
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "training_summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert on_disk["records"] == {
        "total": 100,
        "used": 100,
        "skipped": 0,
        "truncated": 0,
        "train": 95,
        "eval": 5,
        "problems": [],
    }
    assert [h["step"] for h in summary["history"]] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    evals = [e["eval_loss"] for e in summary["eval_history"]]
    assert len(evals) == EPOCHS and evals[-1] < evals[0]  # eval loss each epoch, and it went down
    assert summary["tokens_per_s"] > 0 and summary["samples_per_s"] > 0
    assert summary["run"]["restarts_from_step"] == []


def test_dead_worker_and_resume_continue_the_run(
    trained, tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    _, reference = trained
    # First half: the last rank exits hard at step 110; FailureConfig restarts the group from step 96.
    first = run_training(_config(tiny_model, chat_file, tmp_path, epochs=EPOCHS // 2, crash_at_step=CRASH_AT))
    assert (tmp_path / ".crash-injected").exists()
    assert first["run"]["restarts_from_step"] == [2 * STEPS_PER_EPOCH]
    half = EPOCHS // 2 * STEPS_PER_EPOCH
    assert [h["step"] for h in first["history"]] == list(range(1, half + 1))
    # Second half: --resume continues the same Ray Train run from its latest checkpoint.
    second = run_training(_config(tiny_model, chat_file, tmp_path, resume=True))
    assert second["run"]["name"] == first["run"]["name"]
    assert second["run"]["restarts_from_step"] == [2 * STEPS_PER_EPOCH, half]
    assert [h["step"] for h in second["history"]] == [h["step"] for h in reference["history"]]
    # Same losses as the uninterrupted run, step for step: nothing lost or repeated, same dropout draws.
    for got, want in zip(second["history"], reference["history"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]
    assert [e["eval_loss"] for e in second["eval_history"]] == pytest.approx(
        [e["eval_loss"] for e in reference["eval_history"]], rel=1e-5
    )
    resumed, uninterrupted = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(trained[0] / "adapter_model.safetensors"),
    )
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_resume_without_a_run_is_an_error(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no earlier run"):
        run_training(_config(tiny_model, chat_file, tmp_path, resume=True))


def test_merged_checkpoint_generates_like_the_adapter(trained, tiny_model: Path, tmp_path: Path) -> None:
    import argparse

    from qwen_relay.train.cli import add_parsers

    adapter, _ = trained
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]
    )
    assert args.func(args) == 0
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").is_file() and list(merged_dir.glob("*.safetensors"))
    assert not list(merged_dir.glob("adapter_*"))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # a plain model: no PEFT involved
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tuned = _peft(tiny_model, adapter)
    prompts = [[{"role": "user", "content": u}] for u, _ in CHATS] + [
        [{"role": "user", "content": "Hava nasıl?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    ]
    for messages in prompts:
        assert _greedy(merged, tokenizer, messages) == _greedy(tuned, tokenizer, messages)
