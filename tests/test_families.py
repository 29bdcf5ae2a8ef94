"""Family dispatch and loading: the architecture comes from config.json, an unsupported one is refused at once
(and a mistyped checkpoint path as a path), and a slice reads only its own tensors (its own layers' experts;
never a multimodal checkpoint's vision tower or MTP weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch

from qwen_relay.shards import hub, loader
from qwen_relay.shards.family import SUPPORTED, UnsupportedModel
from qwen_relay.shards.kv_cache import RecurrentShape


def test_unsupported_model_type_is_refused_naming_the_supported(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4}))
    with pytest.raises(UnsupportedModel, match="'llama' is not supported") as info:
        loader.load_config(tmp_path)
    assert all(name in str(info.value) for name in ["qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_text"])
    assert SUPPORTED == ["qwen2", "qwen3", "qwen3_5", "qwen3_5_text", "qwen3_moe"]


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "./checkpoint", "~/no-such-checkpoint", "a/b/c", "file"])
def test_a_path_that_is_no_folder_is_refused_as_a_path(model: str, tmp_path: Path, monkeypatch):
    """A mistyped --model path says so; it is not sent to the hub as a repo id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("looked up on the hub"))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint folder at {model}"):
        hub.model_dir(model)


def test_a_hub_id_is_looked_up_on_the_hub(tmp_path: Path, monkeypatch):
    asked = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **k: asked.append(repo) or str(tmp_path))
    for model in ("Qwen/Qwen2.5-0.5B-Instruct", "gpt2"):
        assert hub.model_dir(model) == tmp_path
    assert asked == ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2"]


def test_multimodal_config_serves_its_text_model(qwen3_5_model):
    config = loader.load_config(qwen3_5_model)
    assert config.model_type == "qwen3_5_text" and config.num_hidden_layers == 8
    assert config.layer_types.count("full_attention") == 2


class Recorder:
    """Wraps safetensors.safe_open and records every tensor a loader reads."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def open(self, *args, **kwargs):
        handle = safetensors.safe_open(*args, **kwargs)
        recorder = self

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_tensor(self, key):
                recorder.read.add(key)
                return handle.get_tensor(key)

            def get_slice(self, key):
                recorder.read.add(key)
                return handle.get_slice(key)

        return Handle()


def _load(model: Path, first: int, end: int, monkeypatch) -> set[str]:
    recorder = Recorder()
    monkeypatch.setattr(loader, "safe_open", recorder.open)
    loader.load_slice(str(model), first, end, torch.float32, torch.device("cpu"))
    return recorder.read


def test_qwen3_5_slice_reads_no_vision_or_mtp_tensor(qwen3_5_model, monkeypatch):
    every = set(loader.weight_map(qwen3_5_model))
    assert any(k.startswith("model.visual.") for k in every) and any(k.startswith("mtp.") for k in every)
    read = _load(qwen3_5_model, 0, 8, monkeypatch)
    assert read == {k for k in every if k.startswith("model.language_model.") or k == "lm_head.weight"}
    middle = _load(qwen3_5_model, 3, 5, monkeypatch)
    assert middle == {k for k in every if k.startswith(("model.language_model.layers.3.",
                                                        "model.language_model.layers.4."))}


def test_moe_slice_reads_only_its_own_layers_experts(qwen3_moe_model, monkeypatch):
    every = set(loader.weight_map(qwen3_moe_model))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in every  # the published per-expert layout
    assert not any("mlp.experts.gate_up_proj" in k for k in every)
    assert not any(k.startswith("model.layers.1.mlp.experts.") for k in every)  # mlp_only_layers: dense
    read = _load(qwen3_moe_model, 2, 4, monkeypatch)
    assert read == {k for k in every if k.startswith(("model.layers.2.", "model.layers.3."))}


def test_qwen3_5_cache_holds_kv_blocks_and_recurrent_state_per_slot(qwen3_5_model):
    from qwen_relay.shards.runner import SliceRunner, SliceSpec

    runner = SliceRunner(SliceSpec(model=str(qwen3_5_model), first=2, end=7, device="cpu", max_slots=3, max_len=32,
                                   num_blocks=10, block_size=8))
    assert runner.slice.num_attention_layers == 1  # layer 3 (L L [L F L L L] F)
    assert runner.slice.recurrent_shape == RecurrentShape(layers=4, conv_dim=2 * 32 + 64, conv_kernel=4, heads=4,
                                                          key_dim=16, value_dim=16)
    cache = runner.cache
    # Attention keeps its KV in blocks, one scratch block more (shards/kv_cache.py); the recurrent state is per
    # sequence slot and needs no scratch.
    assert cache.k.shape[:3] == (1, 10 + 1, 8) and cache.conv.shape[:2] == (4, 3) and cache.state.shape[:2] == (4, 3)
    assert cache.nbytes == sum(t.nbytes for t in (cache.k, cache.v, cache.conv, cache.state))
