"""Reasoning apart from the answer: a streaming split of `<think>...</think>` out of the generated text.

Qwen3 and later write `<think>\\n...\\n</think>\\n\\n` before the answer, or their chat template opens the block
in the prompt and the model only closes it. The split follows Qwen's own templates (which strip these when
a reply goes back into the history): the reasoning is what lies between the tags without the newlines around
it, the answer is what follows `</think>` without its leading newlines. It works on text, not token ids, so
it holds for tokenizers where the tags are one token or several; text that could still become a tag is held
back until it is ruled out, so every piece is whole UTF-8 characters and nothing is emitted twice.
"""

from __future__ import annotations

import enum

from transformers import PreTrainedTokenizerBase

OPEN, CLOSE = "<think>", "</think>"
PROMPT_TAIL_TOKENS = 8  # how much of the prompt's end to decode to see whether the template opened a block


class _State(enum.Enum):
    START = "start"  # nothing decided: the text may still begin with <think>
    REASONING_START = "reasoning_start"  # inside the block, leading newlines still to drop
    REASONING = "reasoning"
    ANSWER_START = "answer_start"  # after </think>, leading newlines still to drop
    ANSWER = "answer"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


class ReasoningSplitter:
    """Feed text deltas in order with `add`; each call returns the (reasoning, answer) text now safe to emit."""

    def __init__(self, in_reasoning: bool = False) -> None:
        self.state = _State.REASONING_START if in_reasoning else _State.START
        self.held = ""

    def add(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning, answer = "", ""
        while True:
            if self.state is _State.START:
                head = self.held.lstrip()
                if head.startswith(OPEN):
                    self.held, self.state = head[len(OPEN):], _State.REASONING_START
                elif OPEN.startswith(head):
                    return reasoning, answer  # empty or a possible start of <think>: wait
                else:
                    self.state = _State.ANSWER
            elif self.state in (_State.REASONING_START, _State.ANSWER_START):
                self.held = self.held.lstrip("\n")
                if not self.held:
                    return reasoning, answer
                self.state = _State.REASONING if self.state is _State.REASONING_START else _State.ANSWER
            elif self.state is _State.REASONING:
                end = self.held.find(CLOSE)
                if end >= 0:
                    reasoning += self.held[:end].rstrip("\n")
                    self.held, self.state = self.held[end + len(CLOSE):], _State.ANSWER_START
                    continue
                # Hold a possible start of </think> and the newlines before it (they go if the tag follows).
                cut = len(self.held) - _partial_suffix(self.held, CLOSE)
                while cut > 0 and self.held[cut - 1] == "\n":
                    cut -= 1
                reasoning += self.held[:cut]
                self.held = self.held[cut:]
                return reasoning, answer
            else:
                answer += self.held
                self.held = ""
                return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """At the end of generation: whatever is held (an unclosed block's tail stays reasoning)."""
        held, self.held = self.held, ""
        if self.state in (_State.REASONING, _State.REASONING_START):
            return held, ""
        return "", held if self.state is not _State.ANSWER_START else ""


def opens_reasoning(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> bool:
    """True when the prompt ends inside an open `<think>` block (a template that starts the model thinking)."""
    tail = tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    return tail.rstrip().endswith(OPEN)
