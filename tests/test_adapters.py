"""LoRA adapters: served output is PEFT's `PeftModel.generate()` token for token (greedy, fp32), for one slice and
an uneven split where a slice holds none of an adapter's layers, with different adapters and none in one batch;
the AdapterAdmin RPCs load, unload and list while serving; wrong adapters get the right status codes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qwen_relay.client import RelayClient
from qwen_relay.server.app import ServeOptions

pytestmark = pytest.mark.slow  # starts Ray actors, subprocesses or a cluster: `make test-fast` skips it

MAX_NEW = 20
PROMPTS = ["The quick brown fox", "Merhaba! Nasıl yardımcı olabilirim?", "def add(a, b):\n    return a + b\n"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPLIT = "0-0,1-3,4-4"  # uneven; "partial" (layers 1 and 4) leaves slice 0 without any of its weights


def _save_adapter(base: torch.nn.Module, folder: Path, seed: int, **lora: object) -> Path:
    """A PEFT adapter with random non-zero A and B (init_lora_weights=False), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.1, **lora))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    def other(**changes: object) -> torch.nn.Module:
        config = AutoConfig.from_pretrained(tiny_model, **changes)
        config.layer_types = ["full_attention"] * config.num_hidden_layers  # the saved list has the old count
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    return {
        "all": _save_adapter(base(), out / "all", 1, r=4, lora_alpha=8, target_modules=ALL_LINEAR),
        "partial": _save_adapter(base(), out / "partial", 2, r=8, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 4]),
        "late": _save_adapter(base(), out / "late", 3, r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"],
                              layers_to_transform=[0]),
        "wide": _save_adapter(other(hidden_size=96), out / "wide", 4, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"]),
        "deep": _save_adapter(other(num_hidden_layers=7), out / "deep", 5, r=4, lora_alpha=8,
                              target_modules=["q_proj"]),
    }


@pytest.fixture(scope="module")
def peft_reference(tiny_model, reference):
    """Greedy `PeftModel.from_pretrained(base, path).generate()` in fp32; no adapter: the base contract."""
    from peft import PeftModel

    models: dict[Path, torch.nn.Module] = {}

    def generate(adapter: Path | None, prompt_ids: list[int], max_new_tokens: int = MAX_NEW) -> list[int]:
        if adapter is None:
            return reference(tiny_model, prompt_ids, max_new_tokens)
        if adapter not in models:
            base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
            models[adapter] = PeftModel.from_pretrained(base, adapter).eval()
        with torch.inference_mode():
            out = models[adapter].generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                           do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


def _options(tiny_model: Path, adapters: dict[str, Path], *, ray: bool) -> ServeOptions:
    loaded = {"all": str(adapters["all"]), "partial": str(adapters["partial"])}
    root = (str(adapters["all"].parent),)  # LoadAdapter reads only under it
    if ray:
        return ServeOptions(model=str(tiny_model), layers=SPLIT, max_context=512, recovery_timeout=120,
                            adapters=loaded, adapter_roots=root)
    return ServeOptions(model=str(tiny_model), shards=1, use_ray=False, max_context=512, adapters=loaded,
                        adapter_roots=root)


@pytest.fixture
def adapter_relay(relay_factory, tiny_model, adapters):
    """Both adapters loaded, on 3 Ray slices (SPLIT); not the shared 2-slice `ray_relay` of tests/conftest.py."""
    return relay_factory(_options(tiny_model, adapters, ray=True))


def _record_batches(relay) -> list[list[str] | None]:
    """Wrap the live pipeline's step to see which adapters each batch mixed."""
    seen: list[list[str] | None] = []
    step = type(relay.pipeline).step

    async def recording(batch):
        seen.append(batch.adapters)
        return await step(relay.pipeline, batch)

    relay.pipeline.step = recording
    return seen


@pytest.mark.parametrize("ray", [False, True], ids=["1-slice-local", f"3-slices-{SPLIT}-ray"])
def test_adapter_parity_in_mixed_batches(relay_factory, tiny_model, adapters, peft_reference, ray):
    relay = relay_factory(_options(tiny_model, adapters, ray=ray))
    seen = _record_batches(relay)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cases = [(tokenizer.encode(p, add_special_tokens=False), name) for p in PROMPTS for name in ("all", "partial", "")]
    try:
        with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as client:
            # Every request in flight at once: different adapters and none decode in the same batches.
            with ThreadPoolExecutor(len(cases)) as pool:
                results = list(pool.map(lambda c: client.generate(prompt_token_ids=c[0], adapter=c[1],
                                                                  max_new_tokens=MAX_NEW), cases))
            for (ids, name), result in zip(cases, results, strict=True):
                expected = peft_reference(adapters[name] if name else None, ids)
                assert result.token_ids == expected, (name, ids)
            # The adapters really change the output, so the comparison above means something.
            for ids in {tuple(ids) for ids, _ in cases}:
                base = peft_reference(None, list(ids))
                assert peft_reference(adapters["all"], list(ids)) != base
            # Streaming goes the same way.
            ids, name = cases[1]
            chunks = list(client.stream(prompt_token_ids=ids, adapter=name, max_new_tokens=MAX_NEW))
            assert [t for c in chunks for t in c.token_ids] == results[1].token_ids
    finally:
        del relay.pipeline.step
    assert any(b is not None and {"all", "partial", ""} <= set(b) for b in seen), seen


def test_admin_rpcs_while_serving(adapter_relay, tiny_model, adapters, peft_reference):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    with RelayClient(f"127.0.0.1:{adapter_relay.port}", timeout=120) as client:
        listed = {a.name: a for a in client.list_adapters()}
        assert set(listed) == {"all", "partial"}  # from ServeOptions.adapters (--adapter), loaded at start
        assert listed["partial"].layers == [1, 4] and listed["partial"].r == 8 and listed["partial"].alpha == 16
        assert listed["all"].target_modules == sorted(ALL_LINEAR) and listed["all"].layers == [0, 1, 2, 3, 4]
        assert listed["all"].base_model == str(tiny_model)

        with pytest.raises(grpc.RpcError) as unknown:
            client.generate(prompt_token_ids=ids, adapter="late", max_new_tokens=4)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        info = client.load_adapter("late", str(adapters["late"]))
        try:
            assert (info.name, info.layers, info.target_modules) == ("late", [0], ["o_proj", "up_proj"])
            assert [a.name for a in client.list_adapters()] == ["all", "late", "partial"]
            with ThreadPoolExecutor(2) as pool:  # one request with the new adapter, one with none, together
                late, base = pool.map(lambda name: client.generate(prompt_token_ids=ids, adapter=name,
                                                                   max_new_tokens=MAX_NEW), ["late", ""])
            assert late.token_ids == peft_reference(adapters["late"], ids)
            assert base.token_ids == peft_reference(None, ids)

            with pytest.raises(grpc.RpcError) as taken:
                client.load_adapter("late", str(adapters["all"]))
            assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            client.unload_adapter("late")
        assert [a.name for a in client.list_adapters()] == ["all", "partial"]
        with pytest.raises(grpc.RpcError) as gone:
            client.generate(prompt_token_ids=ids, adapter="late", max_new_tokens=4)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert "late" in gone.value.details()
        with pytest.raises(grpc.RpcError) as twice:
            client.unload_adapter("late")
        assert twice.value.code() == grpc.StatusCode.NOT_FOUND
        # The slices forgot it: loading it again works, and its output is still exact.
        client.load_adapter("late", str(adapters["late"]))
        try:
            assert client.generate(prompt_token_ids=ids, adapter="late",
                                   max_new_tokens=MAX_NEW).token_ids == peft_reference(adapters["late"], ids)
        finally:
            client.unload_adapter("late")


def test_adapter_for_another_base_model_is_failed_precondition(adapter_relay, adapters):
    with RelayClient(f"127.0.0.1:{adapter_relay.port}", timeout=120) as client:
        with pytest.raises(grpc.RpcError) as wide:
            client.load_adapter("wide", str(adapters["wide"]))
        assert wide.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = wide.value.details()
        assert "different base model" in details and "hidden_size 64" in details
        assert "q_proj.lora_A.weight has shape [4, 96], the served model needs [4, 64]" in details

        with pytest.raises(grpc.RpcError) as deep:
            client.load_adapter("deep", str(adapters["deep"]))
        assert deep.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "layer(s) 5, 6" in deep.value.details() and "has 5 layers" in deep.value.details()

        for name, path in [("bad name!", str(adapters["all"])), ("ok", str(adapters["all"].parent / "missing")),
                           ("ok", str(adapters["all"].parent))]:
            with pytest.raises(grpc.RpcError) as bad:
                client.load_adapter(name, path)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, path)
        for path in ["/nonexistent/adapter", "/etc"]:  # outside the root: refused alike, existing or not
            with pytest.raises(grpc.RpcError) as outside:
                client.load_adapter("ok", path)
            assert outside.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert outside.value.details() == "path: not under an allowed adapter root (serve --adapter-root)"
        # Nothing half-loaded is left behind.
        assert [a.name for a in client.list_adapters()] == ["all", "partial"]


def test_unloading_an_adapter_in_use_is_refused(adapter_relay, tiny_model, adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    with RelayClient(f"127.0.0.1:{adapter_relay.port}", timeout=120) as client:
        client.load_adapter("late", str(adapters["late"]))
        stream = client.stream(prompt_token_ids=ids, adapter="late", max_new_tokens=200, ignore_eos=True)
        try:
            for i, _ in enumerate(stream):  # read in this thread: a failed assertion here is not lost
                if i == 2:
                    break
            with pytest.raises(grpc.RpcError) as busy:
                client.unload_adapter("late")
            assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "in use by 1 request" in busy.value.details()
        finally:
            stream.close()  # leaving the stream cancels the request
        engine = adapter_relay.engine
        deadline = time.monotonic() + 30
        while engine.adapter_users("late"):  # the cancelled request leaves the batch at the next step boundary
            assert time.monotonic() < deadline, "the cancelled request still holds the adapter"
            time.sleep(0.05)
        client.unload_adapter("late")
        assert [a.name for a in client.list_adapters()] == ["all", "partial"]


def test_restarted_slice_gets_its_adapters_back(adapter_relay, tiny_model, adapters, peft_reference):
    """Ray rebuilds a dead slice from its spec alone; the gateway re-sends its adapters before the replay."""
    import ray

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    with RelayClient(f"127.0.0.1:{adapter_relay.port}", timeout=180) as client:
        tokens: list[int] = []
        for chunk in client.stream(prompt_token_ids=ids, adapter="all", max_new_tokens=40, ignore_eos=True):
            tokens.extend(chunk.token_ids)
            if len(tokens) == 8:
                ray.kill(adapter_relay.pipeline.actors[1], no_restart=False)
        assert tokens == peft_reference(adapters["all"], ids, 40)
        assert client.health() == "SERVING"


def test_slice_holding_none_of_an_adapter_costs_nothing(tiny_model, adapters):
    """In-process runners: a slice without the adapter's layers injects nothing; unloading unwraps modules;
    a step naming an adapter a slice never loaded (a restarted actor) fails loudly."""
    from peft.tuners.lora import LoraLayer

    from qwen_relay.shards.adapters import AdapterMissing
    from qwen_relay.shards.batch import SamplingParams, StepBatch
    from qwen_relay.shards.runner import SliceRunner, SliceSpec

    first = SliceRunner(SliceSpec(model=str(tiny_model), first=0, end=1, device="cpu", max_slots=2, max_len=32))
    before = sum(p.numel() for p in first.slice.parameters())
    assert first.load_adapter("partial", str(adapters["partial"]))["layers"] == []
    assert sum(p.numel() for p in first.slice.parameters()) == before
    assert not any(isinstance(m, LoraLayer) for m in first.slice.modules())
    assert first.load_adapter("all", str(adapters["all"]))["layers"] == [0]
    assert sum(isinstance(m, LoraLayer) for m in first.slice.modules()) == len(ALL_LINEAR)
    assert first.load_adapter("all", str(adapters["all"]))["layers"] == [0]  # the same again: a no-op
    first.unload_adapter("all")
    assert not any(isinstance(m, LoraLayer) for m in first.slice.modules())
    assert sum(p.numel() for p in first.slice.parameters()) == before

    first.reset()  # a fresh cache refuses steps until the gateway opens it
    batch = StepBatch(slots=[0], starts=[0], token_ids=[[1, 2]], blocks=[[5]], sampling=[SamplingParams()],
                      adapters=["late"])
    keys, values = first.cache.k.clone(), first.cache.v.clone()
    with pytest.raises(AdapterMissing):
        first.step(batch)
    # Nothing was written for the refused step: no block it named (or any other) changed.
    assert torch.equal(first.cache.k, keys) and torch.equal(first.cache.v, values)


def test_cli_adapter_flag():
    from qwen_relay.server.cli import build_parser, serve_options

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--adapter", "a=/x", "--adapter", "b=/y/z"])
    assert serve_options(args).adapters == {"a": "/x", "b": "/y/z"}
    with pytest.raises(ValueError, match="twice"):
        serve_options(parser.parse_args(["serve", "--model", "m", "--adapter", "a=/x", "--adapter", "a=/y"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--adapter", "no-path"])


@pytest.mark.slow
def test_adapter_deleted_then_its_slice_killed_fails_its_requests_only(adapter_relay, tiny_model, adapters,
                                                                      peft_reference):
    """The restarted slice cannot load the adapter again: its request fails FAILED_PRECONDITION at once, the
    base request beside it completes exactly, the adapter is gone from the list, and health is SERVING."""
    import shutil

    import ray

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    doomed = adapters["all"].parent / "doomed"
    shutil.copytree(adapters["late"], doomed)
    with RelayClient(f"127.0.0.1:{adapter_relay.port}", timeout=180) as client:
        client.load_adapter("doomed.v1", str(doomed))
        lora = client.stream(prompt_token_ids=ids, adapter="doomed.v1", max_new_tokens=200, ignore_eos=True)
        next(lora)
        with ThreadPoolExecutor(1) as pool:
            base = pool.submit(lambda: client.generate(prompt_token_ids=ids, max_new_tokens=MAX_NEW))
            shutil.rmtree(doomed)
            ray.kill(adapter_relay.pipeline.actors[0], no_restart=False)
            with pytest.raises(grpc.RpcError) as lost:
                for _ in lora:
                    pass
            assert base.result(180).token_ids == peft_reference(None, ids)
        assert lost.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'doomed.v1' was unloaded" in lost.value.details()
        assert [a.name for a in client.list_adapters()] == ["all", "partial"]
        with pytest.raises(grpc.RpcError) as gone:
            client.generate(prompt_token_ids=ids, adapter="doomed.v1", max_new_tokens=2)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.health() == "SERVING"
        assert client.generate(prompt_token_ids=ids, adapter="all",
                               max_new_tokens=MAX_NEW).token_ids == peft_reference(adapters["all"], ids)
