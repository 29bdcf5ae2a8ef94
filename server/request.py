"""What a client asks for, whichever API it came by: the record validation checks, not a wire type.

gRPC's `GenerateRequest` / `TokenizeRequest` and an OpenAI JSON body each become one of these at their edge
(servicer.py, http_convert.py), so one validation path sees one shape and names fields one way (gRPC's names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TemplateValue = bool | float | int | str | None | list | dict  # a JSON value, as both APIs can carry one


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One input of `prompt`, `messages` or `prompt_token_ids` (validation refuses none or several), and how to
    generate from it. Unset values are the API's zero values: `max_new_tokens` 0 is the server's default."""

    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    request_id: str = ""
    max_new_tokens: int = 0
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # None: 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # None: each request draws its own
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    adapter: str = ""  # "": the base model
    chat_template_kwargs: Mapping[str, TemplateValue] = field(default_factory=dict)
    separate_reasoning: bool = False
