"""The contract, in-process and fast: greedy output of slice runners is token-for-token `generate()` on the
whole model (fp32) for every family, every split (1 to 4 slices), batched and not, and through a replay
(caches lost mid-generation, rebuilt by re-prefilling prompt + generated into other blocks, as the engine does
after a fault). Blocks of 4 positions, so every row spans several blocks and crosses block boundaries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kv_blocks import blocks_needed, step_batch
from transformers import AutoModelForCausalLM

from qwen_relay.server.layout import balanced_split, model_costs, parse_layers
from qwen_relay.shards.batch import SamplingParams, StepBatch
from qwen_relay.shards.runner import SliceRunner, SliceSpec

MAX_NEW = 12
PROMPTS = [[5, 17, 300, 42, 7, 999, 3], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410], [77]]
MAX_LEN = 64
BLOCK_SIZE = 4
REPLAY_BASE = blocks_needed(MAX_LEN, BLOCK_SIZE)  # a replay's tables: blocks the first run never used


def _runners(model: Path, ranges: list[tuple[int, int]]) -> list[SliceRunner]:
    runners = [SliceRunner(SliceSpec(model=str(model), first=a, end=b, device="cpu", max_slots=4, max_len=MAX_LEN,
                                     num_blocks=2 * REPLAY_BASE, block_size=BLOCK_SIZE))
               for a, b in ranges]
    for runner in runners:
        runner.reset()  # a fresh cache refuses steps until the gateway opens it
    return runners


def _step(runners: list[SliceRunner], batch: StepBatch) -> list[int]:
    out = None
    for runner in runners:
        out = runner.step(batch, out)
    return out


def greedy(runners: list[SliceRunner], prompts: list[list[int]], max_new: int, replay_at: int | None = None,
           adapters: list[str] | None = None) -> list[list[int]]:
    """Greedy generation of all prompts in one batch: one prefill step, then one decode step per token;
    at decode step `replay_at` every cache is dropped and rebuilt from prompt + generated, into other blocks
    (a recovery's new block tables). `adapters`: the LoRA adapter of each row ("" for the base model)."""
    slots = list(range(len(prompts)))
    greedy_params = [SamplingParams()] * len(prompts)
    block_size = runners[0].spec.block_size
    base = 0

    def batch(starts: list[int], token_ids: list[list[int]]) -> StepBatch:
        return step_batch(slots, starts, token_ids, greedy_params, adapters, block_size=block_size, base=base)

    tokens = _step(runners, batch([0] * len(prompts), [list(p) for p in prompts]))
    generated = [[t] for t in tokens]
    for step in range(1, max_new):
        if step == replay_at:
            for runner in runners:
                runner.reset()
            base = REPLAY_BASE if base == 0 else 0
            history = [p + g[:-1] for p, g in zip(prompts, generated, strict=True)]
            _step(runners, batch([0] * len(prompts), history))
        starts = [len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]
        tokens = _step(runners, batch(starts, [[g[-1]] for g in generated]))
        for g, t in zip(generated, tokens, strict=True):
            g.append(t)
    return generated


def assert_parity(reference: Callable, model: Path, layers: str | None, shards: int) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    num_layers = getattr(config, "text_config", config).num_hidden_layers
    ranges = parse_layers(layers, num_layers) if layers else balanced_split(model_costs(config), shards)
    runners = _runners(model, ranges)
    expected = [reference(model, p, MAX_NEW) for p in PROMPTS]
    assert all(len(e) >= MAX_NEW // 2 for e in expected)  # the comparison is not vacuous
    batched = greedy(runners, PROMPTS, MAX_NEW)
    replayed = greedy(runners, PROMPTS, MAX_NEW, replay_at=MAX_NEW // 2)
    alone = [greedy(runners, [p], MAX_NEW)[0] for p in PROMPTS[:2]]
    for got, want in zip(batched, expected, strict=True):
        assert got[: len(want)] == want
    assert replayed == batched
    assert alone == batched[:2]


QWEN2_SPLITS = [(1, None), (2, None), (3, None), (4, None), (None, "0-0,1-3,4-4")]


@pytest.mark.parametrize(("shards", "layers"), QWEN2_SPLITS, ids=[str(s or lay) for s, lay in QWEN2_SPLITS])
def test_qwen2_parity(reference, tiny_model, shards, layers):
    assert_parity(reference, tiny_model, layers, shards or 1)


def test_qwen2_untied_parity(reference, untied_model):
    assert_parity(reference, untied_model, "0-3,4-4", 1)


def test_qwen3_parity_every_split(reference, qwen3_model):
    for shards, layers in QWEN2_SPLITS:
        assert_parity(reference, qwen3_model, layers, shards or 1)


def test_qwen3_tied_parity(reference, tmp_path):
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    tied = build_checkpoint(tmp_path, "tiny-qwen3", num_hidden_layers=3, tie_word_embeddings=True)
    assert_parity(reference, tied, "0-0,1-2", 1)
    assert_parity(reference, tied, None, 1)  # one slice: the head is the embedding itself


def test_qwen3_moe_parity_every_split(reference, qwen3_moe_model):
    for shards, layers in QWEN2_SPLITS:
        assert_parity(reference, qwen3_moe_model, layers, shards or 1)


# Qwen3.5's 8 layers are L L L F L L L F: splits on and inside the pattern, slices with linear layers only,
# with one full-attention layer only, and every kind of boundary.
QWEN3_5_SPLITS = [(1, None), (2, None), (3, None), (4, None), (None, "0-0,1-4,5-7"), (None, "0-2,3-3,4-7")]


@pytest.mark.parametrize(("shards", "layers"), QWEN3_5_SPLITS, ids=[str(s or lay) for s, lay in QWEN3_5_SPLITS])
def test_qwen3_5_parity(reference, qwen3_5_model, shards, layers):
    assert_parity(reference, qwen3_5_model, layers, shards or 1)


# ------------------------------------------------------------------------------------------- LoRA adapters

LINEAR_ATTENTION = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
ADAPTED = [("qwen3_model", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
           ("qwen3_moe_model", ["q_proj", "v_proj"]),
           ("qwen3_5_model", ["q_proj", "v_proj", *LINEAR_ATTENTION])]


@pytest.mark.parametrize(("model_fixture", "targets"), ADAPTED, ids=[m.removesuffix("_model") for m, _ in ADAPTED])
def test_adapter_parity_with_peft(reference, request, tmp_path, model_fixture, targets):
    """Rows with the adapter are `PeftModel.generate()`, rows without it the base model, in one batch, split."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = request.getfixturevalue(model_fixture)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    get_peft_model(base, lora).save_pretrained(tmp_path)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                     tmp_path).eval()

    config = loader_config(model)
    runners = _runners(model, balanced_split(model_costs(config), 2))
    for runner in runners:
        runner.load_adapter("a", str(tmp_path))
    prompts = PROMPTS[:3]
    got = greedy(runners, prompts, MAX_NEW, replay_at=4, adapters=["a", "", "a"])
    for prompt, tokens, adapted in zip(prompts, got, [True, False, True], strict=True):
        if adapted:
            with torch.inference_mode():
                want = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
            want = want[0, len(prompt):].tolist()
        else:
            want = reference(model, prompt, MAX_NEW)
        assert tokens[: len(want)] == want
    assert got[0] != reference(model, prompts[0], MAX_NEW)  # the adapter changes the output


def loader_config(model: Path):
    from qwen_relay.shards.loader import load_config

    return load_config(model)


def test_qwen3_5_conv_adapter_is_refused(qwen3_5_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qwen_relay.shards.adapters import AdapterError, inspect_adapter
    from qwen_relay.train.lora import LoraSettings, build_lora_model

    with pytest.raises(ValueError, match="'conv1d' cannot take LoRA"):
        build_lora_model(qwen3_5_model, LoraSettings(target_modules=("conv1d", "q_proj")))
    base = AutoModelForCausalLM.from_pretrained(qwen3_5_model, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=128, target_modules=["conv1d"])).save_pretrained(tmp_path)  # r % groups == 0
    with pytest.raises(AdapterError, match="conv1d"):
        inspect_adapter("c", tmp_path, loader_config(qwen3_5_model), str(qwen3_5_model))
