"""`qwen-relay bench`'s pieces on the tiny checkpoint: workloads, hf runner, relay runner, report.

Timings on a shared 2-core machine are noise, so nothing here asserts a speed: only that every figure is
computed from the right requests and lands in bench.json, table.md and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from transformers import AutoTokenizer

from qwen_relay.bench import baselines, loadgen, measure, relay_under_test, report, vllm_peer, workloads
from qwen_relay.bench import relay as cli
from qwen_relay.bench import run as bench_run
from qwen_relay.bench.workloads import BenchConfig, Request


def tiny_config(model, out, **overrides) -> BenchConfig:
    values = dict(model=str(model), out=str(out), shards=(1,), threads=1, max_batch=4, max_context=64,
                  single_prompts=(4, 12), single_new_tokens=4, single_repeats=1, mixed_requests=5,
                  mixed_prompt=(3, 12), mixed_new=(2, 6), concurrency=(1, 2), min_requests=2, uniform_requests=2,
                  uniform_prompt=8, uniform_new=4, uniform_concurrency=2, settle_s=0)  # the suite's cores are busy
    values.update(overrides)
    return BenchConfig(**values)


@pytest.fixture(scope="module")
def pool(tiny_model) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return workloads.token_pool(tokenizer, 10**6)


def test_token_pool_has_no_special_tokens(tiny_model, pool):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert pool and not set(pool) & set(tokenizer.all_special_ids)
    assert max(pool) < len(tokenizer)
    assert max(workloads.token_pool(tokenizer, 100)) < 100  # never outside the model's vocabulary


def test_workloads_are_seeded_and_exact(tmp_path, tiny_model, pool):
    cfg = tiny_config(tiny_model, tmp_path)
    work = workloads.make_workloads(cfg, pool)
    assert work == workloads.make_workloads(cfg, pool)
    assert work != workloads.make_workloads(dataclasses.replace(cfg, seed=1), pool)
    assert sorted(work.single) == [4, 12]
    assert all(len(r.prompt_token_ids) == n and r.max_new_tokens == 4 for n, r in work.single.items())
    assert len(work.mixed) == 5 and len(work.uniform) == 2
    for r in work.mixed:
        assert 3 <= len(r.prompt_token_ids) <= 12 and 2 <= r.max_new_tokens <= 6
        assert set(r.prompt_token_ids) <= set(pool)
    assert all(len(r.prompt_token_ids) == 8 and r.max_new_tokens == 4 for r in work.uniform)


def test_issue_workload_sizes():
    cfg = BenchConfig(model="m")
    work = workloads.make_workloads(cfg, list(range(1000)))
    lengths = [len(r.prompt_token_ids) for r in work.mixed]
    assert len(work.mixed) == 32 and min(lengths) >= 16 and max(lengths) <= 256
    assert all(16 <= r.max_new_tokens <= 128 for r in work.mixed)
    assert [cfg.requests_at(c) for c in cfg.concurrency] == [2, 4, 32]  # the top concurrency runs all
    assert dataclasses.replace(cfg, min_requests=32).requests_at(1) == 32  # the literal spec


def test_single_stream_stats():
    # start 0; tokens at 100, 110, 130 ms and a second run at 200, 210, 210 (two in one chunk).
    runs = [(0.0, [0.100, 0.110, 0.130]), (1.0, [1.200, 1.210, 1.210])]
    s = measure.single_stream_stats(runs, prompt_tokens=7)
    assert s["ttft_ms"] == pytest.approx(150)
    assert s["ms_per_token_p50"] == pytest.approx(10)
    assert s["ms_per_token_mean"] == pytest.approx((15 + 5) / 2)
    assert s["new_tokens"] == 3 and s["prompt_tokens"] == 7
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)


def test_hf_static_batches_count_only_requested_tokens(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    requests = [Request((5, 6, 7), 2), Request((8,) * 9, 5), Request((9, 10), 3)]
    out = baselines.hf_static_batches(model, requests, 2, pad_id=0)
    assert out["output_tokens"] == 10
    assert out["generated_tokens"] == 2 * 5 + 3  # batch of two runs to 5 tokens each, then the third alone
    assert out["padded_prompt_tokens"] == 2 * 9 + 2
    # Left padding must not change a row's greedy tokens.
    alone = baselines.hf_generate(model, [requests[0]], 0)[0, 3:5].tolist()
    padded = baselines.hf_generate(model, requests[:2], 0)[0, 9:11].tolist()
    assert alone == padded


def test_hf_packed_generates_what_hf_does(tiny_model):
    """hf-packed is generate() on the slices' prepacked kernels: same greedy tokens, other kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_relay.shards.packed import PackedHead, PackedLinear

    requests = [Request((5, 6, 7), 6), Request((8,) * 9, 6)]
    stock = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    baselines.prepack_model(packed)
    assert isinstance(packed.lm_head, PackedHead)
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    assert torch.equal(baselines.hf_generate(packed, requests, 0), baselines.hf_generate(stock, requests, 0))


def test_hf_runner(tmp_path, tiny_model, pool):
    cfg = tiny_config(tiny_model, tmp_path)
    work = workloads.make_workloads(cfg, pool)
    hf = baselines.run_hf(cfg, work)
    assert set(hf["single"]) == {"4", "12"}
    assert all(s["new_tokens"] == 4 and s["ttft_ms"] > 0 for s in hf["single"].values())
    assert hf["mixed"]["1"]["requests"] == 2 and hf["mixed"]["2"]["requests"] == 5
    assert hf["mixed"]["1"]["output_tokens"] == sum(r.max_new_tokens for r in work.mixed[:2])
    assert hf["mixed"]["2"]["output_tokens"] == sum(r.max_new_tokens for r in work.mixed)
    assert hf["uniform"]["output_tokens"] == 8
    assert hf["memory"]["peak_rss_bytes"] > hf["memory"]["weight_bytes"] > 0


@pytest.mark.slow
def test_end_to_end_run_and_report(tmp_path, tiny_model, ray_session):
    """hf and hf-packed in subprocesses, the overhead probe, a 2-slice relay on Ray actors over gRPC, then every
    output file. (relay-1 against relay-2, the pipelining figures, run in the dry run of bench/gpu.sh below.)"""
    cfg = tiny_config(tiny_model, tmp_path / "out", shards=(2,), threads_per_slice=True)
    result = bench_run.run_benchmark(cfg, command="qwen-relay bench --test")
    assert set(result["systems"]) == {"hf", "hf-packed", "relay-2"}
    assert result["systems"]["hf-packed"]["uniform"]["output_tokens"] == 8
    relay = result["systems"]["relay-2"]
    assert relay["uniform"]["output_tokens"] == 8
    assert relay["mixed"]["2"]["requests"] == 5
    assert [s["layers"] for s in relay["slices"]] == ["0-2", "3-4"]
    assert all(s["peak_rss_bytes"] > s["cache_bytes"] > 0 for s in relay["slices"])
    assert len(relay["uniform"]["slice_forward_s"]) == 2 and min(relay["uniform"]["slice_forward_s"]) > 0
    # 2 requests of 4 new tokens each: 4 steps when they step together throughout, 8 if never
    assert 4 <= relay["uniform"]["engine_steps"] <= 8
    assert result["runtime_overhead_bytes"] > 0
    ratio = result["ratios"]["relay-2"]["mixed"]["2"]
    assert ratio == pytest.approx(relay["mixed"]["2"]["tokens_per_s"] / result["systems"]["hf"]["mixed"]["2"]
                                  ["tokens_per_s"])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"bench.json", "table.md", "throughput.png", "latency.png",
                                               "memory.png"}
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["command"] == "qwen-relay bench --test"
    assert saved["config"]["concurrency"] == [1, 2]
    table = (out / "table.md").read_text()
    for heading in ("Single stream", "Mixed workload", "Uniform workload", "Peak memory", "bandwidth floor",
                    "Targets"):
        assert heading in table


def _fake_system(name: str, speed: float, shards: int | None = None) -> dict:
    rng = random.Random(name)
    single = {str(n): {"prompt_tokens": n, "new_tokens": 8, "runs": 1, "ttft_ms": 100 / speed, "ttft_ms_all": [],
                       "ms_per_token_p50": 50 / speed, "ms_per_token_p95": 60 / speed,
                       "ms_per_token_mean": 52 / speed} for n in (16, 512)}
    load = {"requests": 4, "output_tokens": 100, "generated_tokens": 120, "wall_s": 1.0}
    if shards is not None:
        load["slice_forward_s"] = [0.5 + 0.1 * i for i in range(shards)]
    system = {"system": name, "single": single,
              "mixed": {str(c): {**load, "concurrency": c, "tokens_per_s": speed * c} for c in (1, 4, 16)},
              "uniform": {**load, "concurrency": 16, "tokens_per_s": speed * 10 + rng.random()}}
    if shards is None:
        system["memory"] = {"peak_rss_bytes": 3 * 2**30, "weight_bytes": 2 * 2**30, "gpu_peak_bytes": 0}
    else:
        system["shards"] = shards
        system["slices"] = [{"index": i, "layers": f"{i}-{i}", "weight_bytes": 2**30, "cache_bytes": 2**28,
                             "peak_rss_bytes": 2**31} for i in range(shards)]
    return system


def _fake_result(cfg: BenchConfig, systems: dict, *, device: str = "cpu", dtype: str = "float32",
                 threads: int = 2) -> dict:
    """A whole bench result around `systems`, as `run.py` writes it (a 2 GB model at 20 GB/s)."""
    return {"meta": {"model_name": "m", "parameters": 494_000_000, "dtype": dtype, "device": device,
                     "command": "x", "duration_s": 1.0},
            "config": {**dataclasses.asdict(cfg), "num_threads": threads},
            "bandwidth": {"copy_gb_per_s": 20.0, "weight_bytes": 2e9, "read_bytes_per_token": 2e9,
                          "floor_ms_per_token": 100.0, "ceiling_tokens_per_s": 10.0},
            "runtime_overhead_bytes": 2**29, "systems": systems}


def test_report_from_a_result(tmp_path):
    cfg = BenchConfig(model="m", out=str(tmp_path))
    result = _fake_result(cfg, {"hf": _fake_system("hf", 1.0), "relay-2": _fake_system("relay-2", 2.0, shards=2)})
    table = report.write_report(result, tmp_path)
    ratios = result["ratios"]["relay-2"]
    assert ratios["mixed"]["16"] == pytest.approx(2.0)
    assert ratios["single"]["16"]["ms_per_token_p50"] == pytest.approx(0.5)
    targets = {r["target"]: r for r in result["targets"]}
    assert targets["relay-2 mixed tokens/s at concurrency 16"]["met"]
    memory = [r for r in result["targets"] if "peak memory" in r["target"]]
    assert len(memory) == 2
    # 2 GiB peak over 1 GiB weights + 256 MiB cache + 512 MiB overhead.
    assert memory[0]["value"] == pytest.approx(2048 / (1024 + 256 + 512))
    assert "| relay-2 slice 1 (layers 1-1) | 2048 | 1024 | 256 | 512 | 1792 | 1.14 |" in table
    assert (tmp_path / "table.md").read_text() == table
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]["relay-2"]["uniform"] > 1
    assert result["pipeline"] == []  # no relay-1 to compare with


def test_pipelining_figures():
    """relay-2 against relay-1 and hf-packed; busy fraction and slice balance from the uniform phase."""
    cfg = BenchConfig(model="m", threads_per_slice=True)
    result = {"config": {**dataclasses.asdict(cfg), "num_threads": 2},
              "systems": {"hf": _fake_system("hf", 1.0), "hf-packed": _fake_system("hf-packed", 1.5),
                          "relay-1": _fake_system("relay-1", 1.0, shards=1),
                          "relay-2": _fake_system("relay-2", 1.8, shards=2)}}
    rows = {r["key"]: r for r in report.pipeline_rows(result)}
    systems = result["systems"]
    assert rows["mixed_2_over_1"]["value"] == pytest.approx(1.8) and rows["mixed_2_over_1"]["met"]
    assert rows["uniform_2_over_1"]["value"] == pytest.approx(systems["relay-2"]["uniform"]["tokens_per_s"]
                                                              / systems["relay-1"]["uniform"]["tokens_per_s"])
    assert rows["busy_fraction"]["value"] == pytest.approx((0.5 + 0.6) / (2 * 1.0))
    assert not rows["busy_fraction"]["met"]
    assert rows["slowest_over_mean"]["value"] == pytest.approx(0.6 / 0.55) and rows["slowest_over_mean"]["met"]
    assert rows["single_2_over_1"]["value"] == pytest.approx(1 / 1.8)
    assert rows["mixed_over_hf_packed"]["value"] == pytest.approx(1.8 / 1.5)
    assert rows["single_over_hf_packed"]["value"] == pytest.approx(1.5 / 1.8)
    assert rows["single_over_hf_packed"]["goal"] == "<= 1.05"
    del systems["hf-packed"]
    assert "mixed_over_hf_packed" not in {r["key"] for r in report.pipeline_rows(result)}


def test_shared_core_relays_are_judged_on_costing_nothing():
    """Default CPU slices share the cores (one step in flight): relay-2 is judged on matching relay-1, not on the
    pipelining gains that slices on devices of their own are held to."""
    cfg = BenchConfig(model="m")
    result = {"meta": {"device": "cpu"}, "config": {**dataclasses.asdict(cfg), "num_threads": 2},
              "systems": {"relay-1": _fake_system("relay-1", 1.0, shards=1),
                          "relay-2": _fake_system("relay-2", 0.96, shards=2)}}
    rows = {r["key"]: r for r in report.pipeline_rows(result)}
    assert {k for k, r in rows.items() if r["met"] is not None} == {"uniform_2_over_1", "mixed_2_over_1",
                                                                      "single_2_over_1"}
    assert rows["busy_fraction"]["goal"] == "-" and rows["busy_fraction"]["value"] == pytest.approx(1.1 / 2)
    assert rows["mixed_2_over_1"]["goal"] == ">= 0.95" and rows["mixed_2_over_1"]["met"]
    assert rows["single_2_over_1"]["value"] == pytest.approx(1 / 0.96) and rows["single_2_over_1"]["met"]
    result["systems"]["relay-2"] = _fake_system("relay-2", 0.9, shards=2)
    assert not {r["key"]: r for r in report.pipeline_rows(result)}["mixed_2_over_1"]["met"]
    result["meta"]["device"] = "cuda:0"  # slices on GPUs of their own pipeline
    assert {r["key"]: r for r in report.pipeline_rows(result)}["mixed_2_over_1"]["goal"] == ">= 1.60"


def test_relays_against_vllm(tmp_path):
    """Each relay / vLLM on the three workloads, this run: ms/token at most 1.0x, tokens/s at least 1.0x; with no
    hf in the run, the hf targets are left out rather than shown unmet."""
    cfg = BenchConfig(model="m", out=str(tmp_path), baselines=("vllm",))
    result = _fake_result(cfg, {"vllm": _fake_system("vllm", 1.0), "relay-1": _fake_system("relay-1", 1.1, shards=1),
                                "relay-2": _fake_system("relay-2", 0.98, shards=2)}, dtype="bfloat16")
    table = report.write_tables(result, tmp_path)
    rows = {(r["system"], r["workload"]): r for r in result["peer"]}
    assert len(rows) == 6
    assert rows["relay-1", "single"]["value"] == pytest.approx(1 / 1.1) and rows["relay-1", "single"]["met"]
    assert rows["relay-1", "mixed"]["value"] == pytest.approx(1.1) and rows["relay-1", "uniform"]["met"]
    assert not rows["relay-2", "single"]["met"] and not rows["relay-2", "mixed"]["met"]
    assert "| relay-2 | mixed (tokens/s, c=16) | 15.7 | 16.0 | 0.98 | >= 1.00 | NO |" in table
    assert "relay / vllm)" in table  # no binding known: nothing claimed
    result["systems"]["vllm"]["cpu_cores"] = vllm_peer.compute_cores(
        "INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\nINFO reserved_cpus=[1]\n")
    assert "relay / vllm; vLLM computed on CPU cores 0)" in report.write_tables(result, tmp_path)
    assert vllm_peer.compute_cores("no binding line") is None
    assert all("peak memory" in r["target"] for r in result["targets"])
    # Engine steps: vLLM's from its /metrics page (one histogram count per engine), the relays' from slice 0.
    page = ('# TYPE vllm:iteration_tokens_total histogram\n'
            'vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="bench"} 2.0\n'
            'vllm:iteration_tokens_total_count{engine="0",model_name="bench"} 187.0\n'
            'vllm:iteration_tokens_total_sum{engine="0",model_name="bench"} 5743.0\n')
    assert vllm_peer.steps_from_metrics(page) == 187 and vllm_peer.steps_from_metrics("vllm:other 1.0\n") is None
    result["systems"]["vllm"]["mixed"]["16"]["engine_steps"] = 50
    result["systems"]["relay-1"]["mixed"]["16"]["engine_steps"] = 40
    steps = {(r["system"], r["workload"]): r for r in report.step_rows(result)}
    assert set(steps) == {("vllm", "mixed"), ("relay-1", "mixed")}  # only what was counted
    assert steps["vllm", "mixed"]["ms_per_step"] == pytest.approx(20.0)  # 1 s of wall over 50 steps
    assert steps["relay-1", "mixed"]["tokens_per_step"] == pytest.approx(2.5)
    assert "| relay-1 | mixed | 40 | 2.5 | 25.0 |" in report.write_tables(result, tmp_path)
    del result["systems"]["vllm"]
    assert report.peer_rows(result) == []


def test_tensor_parallel_figures(tmp_path):
    """relay-1-tp2 against relay-1 (the same slices at TP 1), single stream; the pipelining figures ignore it."""
    cfg = BenchConfig(model="m", out=str(tmp_path), shards=(1,), tensor_parallel=(1, 2))
    tp2 = {**_fake_system("relay-1-tp2", 1.6, shards=1), "tensor_parallel": 2}
    result = _fake_result(cfg, {"hf": _fake_system("hf", 1.0),
                                "relay-1": {**_fake_system("relay-1", 1.0, shards=1), "tensor_parallel": 1},
                                "relay-1-tp2": tp2}, device="cuda:0", dtype="bfloat16", threads=16)
    table = report.write_tables(result, tmp_path)
    rows = {r["prompt"]: r for r in result["tensor_parallel"]}
    assert set(rows) == {"16", "512"} and rows["16"]["baseline"] == "relay-1" and rows["16"]["tensor_parallel"] == 2
    assert rows["16"]["ms_per_token_ratio"] == pytest.approx(1 / 1.6)
    assert rows["512"]["ttft_ratio"] == pytest.approx(1 / 1.6)
    assert "**Tensor parallelism**" in table and "| relay-1-tp2 | relay-1 | 16 | 31.2 | 50.0 | 0.62 | 0.62 |" in table
    assert result["pipeline"] == []  # one slice count: nothing pipelined to compare, TP relays aside
    # A group reports its weights and cache summed over ranks, and rank 0's peak: the row is rank 0's.
    memory = {r["process"]: r for r in report.memory_rows(result)}
    rank0 = memory["relay-1-tp2 slice 0 (layers 0-0, rank 0 of 2)"]
    assert rank0["weights"] == 2**29 and rank0["cache"] == 2**27
    assert memory["relay-1 slice 0 (layers 0-0)"]["weights"] == 2**30


def test_cli_flags(tmp_path):
    from qwen_relay.server.cli import build_parser

    args = build_parser().parse_args(["bench", "--model", "m", "--quick", "--shards", "2", "--concurrency", "1,8",
                                      "--mixed-prompt", "10-20", "--out", str(tmp_path)])
    cfg = cli.config_from_args(args)
    assert cfg.shards == (2,) and cfg.concurrency == (1, 8) and cfg.mixed_prompt == (10, 20)
    assert cfg.single_new_tokens == workloads.QUICK["single_new_tokens"]  # --quick, not overridden
    full = cli.config_from_args(build_parser().parse_args(["bench", "--model", "m"]))
    assert full.mixed_requests == 32 and full.concurrency == (1, 4, 16) and full.shards == (1, 2)
    assert args.func is cli.run_bench
    assert full.baselines == ("hf", "hf-packed") and not full.threads_per_slice
    mode = cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--threads-per-slice",
                                                             "--baselines", "hf"]))
    assert mode.threads_per_slice and mode.baselines == ("hf",)
    one_each = relay_under_test.relay_options(mode, 2)
    assert one_each.threads == 1 and one_each.cpus_per_slice == 1 and one_each.max_in_flight == 0  # pipelined
    # Without it, a relay's CPU slices share the threads as serve shares cores: all of them each, one step at once.
    eight = cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--threads", "8"]))
    assert [relay_under_test.relay_options(eight, n).threads for n in (1, 2, 3, 16)] == [8, 8, 8, 8]
    assert {relay_under_test.relay_options(eight, n).max_in_flight for n in (1, 2, 3, 16)} == {1}
    assert full.tensor_parallel == (1,)
    tp = cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--threads", "8", "--shards", "1",
                                                         "--tensor-parallel", "1,2"]))
    assert tp.tensor_parallel == (1, 2)
    options = relay_under_test.relay_options(tp, 1, 2)
    assert options.tensor_parallel == 2 and options.threads == 4  # the ranks run at once: they split the threads
    compiled = cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--decode-step", "compiled"]))
    assert relay_under_test.relay_options(compiled, 1).decode_step == "compiled"
    assert relay_under_test.relay_options(full, 1).decode_step == "auto"
    assert relay_under_test.relay_name(1, 2) == "relay-1-tp2" and relay_under_test.relay_name(2) == "relay-2"
    with pytest.raises(SystemExit, match="--tensor-parallel"):
        cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--tensor-parallel", "0"]))
    with pytest.raises(SystemExit, match="baselines"):
        cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--baselines", "hf,sglang"]))
    peer = cli.config_from_args(build_parser().parse_args(
        ["bench", "--model", "m", "--baselines", "vllm", "--vllm-python", "/v/bin/python", "--workloads",
         "chat,shared-prefix", "--vllm-arg=--no-enable-prefix-caching"]))
    assert peer.baselines == ("vllm",) and peer.vllm_python == "/v/bin/python"
    assert peer.vllm_args == ("--no-enable-prefix-caching",) and peer.workloads == ("chat", "shared-prefix")
    assert peer.max_context == 256 + 8 * (64 + 48)  # the chat's last prompt and reply; more than the default 1024
    assert full.max_context == 1024 and full.workloads == ("single", "mixed", "uniform")
    with pytest.raises(SystemExit, match="send up to 1152 tokens"):
        cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--workloads", "chat",
                                                        "--max-context", "1024"]))
    with pytest.raises(SystemExit, match="workloads"):
        cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--workloads", "chats"]))


def test_chat_and_shared_prefix_workloads():
    """The chat turns and the shared prefix, as the KV-cache issue measures them; phases only when chosen."""
    cfg = BenchConfig(model="m", workloads=("chat", "shared-prefix"))
    work = workloads.make_workloads(cfg, list(range(1000)))
    assert work == workloads.make_workloads(cfg, list(range(1000)))
    turns = list(work.chat.turns())
    assert [len(t) for t in turns] == [256 + 64] + [64] * 7 and turns[0][:256] == work.chat.system
    assert len(work.shared) == 16 and all(r.max_new_tokens == 8 and len(r.prompt_token_ids) == 1088
                                          for r in work.shared)
    assert {r.prompt_token_ids[:1024] for r in work.shared} == {work.shared[0].prompt_token_ids[:1024]}
    assert len({r.prompt_token_ids[1024:] for r in work.shared}) == 16
    phases = workloads.plan(cfg, work)
    assert [p.describe() for p in phases] == ["chat, cold (8 turns)", "chat, warm (8 turns)",
                                              "shared-prefix c=1 (16 requests)"]
    assert phases[0].conversation == phases[1].conversation == work.chat
    default = workloads.plan(BenchConfig(model="m"), work)
    assert {p.section for p in default} == {"single", "mixed", "uniform"}


def test_chat_sends_each_reply_back():
    """Each turn's prompt is the last prompt + the reply the server gave + the new user tokens."""
    import asyncio

    from qwen_relay.bench.streaming import stream_chat
    from qwen_relay.bench.workloads import Conversation

    sent, extra = [], 1

    async def server(request):
        sent.append(request)
        yield [7, 7]  # a chunk of two, then one token a chunk
        for i in range(request.max_new_tokens - 2 + extra):
            yield [len(request.prompt_token_ids) + i]

    conversation = Conversation(system=(1, 2, 3), users=((4, 5), (6,), (8, 9)), reply=3)
    with pytest.raises(RuntimeError, match="returned 4 tokens, expected 3"):
        asyncio.run(stream_chat(server, conversation))  # a token too many is caught
    sent.clear()
    extra = 0
    chat = asyncio.run(stream_chat(server, conversation))
    assert [r.prompt_token_ids for r in sent] == [(1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 7, 7, 5, 6),
                                                  (1, 2, 3, 4, 5, 7, 7, 5, 6, 7, 7, 9, 8, 9)]
    assert chat["prompt_tokens"] == [5, 9, 14] and len(chat["ttft_ms"]) == 3 and chat["turns"] == 3


def test_hf_chat_replies_are_the_models(tiny_model):
    from transformers import AutoModelForCausalLM

    from qwen_relay.bench.workloads import Conversation

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    conversation = Conversation(system=(5, 6, 7), users=((8, 9), (10, 11)), reply=3)
    chat = baselines.hf_chat(model, conversation, 0)
    assert chat["prompt_tokens"] == [5, 10] and all(t > 0 for t in chat["ttft_ms"])
    first = baselines.hf_generate(model, [Request((5, 6, 7, 8, 9), 3)], 0)[0].tolist()
    second = baselines.hf_generate(model, [Request((*first, 10, 11), 3)], 0)[0].tolist()
    assert second[:10] == [*first, 10, 11]  # what hf_chat sent as its second prompt
    shared = baselines.hf_first_tokens(model, [Request((5, 6, 7), 2)] * 3, 2, 0)
    assert shared["requests"] == 3 and len(shared["ttft_ms_all"]) == 3
    assert shared["ttft_ms_all"][0] == shared["ttft_ms_all"][1]  # one static batch, one first token


def test_vllm_is_skipped_in_one_line_without_it(tmp_path, caplog):
    import asyncio
    import sys

    cfg = BenchConfig(model="m", out=str(tmp_path), baselines=("vllm",))
    with caplog.at_level("WARNING"):
        assert asyncio.run(bench_run.start_vllm(cfg)) is None
        assert asyncio.run(bench_run.start_vllm(dataclasses.replace(cfg, vllm_python=sys.executable))) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "vllm: skipped: no --vllm-python given (a Python whose environment has vLLM; " \
                       "docs/benchmarks.md)"
    assert lines[1].startswith(f"vllm: skipped: {sys.executable} cannot import vllm") and len(lines) == 2


def test_vllm_stream_reads_token_ids_from_chunked_events(tmp_path):
    """The peer's client against a stand-in for vLLM's server: chunked SSE with events split across chunks
    and chunks holding several events; it yields each event's token ids and sends the request by ids."""
    import asyncio

    from qwen_relay.bench.vllm_peer import VllmServer, server_command

    bodies = []
    events = [{"choices": [{"text": "", "token_ids": []}]}, {"choices": [{"text": "a", "token_ids": [11]}]},
              {"choices": [{"text": "bc", "token_ids": [12, 13]}]}, {"choices": [], "usage": {"x": 1}}]
    payload = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    cuts = [0, 7, 60, 61, len(payload)]  # an event split, then the rest in one chunk with several events

    async def handle(reader, writer):
        headers = b""
        while (line := await reader.readline()) != b"\r\n":
            headers += line
        length = int(headers.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for a, b in zip(cuts, cuts[1:], strict=False):
            writer.write(f"{b - a:x}\r\n".encode() + payload[a:b] + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        peer = VllmServer(BenchConfig(model="m"), None, server.sockets[0].getsockname()[1], {})
        chunks = [ids async for ids in peer.stream(Request((1, 2, 3), 3))]
        server.close()
        return chunks

    assert asyncio.run(main()) == [[11], [12, 13]]
    assert bodies == [{"model": "bench", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}]
    cfg = BenchConfig(model="/ckpt", vllm_python="/v/bin/python", dtype="auto", max_context=1152,
                      vllm_args=("--no-enable-prefix-caching",))
    command = server_command(cfg, 8000)
    assert command[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "/ckpt"), ("--dtype", "float32"), ("--max-model-len", "1152"),
                        ("--max-num-seqs", "16"), ("--port", "8000")):
        assert command[command.index(flag) + 1] == value
    assert command[-1] == "--no-enable-prefix-caching"


def test_report_of_chat_and_shared_prefix(tmp_path):
    """Only the workloads that ran are in the table and the plots; the chat per turn, cold and warm."""
    cfg = BenchConfig(model="m", out=str(tmp_path), workloads=("chat", "shared-prefix"), chat_turns=2)
    chat = {"cold": {"turns": 2, "prompt_tokens": [320, 432], "ttft_ms": [2270.0, 2500.0], "wall_s": 9.0},
            "warm": {"turns": 2, "prompt_tokens": [320, 432], "ttft_ms": [300.0, 310.0], "wall_s": 6.0}}
    shared = {"concurrency": 1, "requests": 3, "wall_s": 4.0, "ttft_ms_p50": 400.0, "ttft_ms_p95": 2900.0,
              "ttft_ms_all": [3000.0, 400.0, 390.0]}
    result = {"meta": {"model_name": "m", "parameters": 494_000_000, "dtype": "float32", "device": "cpu"},
              "config": {**dataclasses.asdict(cfg), "num_threads": 2},
              "bandwidth": {"copy_gb_per_s": 20.0, "weight_bytes": 2e9, "read_bytes_per_token": 2e9,
                            "floor_ms_per_token": 100.0, "ceiling_tokens_per_s": 10.0},
              "runtime_overhead_bytes": 2**29,
              "systems": {"vllm": {"system": "vllm", "chat": chat, "shared-prefix": shared},
                          "relay-1": {"system": "relay-1", "shards": 1, "chat": chat}}}
    table = report.write_report(result, tmp_path)
    assert "| system | run | turn 1 (320) | turn 2 (432) |" in table
    assert "| vllm | cold | 2.27 | 2.50 |" in table and "| relay-1 | warm | 0.30 | 0.31 |" in table
    assert "| vllm | 3000 | 400 | 2900 | 4.0 |" in table and "| relay-1 | 3000" not in table
    assert "Mixed workload" not in table and "Single stream" not in table
    assert "tokens/s at concurrency" not in table and "single-stream tokens/s" not in table  # no empty rows
    assert [p.name for p in tmp_path.glob("*.png")] == ["chat.png"]  # no process reported its memory


def test_memory_rows_without_ray():
    """--no-ray: every slice of every relay shares the gateway process, so there is one row for all of them."""
    result = {"runtime_overhead_bytes": 100,
              "systems": {"hf": _fake_system("hf", 1.0), "relay-1": _fake_system("relay-1", 1.0, shards=1),
                          "relay-2": _fake_system("relay-2", 1.0, shards=2)},
              "gateway_process": {"relays": ["relay-1", "relay-2"], "peak_rss_bytes": 2**33, "gpu_peak_bytes": 0}}
    rows = report.memory_rows(result)
    assert [r["process"] for r in rows] == ["hf", "gateway process (slices of relay-1, relay-2)"]
    assert rows[1]["weights"] == 3 * 2**30 and rows[1]["cache"] == 3 * 2**28
    assert rows[1]["budget"] == 3 * 2**30 + 3 * 2**28 + 100


class _FakeSystem:
    """A system under test that answers each phase with fixed figures, and fails on the phase named `fail_on`.

    `seen` records, as each phase starts, which phases table.md on disk already shows."""

    def __init__(self, name: str, out, fail_on: str | None = None) -> None:
        self.name, self.out, self.fail_on = name, out, fail_on
        self.header = {"system": name} if name == "hf" else {"system": name, "shards": 1}
        self.seen: list[str] = []

    async def run(self, phase) -> dict:
        table = self.out / "table.md"
        self.seen.append(table.read_text() if table.exists() else "")
        if phase.describe() == self.fail_on:
            raise RuntimeError("CUDA error: out of memory (a stand-in)")
        if phase.section == "single":
            return {"prompt_tokens": int(phase.key), "new_tokens": 4, "runs": 1, "ttft_ms": 40.0,
                    "ms_per_token_p50": 8.5, "ms_per_token_p95": 9.0, "ms_per_token_mean": 8.6}
        n = len(phase.requests)
        return {"concurrency": phase.concurrency, "requests": n, "output_tokens": 10 * n, "generated_tokens": 10 * n,
                "wall_s": 1.0, "tokens_per_s": 10.0 * n}

    async def snapshot(self) -> dict:
        if self.name == "hf":
            return {"memory": {"peak_rss_bytes": 3 * 2**30, "weight_bytes": 2**30, "gpu_peak_bytes": 0}}
        return {"slices": [{"index": 0, "layers": "0-4", "weight_bytes": 2**30, "cache_bytes": 2**28,
                            "peak_rss_bytes": 2**31}]}


def test_results_are_written_after_every_phase(tmp_path):
    """A run cut short (here a phase that raises) still leaves bench.json and table.md with every phase that
    finished, and says where it stopped; each phase starts with the previous one already on disk."""
    import asyncio

    cfg = BenchConfig(model="m", out=str(tmp_path), single_prompts=(16, 512), concurrency=(1, 4), settle_s=0)
    phases = workloads.plan(cfg, workloads.make_workloads(cfg, list(range(1000))))
    assert [p.describe() for p in phases][:3] == ["single stream, 16-token prompt", "single stream, 512-token prompt",
                                                  "mixed c=1 (2 requests)"]
    result = {"meta": {"model_name": "m", "parameters": 1_500_000_000, "dtype": "bfloat16", "device": "cuda:0"},
              "config": {**dataclasses.asdict(cfg), "num_threads": 16},
              "bandwidth": {"copy_gb_per_s": 4000.0, "weight_bytes": 3e9, "read_bytes_per_token": 3e9,
                            "floor_ms_per_token": 0.75, "ceiling_tokens_per_s": 1333.0},
              "runtime_overhead_bytes": 2**29}
    hf, relay = _FakeSystem("hf", tmp_path), _FakeSystem("relay-1", tmp_path, fail_on=phases[2].describe())
    with pytest.raises(RuntimeError, match="stand-in"):
        asyncio.run(bench_run.run_phases(cfg, phases, [hf, relay], result,
                                     lambda: {"gateway_process": {"relays": ["relay-1"], "peak_rss_bytes": 2**32}}))

    assert relay.seen[0] == ""  # nothing before the first phase; then each phase sees the one before it
    assert "| relay-1 | 16 |" in relay.seen[1] and "| relay-1 | 512 |" not in relay.seen[1]
    assert "partial: 1 of 5 phases done; next: single stream, 512-token prompt" in relay.seen[1]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["status"].startswith("failed in phase 3 of 5 (mixed c=1 (2 requests))")
    assert set(saved["systems"]["relay-1"]["single"]) == {"16", "512"}
    assert saved["systems"]["hf"]["mixed"]["1"]["requests"] == 2  # hf finished the phase relay-1 failed in
    assert "mixed" not in saved["systems"]["relay-1"] and "uniform" not in saved["systems"]["hf"]
    assert saved["ratios"]["relay-1"]["single"]["512"]["ms_per_token_p50"] == pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "**Not a complete run** (failed in phase 3 of 5" in table
    assert "| relay-1 | 512 | 40 | 8.5 | 9.0 | 8.6 | 1.00 | 1.00 |" in table
    assert "| hf | 20.00 | - |\n| relay-1 | - | - |\n" in table  # mixed c=1: hf finished it, relay-1 did not
    assert "Uniform workload" not in table
    assert "gateway process (slices of relay-1)" in table and "GPU peak MiB" in table


def test_precheck_names_each_missing_package(monkeypatch, tmp_path):
    """bench/gpu.sh's pre-check: every unmet requirement is reported with its fix, and the carried wheels
    that fix one are chosen, one per requirement."""
    from qwen_relay.bench import precheck
    from qwen_relay.bench.precheck import Requirement

    reqs = [Requirement("json", "no-such-dist-a", why="a", wheel="no_such_dist_a-"),
            Requirement("torch", "torch", (999,), why="b"),
            Requirement("torch", "torch", (), (1,), why="c"),
            Requirement("torch", "torch", (2,), why="met")]
    monkeypatch.setattr(precheck, "REQUIREMENTS", reqs)
    (tmp_path / "no_such_dist_a-1.0-py3-none-any.whl").touch()
    (tmp_path / "no_such_dist_a-2.0-py3-none-any.whl").touch()
    (tmp_path / "other-1.0-py3-none-any.whl").touch()
    assert [w.name for w in precheck.wheels_needed(tmp_path)] == ["no_such_dist_a-2.0-py3-none-any.whl"]
    errors = precheck.check_packages(tmp_path)
    assert len(errors) == 3
    assert errors[0].startswith("json (no-such-dist-a; a): not installed. Fix: bench/gpu.sh installs it from")
    assert "make gpu-wheels" in errors[0]  # git ignores the wheels: the fix says how to get them
    assert "torch (torch>=999; b): " in errors[1] and "is older than 999" in errors[1]
    assert "torch (torch<1; c): " in errors[2] and "is not below 1" in errors[2]
    assert "pip install 'torch<1'" in errors[2]


@pytest.mark.slow
def test_gpu_script_dry_run_without_ray(tmp_path):
    """bench/gpu.sh's whole path on this CPU, as on the GPU machine: Ray unimportable, qwen_relay through the
    script's symlinks; pre-check, checkpoint build, bench phase by phase, a table; and the tensor-parallel phase a
    machine with 2 GPUs runs (forced here with TENSOR_PARALLEL=2: CPU ranks, the rank process included)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    noray = tmp_path / "noray"
    noray.mkdir()
    (noray / "sitecustomize.py").write_text('import sys\n\nsys.modules["ray"] = None  # the GPU image has no Ray\n')
    out = tmp_path / "out"
    env = {**os.environ, "SHAPE": "tiny", "DEVICE": "cpu", "DTYPE": "float32", "OUT": str(out),
           "MODEL_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable, "FORCE_SYMLINKS": "1", "BUDGET": "900",
           "TENSOR_PARALLEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(noray), os.environ.get("PYTHONPATH")]))}
    tiny = ["--single-prompts", "4,12", "--single-new-tokens", "4", "--mixed-requests", "4", "--mixed-prompt", "3-12",
            "--mixed-new", "2-6", "--concurrency", "1,2", "--uniform-requests", "2", "--uniform-prompt", "8",
            "--uniform-new", "4", "--uniform-concurrency", "2", "--max-batch", "4", "--max-context", "64",
            "--threads", "1"]
    run = subprocess.run([str(root / "bench/gpu.sh"), *tiny], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "precheck: every import of the run is here" in run.stdout and "no Ray imported" in run.stdout
    for step in ("pre-check of every import the run needs: done in", "checkpoint: tiny: done in", "bench: tiny"):
        assert step in run.stderr
    assert "phase 5/5 done in" in run.stderr
    assert "**Single stream**" in run.stdout and "| relay-2 | 12 |" in run.stdout
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["status"] == "complete"
    assert set(saved["systems"]) == {"hf", "relay-1", "relay-2"} and not saved["config"]["use_ray"]
    assert (tmp_path / "cache" / "tiny-float32" / "config.json").exists()
    # What pipelining is worth: relay-2 against relay-1, and its slices' busy fraction and balance.
    one, two = saved["systems"]["relay-1"], saved["systems"]["relay-2"]
    pipeline = {r["key"]: r["value"] for r in saved["pipeline"]}
    assert 0 < pipeline["busy_fraction"] <= 1 and pipeline["slowest_over_mean"] >= 1
    ratio = two["uniform"]["tokens_per_s"] / one["uniform"]["tokens_per_s"]
    assert pipeline["uniform_2_over_1"] == pytest.approx(ratio)
    assert "Pipelining" in (out / "table.md").read_text()
    # The tensor-parallel phase: one slice at TP 1 and TP 2, single stream, its own table.
    assert "a tensor-parallel phase (1,2) follows the bench" in run.stdout
    assert "bench: tensor parallel 1,2, one slice, single stream, results in" in run.stderr
    tp = json.loads((out / "tp" / "bench.json").read_text())
    assert tp["meta"]["status"] == "complete" and set(tp["systems"]) == {"relay-1", "relay-1-tp2"}
    assert tp["systems"]["relay-1-tp2"]["tensor_parallel"] == 2 and set(tp["systems"]["relay-1-tp2"]) >= {"single"}
    assert {r["prompt"] for r in tp["tensor_parallel"]} == {"4", "12"}
    assert "| relay-1-tp2 | relay-1 | 12 |" in (out / "tp" / "table.md").read_text()


def test_decode_timing_runs_first_and_later_slices_on_a_warmed_up_runner(tiny_model):
    """bench/steps.py's timer (also decode_step's): a first slice fed tokens, a later one fed hidden states, on a
    runner as bench/steps.py's main leaves it (built and warmed up: its cache closed to steps until a reset)."""
    from qwen_relay.bench.steps import time_decode
    from qwen_relay.shards.runner import SliceRunner, SliceSpec

    for first, end in ((0, 3), (3, 5)):
        runner = SliceRunner(SliceSpec(model=str(tiny_model), first=first, end=end, device="cpu", max_slots=4,
                                       max_len=64, threads=1))
        runner.warmup()
        timed = time_decode(runner, rows=3, steps=4, prompt=8, warmup=1)
        assert timed.ms > 0 and timed.first_s > 0
        # The timer can be called again (decode_step times several batch sizes on one runner).
        assert time_decode(runner, rows=4, steps=2, prompt=8).ms > 0


def test_profile_step_prints_each_share(tiny_model, capsys):
    """bench/profile_step.py drives a real runner through its block tables; every label it prints is a share."""
    from qwen_relay.bench import profile_step

    profile_step.main(["--model", str(tiny_model), "--rows", "3", "--prompt", "20", "--steps", "2", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "3 row(s)" in lines[0]
    shares = {line[:13].strip(): float(line[13:].strip().rstrip("%")) for line in lines[1:]}
    assert {"linear", "attention", "kv cache", "sampler", "other"} <= set(shares)
    assert shares["linear"] > 0 and shares["attention"] > 0 and shares["sampler"] > 0


def test_the_bench_waits_for_a_busy_machine_to_settle_and_gives_up_in_bounded_time(monkeypatch, caplog):
    """A system that just finished may keep a core spinning (vLLM's CPU engine, about a second): the next one is
    measured only once the cores are quiet, or after the bound, said in a warning."""
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)
    readings = iter([(0, 0), (90, 100), (180, 200), (185, 300)])  # 90% busy, 90%, then 5%
    assert measure.wait_until_quiet("phase", timeout=60.0, window=0.0, read=lambda: next(readings)) >= 0
    assert next(readings, None) is None  # it read until the quiet window, and no further
    ticks = iter(range(0, 10**6, 100))
    with caplog.at_level("WARNING", logger="qwen_relay.bench.measure"):
        measure.wait_until_quiet("single on vllm", window=0.0, timeout=0.0,
                                 read=lambda: (t := next(ticks), t))  # always 100% busy
    assert "before single on vllm: the cores were still 100% busy" in caplog.text
    assert measure.wait_until_quiet("x", timeout=60.0, read=lambda: None) == 0.0  # no /proc/stat: nothing to wait for


def test_each_system_waits_for_quiet_cores_before_its_turn(tmp_path, monkeypatch):
    import asyncio

    from qwen_relay.server.cli import build_parser

    waits = []
    monkeypatch.setattr(bench_run, "wait_until_quiet", lambda what, timeout: waits.append((what, timeout)))
    cfg = BenchConfig(model="m", out=str(tmp_path), single_prompts=(16,), workloads=("single",), settle_s=4.0)
    phases = workloads.plan(cfg, workloads.make_workloads(cfg, list(range(1000))))
    result = {"meta": {"model_name": "m", "parameters": 1, "dtype": "float32", "device": "cpu"},
              "config": {**dataclasses.asdict(cfg), "num_threads": 2}, "runtime_overhead_bytes": 0,
              "bandwidth": {"copy_gb_per_s": 30.0, "weight_bytes": 1e9, "read_bytes_per_token": 1e9,
                            "floor_ms_per_token": 33.3, "ceiling_tokens_per_s": 30.0}}
    asyncio.run(bench_run.run_phases(cfg, phases, [_FakeSystem("hf", tmp_path), _FakeSystem("relay-1", tmp_path)],
                                     result))
    assert waits == [("single stream, 16-token prompt on hf", 4.0), ("single stream, 16-token prompt on relay-1", 4.0)]
    assert cli.config_from_args(build_parser().parse_args(["bench", "--model", "m", "--settle", "0"])).settle_s == 0
