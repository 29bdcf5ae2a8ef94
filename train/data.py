"""Chat fine-tuning data: load, validate, render with the checkpoint's chat template, mask, collate.

The input is a list of ``{"messages": [{"role": ..., "content": ...}, ...]}`` records, either as one JSON
array or as JSON Lines. Every record is checked before any training starts, and every problem is
reported with where it is (``index 3`` in an array, ``line 4`` in JSON Lines), so a bad record is never
silently trained on: the caller either rejects the file (:class:`DataValidationError`) or skips the bad
records and keeps their count and reasons for the training summary.

Rendering uses the tokenizer's own chat template, so the model is trained on exactly the text it will see
when served. Labels are the token ids on assistant turns (content plus the template's end-of-turn tokens,
so the model learns to stop) and ``-100`` everywhere else: system and user turns, the template's role
headers and padding. Where the template renders a reply differently once the conversation goes on (Qwen3's
think blocks), a record becomes one sequence per reply, each reply labelled as it is rendered when served.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "DataValidationError",
    "Example",
    "PreparedData",
    "Problem",
    "collate",
    "encode_conversation",
    "load_records",
    "prepare_dataset",
    "render_prompt",
    "split_train_eval",
    "validate_record",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = frozenset({"system", "user", "assistant"})
TRUNCATION_POLICIES = ("truncate", "drop")
BAD_RECORD_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is in the file and what is wrong with it."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


class DataValidationError(ValueError):
    """The data file has bad records and the policy is to reject it; ``problems`` lists every one."""

    MAX_LISTED = 20

    def __init__(self, path: str | Path, problems: Sequence[Problem], total: int) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  {p}" for p in self.problems[: self.MAX_LISTED])
        more = len(self.problems) - self.MAX_LISTED
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(
            f"{path}: {len(self.problems)} of {total} records are bad (pass --bad-records skip to train on "
            f"the rest):\n{listed}"
        )


class _BadRecord(Exception):
    """Raised inside encoding; carries the reason, the caller adds the location."""


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: ``labels[i]`` is ``input_ids[i]`` on assistant tokens, else -100."""

    input_ids: list[int]
    labels: list[int]
    location: str

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class PreparedData:
    """The usable examples plus what was wrong with the rest (for the log and the training summary).

    A record gives one example, or one per reply where its chat template renders replies differently once
    the conversation goes on (Qwen3's think blocks): ``num_used`` counts records, ``examples`` sequences.
    """

    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)
    num_records: int = 0
    num_truncated: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.problems)

    @property
    def num_used(self) -> int:
        return len({e.location for e in self.examples})


def _parse_json(text: str) -> Any:
    """``json.loads`` with nesting too deep for the parser reported like any other JSON error."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def _jsonl_lines(text: str) -> list[str]:
    """JSON Lines lines: split on ``\\n`` only (and drop a ``\\r`` before it). ``str.splitlines`` would also
    split on U+2028, U+2029, U+0085 and other separators that JSON strings may hold unescaped."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def load_records(path: str | Path) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """Read a JSON array or JSON Lines file into ``(location, record)`` pairs.

    The format is chosen by content, not by file name: a file whose first non-blank character is ``[``
    is one JSON array (locations ``index N``, 0-based); anything else is JSON Lines (locations
    ``line N``, 1-based, blank lines ignored). A JSON Lines line that does not parse is a problem of that
    line; an array that does not parse is an error for the whole file. A UTF-8 byte order mark at the
    start (some Windows editors write one) is skipped.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if text.lstrip().startswith("["):
        try:
            data = _parse_json(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return [(f"index {i}", rec) for i, rec in enumerate(data)], []
    records: list[tuple[str, Any]] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(_jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", _parse_json(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(f"line {lineno}", f"not valid JSON (column {e.colno}: {e.msg})"))
        except ValueError as e:
            problems.append(Problem(f"line {lineno}", f"not valid JSON ({e})"))
    return records, problems


def validate_record(record: Any) -> str | None:
    """The reason a record cannot be trained on, or None when its shape is fine."""
    if not isinstance(record, dict):
        return f"record must be an object with 'messages', got {type(record).__name__}"
    messages = record.get("messages")
    if messages is None:
        return "no 'messages'"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} must be an object with 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r} (expected one of {sorted(ROLES)})"
        content = message.get("content")
        if not isinstance(content, str):
            return f"message {i} ({role}) has no string 'content'"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        return "no assistant turn (nothing to learn from)"
    return None


def _messages(record: dict) -> list[dict[str, str]]:
    """Only role and content: extra keys could change what some chat templates render."""
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a served model sees for ``messages``: everything before the last assistant turn, plus the
    generation prompt. Used to check that a trained model reproduces its training replies."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, add_generation_prompt=True)


@dataclass(frozen=True)
class _Sample:
    """One rendered text to train on and the character spans in it that carry labels."""

    text: str
    spans: list[tuple[int, int]]


def _samples(tokenizer: Any, messages: list[dict[str, str]]) -> list[_Sample]:
    """The texts to train on for a conversation, and in each the replies the model should learn to produce.

    Each assistant turn is learned as the model produces it when served: after the generation prompt (the
    conversation so far rendered with ``add_generation_prompt``), the text that rendering the conversation
    through that turn adds (the reply plus the template's end-of-turn marker). A turn can be learned inside a
    longer render only where that render starts with the turn's own render: ChatML renders every prefix as a
    prefix, so one render carries every reply; Qwen3's template gives the latest reply an empty
    ``<think>`` block and drops earlier replies' reasoning, so there each reply is learned in a render that
    ends with it (the earlier replies in it are history, as the template renders history, unlabelled).
    Samples are taken from the latest turn back, each labelling every turn not yet covered that it renders
    as served, starting with the whole conversation (so a ChatML record is its whole render, as it always
    was); working from renders keeps this independent of any one template's syntax.
    """
    turns: list[tuple[int, str, str]] = []  # (message index, generation prompt, render through the reply)
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise _BadRecord("starts with an assistant message: there is no prompt to answer")
            head = _render(tokenizer, messages[:i], add_generation_prompt=True)
            through = _render(tokenizer, messages[: i + 1])
            if not through.startswith(head):
                raise _BadRecord(f"the chat template renders assistant message {i} other than after its "
                                 "generation prompt")
            turns.append((i, head, through))
        samples: list[_Sample] = []
        end = len(messages)  # the whole conversation first, then up to the latest reply it did not cover
        while turns:
            text = _render(tokenizer, messages[:end])
            spans = [(len(head), len(through)) for _, head, through in turns if text.startswith(through)]
            if spans:
                samples.append(_Sample(text, spans))
            turns = [t for t in turns if not text.startswith(t[2])]
            end = turns[-1][0] + 1 if turns else end
    except _BadRecord:
        raise
    except Exception as e:  # a template may raise anything (jinja errors, its own raise_exception)
        raise _BadRecord(f"the chat template cannot render it: {e}") from None
    samples.reverse()
    return samples


def _encode(tokenizer: Any, sample: _Sample) -> tuple[list[int], list[int]]:
    enc = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (start, _end) in enumerate(enc["offset_mapping"]):
        # A token belongs to a span when it starts inside it; a token that straddles the span's start
        # carries prompt text too and stays unlabelled.
        if any(a <= start < b for a, b in sample.spans):
            labels[i] = input_ids[i]
    return input_ids, labels


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, truncation: str = "truncate"
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Token ids and labels (-100 outside assistant spans) of each sequence, and whether any was truncated.

    One sequence when the template renders the conversation's prefixes as prefixes (ChatML), else several
    (see :func:`_samples`). ``truncation="truncate"`` keeps each sequence's first ``max_length`` tokens and
    leaves out a sequence with no assistant token left; ``"drop"`` refuses a conversation with any sequence
    longer (raises ``_BadRecord``). Either way a conversation with no assistant token left inside
    ``max_length`` is refused: training on it would only teach the prompt, never a reply.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, not {truncation!r}")
    encoded = [_encode(tokenizer, sample) for sample in _samples(tokenizer, messages)]
    longest = max(len(ids) for ids, _ in encoded)
    truncated = longest > max_length
    if truncated and truncation == "drop":
        raise _BadRecord(f"too long: {longest} tokens > --max-length {max_length}")
    # The first token cannot be predicted (labels are shifted by one inside the loss).
    kept = [(ids[:max_length], labels[:max_length]) for ids, labels in encoded
            if any(x != IGNORE_INDEX for x in labels[1:max_length])]
    if not kept:
        if truncated:
            raise _BadRecord(
                f"too long: the first assistant token is past --max-length {max_length} ({longest} tokens in all)"
            )
        first = next((i for i, x in enumerate(encoded[0][1]) if x != IGNORE_INDEX), None)
        raise _BadRecord(f"no assistant tokens to learn (first labelled token: {first})")
    return kept, truncated


def prepare_dataset(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    *,
    truncation: str = "truncate",
    bad_records: str = "error",
) -> PreparedData:
    """Load, validate and encode a chat data file; reject it or skip bad records per ``bad_records``.

    All records are checked before anything is decided, so the error (or the skip warning) lists every
    bad record at once, each with its index or line.
    """
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, not {bad_records!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; train from a chat (instruct) checkpoint")
    records, problems = load_records(path)
    total = len(records) + len(problems)
    examples: list[Example] = []
    num_truncated = 0
    for location, record in records:
        reason = validate_record(record)
        if reason is None:
            try:
                encoded, truncated = encode_conversation(tokenizer, _messages(record), max_length, truncation)
            except _BadRecord as e:
                reason = str(e)
            else:
                examples.extend(Example(ids, labels, location) for ids, labels in encoded)
                num_truncated += truncated
        if reason is not None:
            problems.append(Problem(location, reason))
    problems.sort(key=lambda p: int(p.location.split()[-1]))
    if problems and bad_records == "error":
        raise DataValidationError(path, problems, total)
    if problems:
        log.warning(
            "%s: skipping %d of %d bad records:\n%s",
            path,
            len(problems),
            total,
            "\n".join(f"  {p}" for p in problems[: DataValidationError.MAX_LISTED]),
        )
    if not examples:
        raise ValueError(f"{path}: no usable records ({total} read)")
    if num_truncated:
        log.warning("%s: %d conversations truncated to %d tokens", path, num_truncated, max_length)
    return PreparedData(examples, problems, total, num_truncated)


def split_train_eval(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random split of the records; with a fraction > 0 and at least two records, eval gets at least one.

    A record's examples (one per reply under some templates) stay together, so eval never scores a reply
    whose conversation was trained on. Eval never takes the last training record: ``int(n * fraction) < n``
    for a fraction below 1, so a single record is all training (the caller logs that there is no eval set).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    records = list(dict.fromkeys(e.location for e in examples))
    n_eval = int(len(records) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(records) >= 2:
        n_eval = 1
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = {records[i] for i in order[:n_eval]}
    train = [e for e in examples if e.location not in held_out]
    evals = [e for e in examples if e.location in held_out]
    return train, evals


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label -100."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
