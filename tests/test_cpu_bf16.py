"""A bf16 checkpoint served on a CPU: `--dtype auto` keeps bf16, every linear (LM head included) runs on
prepacked oneDNN bf16 kernels, and the contract is `generate()`'s greedy tokens with the model in bf16
(the fp32 contract of tests/test_slices_parity.py holds for fp32 checkpoints, which auto leaves fp32)."""

from __future__ import annotations

import pytest
import torch
from test_slices_parity import PROMPTS, greedy

from qwen_relay.shards.dtypes import cpu_bf16_fast
from qwen_relay.shards.packed import PackedHead, PackedLinear
from qwen_relay.shards.runner import SliceRunner, SliceSpec

pytestmark = pytest.mark.skipif(not cpu_bf16_fast(), reason="no native oneDNN bf16 kernels on this CPU")

MAX_NEW = 10


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """Untied (its head is its own tensor) and seeded so that greedy tokens vary from step to step."""
    from qwen_relay.checkpoints.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("bf16"), "tiny", num_hidden_layers=5, dtype=torch.bfloat16,
                            tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="module")
def bf16_reference(bf16_model) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):].tolist()
                for p in PROMPTS]


@pytest.mark.parametrize(("ranges", "decode"), [
    ([(0, 5)], "static"),
    ([(0, 3), (3, 5)], "static"),
    # Compiled: the packed linears as opaque custom operators inside inductor's graph (shards/packed.py); a
    # compile failure would fall back to the eager step, which the decode_mode check below catches.
    pytest.param([(0, 5)], "compiled", marks=pytest.mark.slow),
], ids=["1-slice", "2-slices", "1-slice-compiled"])
def test_bf16_checkpoint_runs_packed_bf16_with_generates_greedy_tokens(bf16_model, bf16_reference, ranges, decode):
    runners = [SliceRunner(SliceSpec(model=str(bf16_model), first=a, end=b, device="cpu", max_slots=4, max_len=64,
                                     decode=decode)) for a, b in ranges]
    for runner in runners:
        runner.reset()  # open the caches, as a pipeline does
    assert all(r.dtype == torch.bfloat16 for r in runners)
    linears = [m for r in runners for m in r.slice.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, PackedLinear) and m.weight.dtype == torch.bfloat16 for m in linears)
    assert isinstance(runners[-1].slice.lm_head, PackedHead)
    assert all(r.decode_mode == decode for r in runners)
    got = greedy(runners, PROMPTS, MAX_NEW)
    assert all(r.decode_mode == decode for r in runners)
    assert len({t for tokens in got for t in tokens}) > len(PROMPTS)  # not one token repeated: a real check
    for tokens, want in zip(got, bf16_reference, strict=True):
        assert tokens[: len(want)] == want


def test_bf16_adapter_on_packed_base_layers_gives_pefts_tokens(bf16_model, bf16_reference, tmp_path):
    """PEFT wraps the packed bf16 base layers; its low-rank update runs on top: `PeftModel.generate()`'s tokens."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, config).save_pretrained(tmp_path / "lora")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16),
                                     tmp_path / "lora").eval()
    with torch.inference_mode():
        expected = [peft.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p):]
                    .tolist() for p in PROMPTS]
    assert expected != bf16_reference  # the adapter changes the tokens: the check below can fail
    runners = [SliceRunner(SliceSpec(model=str(bf16_model), first=a, end=b, device="cpu", max_slots=4, max_len=64))
               for a, b in [(0, 3), (3, 5)]]
    for runner in runners:
        runner.reset()  # open the caches, as a pipeline does
    for runner in runners:
        runner.load_adapter("lora", str(tmp_path / "lora"))
    got = greedy(runners, PROMPTS, MAX_NEW, adapters=["lora"] * len(PROMPTS))
    assert any(isinstance(m.base_layer, PackedLinear) for r in runners for m in r.slice.modules()
               if hasattr(m, "base_layer"))
    for tokens, want in zip(got, expected, strict=True):
        assert tokens[: len(want)] == want
