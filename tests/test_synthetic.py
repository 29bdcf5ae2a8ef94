"""The synthetic checkpoint must load and behave like a real Qwen2 one, offline and reproducibly."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwen_relay.checkpoints.synthetic import (
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SHAPES,
    add_parser,
    build_checkpoint,
    build_tokenizer,
)

TURKISH = "Merhaba! Nasıl yardımcı olabilirim? İstanbul'da DOĞAL güzellikler, çiçekler ve şölen."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update((k, st.get_tensor(k)) for k in st.keys())
    return out


def test_build_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_checkpoint(tmp_path / "again", "tiny")
    assert _hashes(again) == _hashes(tiny)
    assert "model.safetensors" in _hashes(tiny)
    other_seed = build_checkpoint(tmp_path / "seed1", "tiny", seed=1)
    assert _hashes(other_seed)["model.safetensors"] != _hashes(tiny)["model.safetensors"]


def test_loads_offline_and_generates(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny)
    model, info = AutoModelForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.model_type == "qwen2"
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok)
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.rms_norm_eps == 1e-6 and not config.use_sliding_window
    assert config.tie_word_embeddings and config.num_hidden_layers == SHAPES["tiny"].num_hidden_layers
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    endoftext, im_end = tok.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    assert config.bos_token_id == endoftext and config.eos_token_id == im_end
    gen = GenerationConfig.from_pretrained(tiny)
    assert gen.eos_token_id == [im_end, endoftext] and gen.pad_token_id == endoftext and not gen.do_sample
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT

    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "Merhaba"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=5)
    assert (
        out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
    )


def test_chat_template(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Selam"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nSelam<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    # The special tokens are single ids, never split by BPE.
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 3


def test_tokenizer_turkish_round_trip_and_split_bytes(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok(TURKISH)["input_ids"]
    assert tok.decode(ids) == TURKISH
    pieces = [tok.decode([i]) for i in ids]
    # Some multi-byte character is split across tokens: a lone token decodes to U+FFFD.
    assert any("\ufffd" in p for p in pieces)
    # ...while frequent Turkish words from the corpus are merged into few tokens.
    assert pieces[0] == "Merhaba"
    specials = tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END])
    assert specials == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    # build_tokenizer alone gives the same encoding as the saved one.
    assert build_tokenizer()(TURKISH)["input_ids"] == ids


def test_sharded_build_writes_index_and_loads(tiny: Path, tmp_path: Path) -> None:
    sharded = build_checkpoint(tmp_path / "sharded", "tiny", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert not (sharded / "model.safetensors").exists()
    tensors = _tensors(sharded)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Values depend on the key and the seed only, not on the sharding.
    reference = _tensors(tiny)
    assert set(reference) == set(tensors)
    assert all(torch.equal(reference[k], tensors[k]) for k in reference)
    model, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tied_and_untied(tiny: Path, tmp_path: Path) -> None:
    assert "lm_head.weight" not in _tensors(tiny)
    untied = build_checkpoint(tmp_path / "untied", "tiny", num_hidden_layers=3, tie_word_embeddings=False)
    tensors = _tensors(untied)
    assert "lm_head.weight" in tensors
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert (
        "model.layers.2.mlp.down_proj.weight" in tensors
        and "model.layers.3.mlp.down_proj.weight" not in tensors
    )
    config = AutoConfig.from_pretrained(untied)
    assert config.num_hidden_layers == 3 and not config.tie_word_embeddings
    model, info = AutoModelForCausalLM.from_pretrained(untied, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_init_rules_and_bf16_is_cast_of_fp32(tiny: Path, tmp_path: Path) -> None:
    fp32 = _tensors(tiny)
    assert torch.equal(fp32["model.norm.weight"], torch.ones_like(fp32["model.norm.weight"]))
    emb = fp32["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    assert fp32["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    bf16 = _tensors(build_checkpoint(tmp_path / "bf16", "tiny", dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_rebuild_with_other_sharding_removes_stale_files(tmp_path: Path) -> None:
    d = build_checkpoint(tmp_path / "ck", "tiny", max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists()
    build_checkpoint(d, "tiny")
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]


def test_unknown_shape() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        build_checkpoint("/nonexistent", "qwen9-1t")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "build-checkpoint",
            "--out",
            str(out),
            "--layers",
            "2",
            "--untied",
            "--dtype",
            "bfloat16",
            "--seed",
            "3",
        ]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 2 and not config.tie_word_embeddings and config.dtype == torch.bfloat16
    assert "lm_head.weight" in _tensors(out)


@pytest.mark.parametrize(("shape", "multimodal"), [("tiny-qwen3", False), ("tiny-qwen3-moe", False),
                                                   ("tiny-qwen3.5", False), ("tiny-qwen3.5", True)])
def test_newer_families_in_the_published_layout_load_completely(tmp_path: Path, shape: str, multimodal: bool):
    out = build_checkpoint(tmp_path / "ck", shape, num_hidden_layers=4, multimodal=multimodal)
    tensors = _tensors(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not (set(info["unexpected_keys"]) - {k for k in tensors if k.startswith("mtp.")})
    if not multimodal:  # the names and shapes transformers itself writes
        model.save_pretrained(tmp_path / "saved")
        saved = _tensors(tmp_path / "saved")
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in tensors.items()}
    config = AutoConfig.from_pretrained(out)
    # Qwen3 and Qwen3-MoE carry Qwen3's template: the latest reply gets an empty think block.
    chat = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False)
    assert ("<think>\n\n</think>\n\nHello!" in chat) == (shape != "tiny-qwen3.5")
    if shape == "tiny-qwen3":
        assert config.model_type == "qwen3" and config.head_dim == 32
        assert "model.layers.0.self_attn.q_norm.weight" in tensors
        assert "model.layers.0.self_attn.q_proj.bias" not in tensors
    if shape == "tiny-qwen3-moe":  # experts one by one, as save_pretrained writes them; layer 1 dense
        assert tensors["model.layers.0.mlp.experts.7.gate_proj.weight"].shape == (32, 64)
        assert tensors["model.layers.0.mlp.experts.7.down_proj.weight"].shape == (64, 32)
        assert "model.layers.1.mlp.gate_proj.weight" in tensors and not any("gate_up_proj" in k for k in tensors)
    if shape == "tiny-qwen3.5":
        prefix = "model.language_model." if multimodal else "model."
        assert config.model_type == ("qwen3_5" if multimodal else "qwen3_5_text")
        assert config.architectures == ["Qwen3_5ForConditionalGeneration" if multimodal else "Qwen3_5ForCausalLM"]
        assert torch.equal(tensors[prefix + "norm.weight"], torch.zeros(64))  # zero-centred: 1 + weight
        assert torch.equal(tensors[prefix + "layers.0.linear_attn.norm.weight"], torch.ones(16))  # a plain one
        assert (tensors[prefix + "layers.0.linear_attn.A_log"].exp() >= 1).all()
        assert any(k.startswith("model.visual.") for k in tensors) == multimodal
        assert any(k.startswith("mtp.") for k in tensors) == multimodal
