"""A request's whole life in the gateway: prompt, generated tokens, KV blocks and stream of deltas.

The gateway owns the truth (docs/design.md, "Who owns what"): a slice only caches keys and values, so
everything needed to rebuild a lost cache (`tokens`) and to finish the request (stop checks, text) lives here.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from qwen_relay.shards.batch import SamplingParams

from .detokenizer import Detokenizer


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class GenerationParams:
    """Validated request parameters (server/validation.py builds these at the edge)."""

    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    adapter: str = ""
    adapter_fingerprint: str = ""  # of the adapter's files: part of every cached block's key (block_manager.py)


@dataclass
class Delta:
    """What one step adds to a request's output; the last one carries the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    detokenizer: Detokenizer
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # leading tokens whose keys/values the slices hold
    block_table: list[int] = field(default_factory=list)  # KV blocks holding positions 0, 1, ... in order
    block_keys: list[int] = field(default_factory=list)  # prefix-index keys of its full blocks (block_manager.py)
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
    slot: int | None = None  # sequence slot: recurrent state of linear-attention layers, a static decode row
    in_flight: bool = False  # in a step the slices are running; its next step waits for that one's token
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    lost_steps: int = 0  # steps this sequence was in that lost a slice (bounds its replays: server/engine.py)
    outbox: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def log_id(self) -> str:
        """The request id as log lines show it: control characters (a newline forging a log line) escaped."""
        rid = self.request_id
        return rid if rid.isprintable() else rid.encode("unicode_escape").decode("ascii")

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    def pending(self) -> list[int]:
        """Tokens the slices have not seen yet: the prompt (prefill), the last token (decode), or all (replay)."""
        return self.tokens[self.num_cached:]
