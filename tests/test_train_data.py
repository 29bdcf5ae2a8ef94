"""Training data and loop pieces, without Ray: validation, rendering, loss masking, sharding, the CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_relay.checkpoints.synthetic import QWEN3_CHAT_TEMPLATE, build_tokenizer
from qwen_relay.train.checkpoints import FingerprintMismatch, check_fingerprint, check_resume
from qwen_relay.train.cli import add_parsers, config_from_args
from qwen_relay.train.cluster import (
    WorkerResourcesError,
    WorkerShare,
    shortfall,
    worker_share,
)
from qwen_relay.train.config import TrainConfig
from qwen_relay.train.data import (
    IGNORE_INDEX,
    DataValidationError,
    Example,
    collate,
    encode_conversation,
    prepare_dataset,
    render_prompt,
    split_train_eval,
)
from qwen_relay.train.job import run_training
from qwen_relay.train.loop import (
    batch_fingerprint,
    epoch_batches,
    loss_sums,
    make_scheduler,
    train_single_process,
)
from qwen_relay.train.lora import LoraSettings, build_lora_model
from qwen_relay.train.summary import write_summary

GOOD = {
    "messages": [
        {"role": "user", "content": "Merhaba"},
        {"role": "assistant", "content": "Merhaba! Nasıl yardımcı olabilirim?"},
    ]
}

# (record, words the error for it must contain): one of every kind of bad record.
BAD = [
    ({"text": "no messages here"}, "no 'messages'"),
    ({"messages": []}, "non-empty list"),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
        "unknown role 'bot'",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"}]},
        "no assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        "empty content",
    ),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, "no string 'content'"),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Late"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
        "system message may only come first",
    ),
    ({"messages": [{"role": "assistant", "content": "Hello"}]}, "starts with an assistant message"),
    (["not", "an", "object"], "must be an object"),
    # The user turn alone is longer than --max-length, so no assistant token survives truncation.
    (
        {"messages": [{"role": "user", "content": "water " * 200}, {"role": "assistant", "content": "Yes."}]},
        "too long",
    ),
]
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def _labelled_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_only_assistant_tokens_carry_labels(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Merhaba"},
        {"role": "assistant", "content": "Merhaba! Nasıl yardımcı olabilirim?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    # ChatML renders every prefix as a prefix: one sequence carries both replies.
    [(ids, labels)], truncated = encode_conversation(tokenizer, messages, MAX_LENGTH)
    assert not truncated and len(ids) == len(labels)
    # The ids are exactly the template's rendering of the whole conversation.
    assert (
        ids
        == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    # Labels are the ids where set: replies plus their end-of-turn marker, nothing from system or user turns.
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    assert _labelled_text(tokenizer, ids, labels) == (
        "Merhaba! Nasıl yardımcı olabilirim?<|im_end|>\nParis.<|im_end|>\n"
    )
    # Everything before the first reply (system, user, the assistant header) is masked.
    prompt = tokenizer(render_prompt(tokenizer, messages[:3]), add_special_tokens=False)["input_ids"]
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ids[: len(prompt)] == prompt


def test_a_chatml_record_is_one_sequence_of_its_whole_render(tokenizer) -> None:
    """Every prefix renders as a prefix: one sequence, the whole conversation (a last user turn included, as
    before per-reply sequences existed, so fingerprints of existing runs still match)."""
    messages = [*GOOD["messages"], {"role": "user", "content": "Thank you!"}]
    [(ids, labels)], _ = encode_conversation(tokenizer, messages, MAX_LENGTH)
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
        "input_ids"]
    assert _labelled_text(tokenizer, ids, labels) == "Merhaba! Nasıl yardımcı olabilirim?<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """The synthetic tokenizer with Qwen3's real chat template (empty think block on the latest reply)."""
    return build_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)


QWEN3_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Merhaba"},
    {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nMerhaba! Nasıl yardımcı olabilirim?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_qwen3_multi_turn_learns_each_reply_as_it_is_served(qwen3_tokenizer) -> None:
    """Qwen3's template gives only the latest reply a think block and drops earlier replies' reasoning, so the
    whole conversation's render does not extend its prefixes' renders: each reply is learned in a sequence that
    ends with it, after exactly the prompt the server renders for it, think block included."""
    encoded, truncated = encode_conversation(qwen3_tokenizer, QWEN3_CHAT, MAX_LENGTH)
    assert len(encoded) == 2 and not truncated
    replies = ["<think>\nA greeting.\n</think>\n\nMerhaba! Nasıl yardımcı olabilirim?<|im_end|>\n",
               "<think>\n\n</think>\n\nParis.<|im_end|>\n"]
    for (ids, labels), end, reply in zip(encoded, (3, 5), replies, strict=True):
        through = qwen3_tokenizer.apply_chat_template(QWEN3_CHAT[:end], tokenize=False)
        assert ids == qwen3_tokenizer(through, add_special_tokens=False)["input_ids"]
        assert _labelled_text(qwen3_tokenizer, ids, labels) == reply
        prompt = qwen3_tokenizer(render_prompt(qwen3_tokenizer, QWEN3_CHAT[:end]), add_special_tokens=False)
        n = len(prompt["input_ids"])
        assert ids[:n] == prompt["input_ids"] and labels[:n] == [IGNORE_INDEX] * n
    # The second sequence holds the first reply as history (reasoning dropped), unlabelled.
    assert "A greeting" not in qwen3_tokenizer.decode(encoded[1][0])


def test_qwen3_multi_turn_file_is_accepted(qwen3_tokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "chat.jsonl", [GOOD, {"messages": QWEN3_CHAT}], jsonl=True)
    data = prepare_dataset(path, qwen3_tokenizer, MAX_LENGTH, bad_records="error")
    assert (data.num_records, data.num_used, data.num_skipped) == (2, 2, 0)
    assert [e.location for e in data.examples] == ["line 1", "line 2", "line 2"]
    # A record's sequences stay on one side of the split.
    for seed in range(5):
        train, evals = split_train_eval(data.examples, 0.5, seed)
        assert len({e.location for e in evals}) == 1 and {e.location for e in train}.isdisjoint(
            e.location for e in evals)


def test_qwen3_truncation_keeps_the_replies_that_fit(qwen3_tokenizer) -> None:
    """The second reply's prompt alone is past --max-length: the first reply still trains, the record counts as
    truncated."""
    messages = [*QWEN3_CHAT[:3], {"role": "user", "content": "water " * 200}, QWEN3_CHAT[4]]
    [(ids, labels)], truncated = encode_conversation(qwen3_tokenizer, messages, MAX_LENGTH)
    assert truncated and _labelled_text(qwen3_tokenizer, ids, labels).endswith("olabilirim?<|im_end|>\n")
    with pytest.raises(Exception, match="too long"):
        encode_conversation(qwen3_tokenizer, messages, MAX_LENGTH, truncation="drop")


def test_padding_is_masked(tokenizer) -> None:
    short = Example(*encode_conversation(tokenizer, GOOD["messages"], MAX_LENGTH)[0][0], "index 0")
    long_messages = [
        {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 3},
    ]
    long = Example(*encode_conversation(tokenizer, long_messages, MAX_LENGTH)[0][0], "index 1")
    batch = collate([short, long], pad_token_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"][0, :n].tolist() == short.labels
    assert batch["labels"][1].tolist() == long.labels


def test_truncation_keeps_the_start_and_its_labels(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 20},
    ]
    [(full_ids, full_labels)], _ = encode_conversation(tokenizer, messages, 10_000)
    [(ids, labels)], truncated = encode_conversation(tokenizer, messages, 40)
    assert truncated and ids == full_ids[:40] and labels == full_labels[:40]
    with pytest.raises(Exception, match="too long"):
        encode_conversation(tokenizer, messages, 40, truncation="drop")


def _write(path: Path, records: list, jsonl: bool) -> Path:
    if jsonl:
        path.write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
        )
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("jsonl", [False, True], ids=["json-array", "jsonl"])
def test_every_bad_record_is_reported_with_its_place(tokenizer, tmp_path: Path, jsonl: bool) -> None:
    records = [GOOD] + [r for r, _ in BAD] + [GOOD]
    path = _write(tmp_path / ("data.jsonl" if jsonl else "data.json"), records, jsonl)
    with pytest.raises(DataValidationError) as info:
        prepare_dataset(path, tokenizer, MAX_LENGTH)
    problems = info.value.problems
    assert len(problems) == len(BAD)
    for i, ((_, reason), problem) in enumerate(zip(BAD, problems, strict=True), start=1):
        # Array entries are 0-based indices; JSON Lines are 1-based line numbers.
        assert problem.location == (f"line {i + 1}" if jsonl else f"index {i}")
        assert reason in problem.reason
        assert f"{problem.location}: " in str(info.value)

    skipped = prepare_dataset(path, tokenizer, MAX_LENGTH, bad_records="skip")
    assert skipped.num_records == len(records) and skipped.num_skipped == len(BAD)
    assert [e.location for e in skipped.examples] == (
        ["line 1", f"line {len(records)}"] if jsonl else ["index 0", f"index {len(records) - 1}"]
    )


def test_unparsable_input(tokenizer, tmp_path: Path) -> None:
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(GOOD) + "\n{not json\n\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"line 2: not valid JSON"):
        prepare_dataset(lines, tokenizer, MAX_LENGTH)
    assert len(prepare_dataset(lines, tokenizer, MAX_LENGTH, bad_records="skip").examples) == 2
    array = tmp_path / "data.json"
    array.write_text('[{"messages": []},\n oops]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"not valid JSON \(line 2"):
        prepare_dataset(array, tokenizer, MAX_LENGTH)


def test_bad_data_fails_before_any_worker_starts(tiny_model: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "data.json", [GOOD, BAD[2][0]], jsonl=False)
    cfg = TrainConfig(model=str(tiny_model), data=str(path), output=str(tmp_path / "out"))
    with pytest.raises(DataValidationError, match=r"index 1: message 1 has unknown role 'bot'"):
        run_training(cfg)  # raises while validating, before it would need Ray
    assert not (tmp_path / "out" / "ray").exists()


def test_split_is_seeded_and_disjoint() -> None:
    examples = [Example([i, i], [i, i], f"index {i}") for i in range(20)]
    train, evals = split_train_eval(examples, 0.2, seed=3)
    assert len(evals) == 4 and len(train) == 16
    assert {e.location for e in train}.isdisjoint(e.location for e in evals)
    assert split_train_eval(examples, 0.2, seed=3) == (train, evals)
    assert split_train_eval(examples, 0.0, seed=3) == (examples, [])
    assert len(split_train_eval(examples[:3], 0.1, seed=0)[1]) == 1  # a fraction > 0 keeps one for eval


@pytest.mark.parametrize("n,world,batch", [(10, 2, 3), (7, 2, 2), (5, 3, 1), (4, 1, 4)])
def test_each_worker_gets_its_own_shard(n: int, world: int, batch: int) -> None:
    for epoch in range(2):
        shards = [[i for b in epoch_batches(n, batch, 0, epoch, r, world) for i in b] for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # same number of samples, so the same number of steps
        assert len({len(epoch_batches(n, batch, 0, epoch, r, world)) for r in range(world)}) == 1
        seen = [i for s in shards for i in s]
        assert set(seen) == set(range(n))  # everything is trained on
        assert len(seen) - n < world  # only the few repeats that even out the shards
        if n % world == 0:
            assert all(set(a).isdisjoint(b) for a in shards for b in shards if a is not b)
    assert epoch_batches(n, batch, 0, 0, 0, world) == epoch_batches(n, batch, 0, 0, 0, world)
    if n > 4:
        assert epoch_batches(n, batch, 0, 0, 0, world) != epoch_batches(n, batch, 0, 1, 0, world)


def test_loss_is_transformers_loss_on_the_labels(tiny_model: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [
        Example(*encode_conversation(tokenizer, m, MAX_LENGTH)[0][0], "x")
        for m in (
            GOOD["messages"],
            [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
        )
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n = loss_sums(model, batch)
        reference = model(**batch).loss
    assert n == sum(e.num_label_tokens for e in examples)  # shifted: each labelled token is predicted once
    torch.testing.assert_close(loss_sum / n, reference)


def test_single_process_loop_learns(tiny_model: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = build_lora_model(tiny_model, LoraSettings())
    examples = [Example(*encode_conversation(tokenizer, GOOD["messages"], MAX_LENGTH)[0][0], "index 0")] * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine make tiny steps ~4x slower
    try:
        state = train_single_process(
            model, examples, epochs=30, batch_size=2, lr=1e-2, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        torch.set_num_threads(threads)
    assert state.step == 30 and [h["step"] for h in state.history] == list(range(1, 31))
    assert state.history[-1]["loss"] < state.history[0]["loss"] - 0.3


def test_lr_schedules() -> None:
    param = torch.nn.Parameter(torch.zeros(1))

    def lrs(schedule: str) -> list[float]:
        opt = torch.optim.SGD([param], lr=1.0)
        sched = make_scheduler(opt, schedule, warmup_steps=2, total_steps=6)
        out = []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert lrs("linear") == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cosine = lrs("cosine")
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[3] > cosine[4] > cosine[5] > 0


def test_cli_flags_map_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--model", "m", "--data", "d.jsonl", "--output", "o"])
    cfg = config_from_args(args)
    assert (cfg.workers, cfg.use_gpu, cfg.resume) == (2, False, False)
    assert cfg.lora == LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))
    args = parser.parse_args(
        [
            "train",
            "--model",
            "m",
            "--data",
            "d.jsonl",
            "--output",
            "o",
            "--workers",
            "4",
            "--use-gpu",
            "--epochs",
            "5",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--max-length",
            "512",
            "--eval-fraction",
            "0.2",
            "--resume",
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-dropout",
            "0.1",
            "--target-modules",
            "q_proj,k_proj,v_proj,o_proj",
            "--ray-address",
            "auto",
            "--bad-records",
            "skip",
        ]
    )
    cfg = config_from_args(args)
    assert (
        cfg.workers,
        cfg.use_gpu,
        cfg.epochs,
        cfg.lr,
        cfg.batch_size,
        cfg.max_length,
        cfg.eval_fraction,
        cfg.resume,
        cfg.ray_address,
        cfg.bad_records,
    ) == (4, True, 5, 1e-3, 8, 512, 0.2, True, "auto", "skip")
    assert cfg.lora == LoraSettings(8, 16, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert args.func.__name__ == "run_train"
    merge = parser.parse_args(["merge", "--model", "m", "--adapter", "a", "--output", "o"])
    assert merge.func.__name__ == "run_merge" and merge.dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--workers", "0"])


def test_summary_files(tmp_path: Path) -> None:
    history = [{"step": i, "epoch": i / 10, "loss": 7.0 - i / 10} for i in range(1, 21)]
    evals = [{"epoch": 1, "step": 10, "eval_loss": 6.5}, {"epoch": 2, "step": 20, "eval_loss": 6.1}]
    json_path, png_path = write_summary(tmp_path, {"model": "m", "history": history, "eval_history": evals})
    assert json.loads(json_path.read_text())["eval_history"] == evals
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- JSON Lines edge cases, sizes and settings (issue 9, 10) ----------------------------------------------


def test_jsonl_keeps_unicode_line_separators_inside_records(tokenizer, tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw; str.splitlines() splits on them.
    reply = "Satır\u2028ayırıcı\u2029paragraf\u0085son"
    record = {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": reply}]}
    path = _write(tmp_path / "data.jsonl", [record, GOOD], jsonl=True)
    assert "\u2028" in path.read_text(encoding="utf-8")
    data = prepare_dataset(path, tokenizer, MAX_LENGTH)
    assert [e.location for e in data.examples] == ["line 1", "line 2"]
    first = data.examples[0]
    assert reply in _labelled_text(tokenizer, first.input_ids, first.labels)


def test_jsonl_with_bom_and_crlf(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n").encode() * 2)
    assert [e.location for e in prepare_dataset(path, tokenizer, MAX_LENGTH).examples] == ["line 1", "line 2"]
    array = tmp_path / "data.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert len(prepare_dataset(array, tokenizer, MAX_LENGTH).examples) == 1


def test_deeply_nested_json_is_a_problem_of_its_line(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"line 2: not valid JSON \(nested too deeply"):
        prepare_dataset(path, tokenizer, MAX_LENGTH)
    array = tmp_path / "data.json"
    array.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(ValueError, match="nested too deeply"):
        prepare_dataset(array, tokenizer, MAX_LENGTH)


def test_not_utf8_is_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte \d+"):
        prepare_dataset(path, tokenizer, MAX_LENGTH)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_split_always_leaves_training_records(n: int, fraction: float) -> None:
    examples = [Example([i, i], [i, i], f"index {i}") for i in range(n)]
    train, evals = split_train_eval(examples, fraction, seed=0)
    assert len(train) >= 1 and len(train) + len(evals) == n
    assert len(evals) == (0 if fraction == 0 or n == 1 else max(1, int(n * fraction)))


@pytest.mark.parametrize("n,world", [(1, 2), (2, 3), (1, 4), (3, 2)])
def test_small_data_gives_every_rank_the_same_steps(n: int, world: int) -> None:
    """Fewer records than workers: shards are padded by repetition, so every rank runs every step."""
    for batch in (1, 4):
        shards = [epoch_batches(n, batch, 0, 0, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and all(shards)
        assert {i for s in shards for b in s for i in b} == set(range(n))


def test_train_config_refuses_bad_sizes_at_once(tmp_path: Path) -> None:
    base = dict(model="m", data="d", output=str(tmp_path))
    for field, value, words in [
        ("eval_fraction", 1.0, "eval-fraction must be in [0, 1)"),
        ("eval_fraction", -0.1, "eval-fraction must be in [0, 1)"),
        ("cpus_per_worker", 0.0, "cpus-per-worker must be positive"),
        ("placement_timeout", 0.0, "placement-timeout must be positive"),
        ("collective_timeout", -1.0, "collective-timeout must be positive"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            TrainConfig(**base, **{field: value})


def test_worker_share_fits_any_worker_count() -> None:
    # Unset --cpus-per-worker: an equal share that never adds up to more than the node.
    for cpus in (1, 2, 3, 16):
        for workers in (1, 2, 3, 7, 40):
            share = worker_share(workers, cpus, None)
            assert 0 < share.cpus * workers <= cpus and share.threads >= 1
            assert not shortfall({"CPU": share.cpus}, workers, {"CPU": float(cpus)})
    assert worker_share(3, 2, None) == WorkerShare(0.6666, 1)
    assert worker_share(2, 16, None) == WorkerShare(8.0, 8)
    assert worker_share(2, 4, 1.5) == WorkerShare(1.5, 1)
    # An explicit request that cannot fit is refused at once, with the numbers and the flags.
    with pytest.raises(WorkerResourcesError) as info:
        worker_share(3, 2, 1.0)
    for words in ("--workers 3", "--cpus-per-worker 1", "needs 3 CPUs", "this node has 2"):
        assert words in str(info.value)


def test_shortfall_names_each_missing_resource() -> None:
    assert shortfall({"CPU": 1.0, "GPU": 1.0}, 2, {"CPU": 4.0}) == {"GPU": (2.0, 0.0)}
    assert shortfall({"CPU": 0.5}, 4, {"CPU": 2.0}) == {}


def test_fingerprint_follows_what_shapes_batches() -> None:
    examples = [Example([i, i + 1], [-100, i + 1], f"line {i}") for i in range(5)]
    base = batch_fingerprint(examples[:4], examples[4:], seed=0, batch_size=2)
    assert base == batch_fingerprint(list(examples[:4]), examples[4:], seed=0, batch_size=2)
    changed = [
        batch_fingerprint(examples[:3], examples[3:], 0, 2),  # another split
        batch_fingerprint([Example([9, 9], [-100, 9], "line 0")] + examples[1:4], examples[4:], 0, 2),
        batch_fingerprint(examples[:4], examples[4:], 1, 2),
        batch_fingerprint(examples[:4], examples[4:], 0, 4),
    ]
    assert len({base, *changed}) == 5


def test_resume_on_changed_data_is_refused_before_any_worker(tmp_path: Path) -> None:
    run = tmp_path / "lora-x"
    for step, text in ((5, json.dumps({"step": 5, "fingerprint": "a" * 64})), (9, "{cut short")):
        (run / f"checkpoint-{step:06d}").mkdir(parents=True)
        (run / f"checkpoint-{step:06d}" / "train_state.json").write_text(text)
    check_resume(run, "a" * 64)  # the newest readable checkpoint matches
    with pytest.raises(FingerprintMismatch) as info:
        check_resume(run, "b" * 64)
    for words in ("--resume: run lora-x", "other data or batch settings", "--seed or --batch-size", "new --run-name"):
        assert words in str(info.value)
    check_fingerprint("", "b" * 64, "old checkpoint")  # written before fingerprints: warned, not refused


def test_a_model_that_cannot_load_fails_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    """`train --model` with a mistyped path, or a hub id with no hub: one line, exit 2, no output folder made."""
    from qwen_relay.server.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out"
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint folder at \./qwen \(a hub id is NAME"):
        run_training(TrainConfig(model="./qwen", data=str(data), output=str(out)))

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", offline)
    with pytest.raises(RuntimeError, match="cannot load the tokenizer of Qwen/Qwen2.5-0.5B: We couldn't connect"):
        run_training(TrainConfig(model="Qwen/Qwen2.5-0.5B", data=str(data), output=str(out)))
    assert main(["train", "--model", "Qwen/Qwen2.5-0.5B", "--data", str(data), "--output", str(out)]) == 2
    assert not out.exists()
