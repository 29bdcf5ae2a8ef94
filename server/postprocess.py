"""What one new token does to a sequence: append it, detokenize, and the stop checks (nano-vllm's
`Scheduler.postprocess`, vLLM's `update_from_output`), apart from the loop that steps the slices.

Stop checks run in the order a caller expects: a stop string, then EOS, then length (`max_new_tokens`, or the
context limit). The text of a finishing token includes what the detokenizer held back, unless a stop string
cut it.
"""

from __future__ import annotations

import logging

from qwen_relay.shards.sampler import NO_TOKEN

from .sequence import Delta, FinishReason, Sequence

log = logging.getLogger(__name__)


class NonFiniteLogits(RuntimeError):
    """The last slice found NaN or inf in this request's logits (its sampler answered `NO_TOKEN`)."""


def take_token(seq: Sequence, token: int, eos_ids: frozenset[int], max_context: int) -> Delta:
    """Append `token` to `seq` and return the delta its caller sees; `finish_reason` is set when it ends."""
    if token == NO_TOKEN:
        log.error("request %s: the model produced non-finite logits", seq.log_id)
        error = NonFiniteLogits("the model produced non-finite logits (NaN or inf) for this request")
        return Delta("", [], FinishReason.ERROR, error=error)
    seq.tokens.append(token)
    is_eos = token in eos_ids and not seq.params.ignore_eos
    text = "" if is_eos else seq.detokenizer.add(token)
    if seq.detokenizer.stopped:
        reason = FinishReason.STOP_SEQUENCE
    elif is_eos:
        reason = FinishReason.EOS
    elif seq.num_generated >= seq.params.max_new_tokens or len(seq.tokens) >= max_context:
        reason = FinishReason.LENGTH
    else:
        return Delta(text, [token])
    if reason is not FinishReason.STOP_SEQUENCE:
        text += seq.detokenizer.flush()
        if seq.detokenizer.stopped:  # the held tail completed a stop string
            reason = FinishReason.STOP_SEQUENCE
    return Delta(text, [token], reason)
