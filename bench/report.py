"""The report: ratios against hf and against vLLM, memory against its budget, the issue's targets and what
pipelining is worth, as bench.json, table.md and plots, from a whole result or from the phases that finished."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .measure import MIB
from .workloads import BASELINES

# Peak memory target: peak RSS <= MEMORY_FACTOR x (weights + KV cache + fixed runtime overhead).
MEMORY_FACTOR = 1.3
TARGETS = {"single_ms_per_token": 1.10, "mixed_tokens_per_s": 1.5, "uniform_tokens_per_s": 0.95}
# Pipelining (--threads-per-slice): relay-2 against relay-1 and against hf-packed, each slice one thread.
# Tensor parallelism (--tensor-parallel 1,N) has no target: relay-S-tpN against relay-S is reported as measured.
PIPELINE_TARGETS = {"uniform_2_over_1": (">=", 1.7), "mixed_2_over_1": (">=", 1.6), "busy_fraction": (">=", 0.85),
                    "single_2_over_1": ("<=", 1.05), "slowest_over_mean": ("<=", 1.10),
                    "mixed_over_hf_packed": (">=", 1.5), "uniform_over_hf_packed": (">=", 1.0),
                    "single_over_hf_packed": ("<=", 1.05)}
# CPU slices that share the machine's cores (the default serve, one step in flight): not pipelining, so the
# goal is that the slices cost nothing, relay-2 doing relay-1's work in relay-1's time.
SHARED_CORE_TARGETS = {"uniform_2_over_1": (">=", 0.95), "mixed_2_over_1": (">=", 0.95),
                       "single_2_over_1": ("<=", 1.10)}
# The peer (--baselines vllm): each relay at least as fast on every workload, at the same dtype.
PEER_TARGETS = {"single": ("<=", 1.0), "mixed": (">=", 1.0), "uniform": (">=", 1.0)}


def relay_names(result: dict[str, Any]) -> list[str]:
    return [n for n in result["systems"] if n not in BASELINES]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """relay / hf for every figure both sides have (so far), per system."""
    hf = result["systems"].get("hf", {})
    ratios: dict[str, Any] = {}
    for name, sysres in result["systems"].items():
        if name == "hf":
            continue
        r: dict[str, Any] = {"single": {}, "mixed": {}, "uniform": None}
        for length, s in sysres.get("single", {}).items():
            if (h := hf.get("single", {}).get(length)) is not None:
                r["single"][length] = {
                    "ttft": _ratio(s["ttft_ms"], h["ttft_ms"]),
                    "ms_per_token_p50": _ratio(s["ms_per_token_p50"], h["ms_per_token_p50"]),
                    "ms_per_token_p95": _ratio(s["ms_per_token_p95"], h["ms_per_token_p95"]),
                    "ms_per_token_mean": _ratio(s["ms_per_token_mean"], h["ms_per_token_mean"]),
                }
        for c, m in sysres.get("mixed", {}).items():
            if (h := hf.get("mixed", {}).get(c)) is not None:
                r["mixed"][c] = _ratio(m["tokens_per_s"], h["tokens_per_s"])
        if "uniform" in sysres and "uniform" in hf:
            r["uniform"] = _ratio(sysres["uniform"]["tokens_per_s"], hf["uniform"]["tokens_per_s"])
        ratios[name] = r
    return ratios


def memory_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per process: peak, what it must hold, and peak / (weights + cache + overhead)."""
    overhead = result["runtime_overhead_bytes"]
    rows = []
    for name in BASELINES:
        if "memory" in result["systems"].get(name, {}):
            hf = result["systems"][name]["memory"]
            rows.append({"process": name, "peak": hf["peak_rss_bytes"], "weights": hf["weight_bytes"], "cache": None,
                         "overhead": hf.get("overhead_bytes", overhead), "gpu_peak": hf.get("gpu_peak_bytes") or None})
    gateway = result.get("gateway_process")
    if gateway:  # --no-ray: every slice of every relay in this process
        names = gateway["relays"]
        slices = [s for n in names for s in result["systems"][n].get("slices", [])]
        rows.append({"process": f"gateway process (slices of {', '.join(names)})", "peak": gateway["peak_rss_bytes"],
                     "weights": sum(s["weight_bytes"] for s in slices),
                     "cache": sum(s["cache_bytes"] for s in slices), "overhead": overhead,
                     "gpu_peak": gateway.get("gpu_peak_bytes") or None})
        return _with_budget(rows)
    for name in relay_names(result):
        # A tensor-parallel slice reports its group's weights and cache but rank 0's peak: compare like with like.
        n = result["systems"][name].get("tensor_parallel", 1)
        rank = f", rank 0 of {n}" if n > 1 else ""
        for s in result["systems"][name].get("slices", []):
            rows.append({"process": f"{name} slice {s['index']} (layers {s['layers']}{rank})",
                         "peak": s["peak_rss_bytes"], "weights": s["weight_bytes"] // n,
                         "cache": s["cache_bytes"] // n, "overhead": overhead, "gpu_peak": None})
    return _with_budget(rows)


def _with_budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["budget"] = (row["weights"] + (row["cache"] or 0) + row["overhead"])
        row["ratio"] = row["peak"] / row["budget"] if row["budget"] else None
    return rows


def target_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated for the largest relay that ran (2 slices by default)."""
    relays = relay_names(result)
    if not relays:
        return []
    name = max(relays, key=lambda n: result["systems"][n]["shards"])
    ratios = result["ratios"][name]
    cfg = result["config"]
    rows: list[dict[str, Any]] = []
    if "hf" in result["systems"]:  # the targets against generate(): judged only where it ran
        for length, r in ratios["single"].items():
            value = r["ms_per_token_p50"]
            rows.append({"target": f"{name} single-stream ms/token p50, {length}-token prompt", "value": value,
                         "goal": f"<= {TARGETS['single_ms_per_token']:.2f} x hf",
                         "met": _judge("<=", TARGETS["single_ms_per_token"], value)})
        top = str(max(cfg["concurrency"]))
        value = ratios["mixed"].get(top)
        if "mixed" in cfg["workloads"]:
            rows.append({"target": f"{name} mixed tokens/s at concurrency {top}", "value": value,
                         "goal": f">= {TARGETS['mixed_tokens_per_s']:.2f} x hf static batching",
                         "met": _judge(">=", TARGETS["mixed_tokens_per_s"], value)})
        value = ratios["uniform"]
        if "uniform" in cfg["workloads"]:
            rows.append({"target": f"{name} uniform tokens/s at concurrency {cfg['uniform_concurrency']}",
                         "value": value,
                         "goal": f">= {TARGETS['uniform_tokens_per_s']:.2f} x hf batch {cfg['uniform_concurrency']}",
                         "met": _judge(">=", TARGETS["uniform_tokens_per_s"], value)})
    for row in memory_rows(result):
        if row["process"].startswith(name + " "):
            rows.append({"target": f"{row['process']} peak memory", "value": row["ratio"],
                         "goal": f"<= {MEMORY_FACTOR} x (weights + KV cache + overhead)",
                         "met": _judge("<=", MEMORY_FACTOR, row["ratio"])})
    return rows


def _headline(sysres: dict[str, Any], cfg: dict[str, Any]) -> dict[str, float | None]:
    """A system's three figures the relays are judged by: single-stream ms/token (mean, shortest prompt), mixed
    tokens/s at the top concurrency, uniform tokens/s."""
    top, short = str(max(cfg["concurrency"])), str(min(cfg["single_prompts"]))
    return {"single": sysres.get("single", {}).get(short, {}).get("ms_per_token_mean"),
            "mixed": sysres.get("mixed", {}).get(top, {}).get("tokens_per_s"),
            "uniform": sysres.get("uniform", {}).get("tokens_per_s")}


def _shared_cores(result: dict[str, Any]) -> bool:
    """CPU slices sharing the machine's cores (one step in flight), not one device each."""
    device = result.get("meta", {}).get("device", "cpu")
    return not result["config"].get("threads_per_slice") and not device.startswith("cuda")


def pipeline_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What pipelining is worth: the largest relay against relay-1 and hf-packed, its slices' busy fraction
    on the uniform workload (forward time summed over slices / (slices x wall)) and its slowest slice's
    forward time against the mean, judged against `PIPELINE_TARGETS` where each slice stands for one device
    (`--threads-per-slice`, GPUs), against `SHARED_CORE_TARGETS` where CPU slices share the cores."""
    systems, cfg = result["systems"], result["config"]
    goals = SHARED_CORE_TARGETS if _shared_cores(result) else PIPELINE_TARGETS
    relays = [n for n in relay_names(result) if systems[n].get("tensor_parallel", 1) == 1]
    if "relay-1" not in systems or len(relays) < 2:
        return []
    name = max(relays, key=lambda n: systems[n]["shards"])
    one, many, n = systems["relay-1"], systems[name], systems[name]["shards"]
    top, short, uc = str(max(cfg["concurrency"])), str(min(cfg["single_prompts"])), cfg["uniform_concurrency"]
    forward = many.get("uniform", {}).get("slice_forward_s") or []
    ours, base = _headline(many, cfg), _headline(one, cfg)
    values = {
        "uniform_2_over_1": (f"{name} / relay-1 uniform tokens/s (c={uc})", _ratio(ours["uniform"], base["uniform"])),
        "mixed_2_over_1": (f"{name} / relay-1 mixed tokens/s (c={top})", _ratio(ours["mixed"], base["mixed"])),
        "busy_fraction": (f"{name} slice busy fraction, uniform workload",
                          _ratio(sum(forward), n * many["uniform"]["wall_s"]) if forward else None),
        "single_2_over_1": (f"{name} / relay-1 single-stream ms/token (mean, {short}-token prompt)",
                            _ratio(ours["single"], base["single"])),
        "slowest_over_mean": (f"{name} slowest slice's forward time / mean, uniform workload",
                              _ratio(max(forward), sum(forward) / len(forward)) if forward else None),
    }
    if "hf-packed" in systems:
        packed = _headline(systems["hf-packed"], cfg)
        values["mixed_over_hf_packed"] = (f"{name} / hf-packed mixed tokens/s (c={top})",
                                          _ratio(ours["mixed"], packed["mixed"]))
        values["uniform_over_hf_packed"] = (f"{name} / hf-packed uniform tokens/s (c={uc})",
                                            _ratio(ours["uniform"], packed["uniform"]))
        values["single_over_hf_packed"] = (f"{name} / hf-packed single-stream ms/token (mean, {short}-token prompt)",
                                           _ratio(ours["single"], packed["single"]))
    rows = []
    for key, (label, value) in values.items():
        if key not in goals:  # a figure without a goal here (a busy fraction with one step in flight)
            rows.append({"key": key, "target": label, "value": value, "goal": "-", "met": None})
            continue
        op, goal = goals[key]
        rows.append({"key": key, "target": label, "value": value, "goal": f"{op} {goal:.2f}",
                     "met": _judge(op, goal, value)})
    return rows


def _met(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


def _judge(op: str, goal: float, value: float | None) -> bool:
    return value is not None and (value >= goal if op == ">=" else value <= goal)


def peer_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each relay against vLLM in this run: single-stream ms/token (mean, shortest prompt), mixed tokens/s at
    the top concurrency and uniform tokens/s, as relay / vllm, judged against `PEER_TARGETS`."""
    systems, cfg = result["systems"], result["config"]
    if "vllm" not in systems:
        return []
    theirs, rows = _headline(systems["vllm"], cfg), []
    for name in relay_names(result):
        ours = _headline(systems[name], cfg)
        for key, (op, goal) in PEER_TARGETS.items():
            if ours[key] is None or theirs[key] is None:
                continue
            value = _ratio(ours[key], theirs[key])
            rows.append({"system": name, "workload": key, "relay": ours[key], "vllm": theirs[key], "value": value,
                         "goal": f"{op} {goal:.2f}", "met": _judge(op, goal, value)})
    return rows


def step_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Engine steps per load workload (mixed at the top concurrency, uniform), for the systems that count them
    (the relays, vLLM): equal step counts put a gap in what a step costs, unequal ones in the scheduling."""
    systems, cfg = result["systems"], result["config"]
    top, rows = str(max(cfg["concurrency"])), []
    for name, sysres in systems.items():
        for workload, figures in (("mixed", sysres.get("mixed", {}).get(top)), ("uniform", sysres.get("uniform"))):
            if figures and figures.get("engine_steps"):
                steps = figures["engine_steps"]
                rows.append({"system": name, "workload": workload, "steps": steps,
                             "tokens_per_step": figures["output_tokens"] / steps,
                             "ms_per_step": 1000 * figures["wall_s"] / steps})
    return rows


def tensor_parallel_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What N ranks per slice buy a single stream: each relay-S-tpN against relay-S (the same slices, TP 1, same
    run), per prompt length: ms/token p50 and TTFT, and their ratios (below 1: faster)."""
    systems, rows = result["systems"], []
    for name in relay_names(result):
        n = systems[name].get("tensor_parallel", 1)
        base = f"relay-{systems[name]['shards']}"
        if n == 1 or base not in systems:
            continue
        for length, s in systems[name].get("single", {}).items():
            if (b := systems[base].get("single", {}).get(length)) is not None:
                rows.append({"system": name, "baseline": base, "tensor_parallel": n, "prompt": length,
                             "ms_per_token_p50": s["ms_per_token_p50"],
                             "baseline_ms_per_token_p50": b["ms_per_token_p50"],
                             "ms_per_token_ratio": _ratio(s["ms_per_token_p50"], b["ms_per_token_p50"]),
                             "ttft_ratio": _ratio(s["ttft_ms"], b["ttft_ms"])})
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def render_table(result: dict[str, Any]) -> str:
    """The Markdown report: single stream, throughput, memory, bandwidth floor, targets. A partial result (a
    run cut short) gives the same tables with only the phases that finished, under a status line."""
    systems = result["systems"]
    ratios = result["ratios"]
    cfg = result["config"]
    meta = result["meta"]
    out = [f"Model `{meta['model_name']}` ({meta['parameters'] / 1e6:.0f}M parameters, {meta['dtype']}, "
           f"{meta['device']}), {cfg['num_threads']} torch threads per process; every ratio is relay / hf "
           "from this run.", ""]
    status = meta.get("status", "complete")
    if status != "complete":
        out += [f"**Not a complete run** ({status}): only the phases that finished are below.", ""]

    lengths = [str(n) for n in cfg["single_prompts"]]
    rows = [(length, name, sysres["single"][length]) for length in lengths for name, sysres in systems.items()
            if length in sysres.get("single", {})]
    if rows:
        out += ["**Single stream** (greedy, `ignore_eos`, "
                f"{cfg['single_new_tokens']} new tokens, {cfg['single_repeats']} runs; ms/token = gaps between "
                "token arrivals)", "",
                "| system | prompt tokens | TTFT ms | ms/token p50 | ms/token p95 | ms/token mean | TTFT ratio "
                "| p50 ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for length, name, s in rows:
        r = ratios.get(name, {}).get("single", {}).get(length, {})
        out.append(f"| {name} | {length} | {_f(s['ttft_ms'], 0)} | {_f(s['ms_per_token_p50'])} | "
                   f"{_f(s['ms_per_token_p95'])} | {_f(s['ms_per_token_mean'])} | {_f(r.get('ttft'), 2)} | "
                   f"{_f(r.get('ms_per_token_p50'), 2)} |")

    conc = [str(c) for c in cfg["concurrency"] if any(str(c) in s.get("mixed", {}) for s in systems.values())]
    if conc:
        requests = {c: next(s["mixed"][c]["requests"] for s in systems.values() if c in s.get("mixed", {}))
                    for c in conc}
        out += ["", f"**Mixed workload, aggregate output tokens/s** (prompts {cfg['mixed_prompt'][0]}-"
                f"{cfg['mixed_prompt'][1]}, new tokens {cfg['mixed_new'][0]}-{cfg['mixed_new'][1]}; hf: static "
                "left-padded batches of size c; counted: each request's own new tokens)", "",
                "| system | " + " | ".join(f"c={c} ({requests[c]} req)" for c in conc)
                + " | " + " | ".join(f"ratio c={c}" for c in conc) + " |",
                "|---|" + "---:|" * (2 * len(conc))]
        for name, sysres in systems.items():
            vals = " | ".join(_f(sysres.get("mixed", {}).get(c, {}).get("tokens_per_s"), 2) for c in conc)
            rats = " | ".join(_f(ratios.get(name, {}).get("mixed", {}).get(c), 2) for c in conc)
            out.append(f"| {name} | {vals} | {rats} |")
        hf_mixed = systems.get("hf", {}).get("mixed", {})
        waste = [f"c={c}: {hf_mixed[c]['generated_tokens'] - hf_mixed[c]['output_tokens']}"
                 for c in conc if c in hf_mixed]
        if waste:
            out += ["", f"hf tokens generated past a request's own length (waste, not counted): {', '.join(waste)}."]

    uc = cfg["uniform_concurrency"]
    if any("uniform" in s for s in systems.values()):
        out += ["", f"**Uniform workload** ({cfg['uniform_requests']} requests, {cfg['uniform_prompt']}-token "
                f"prompts, {cfg['uniform_new']} new tokens; relay concurrency {uc}, hf batch {uc})", "",
                "| system | tokens/s | wall s | ratio |", "|---|---:|---:|---:|"]
        for name, sysres in systems.items():
            u = sysres.get("uniform", {})
            out.append(f"| {name} | {_f(u.get('tokens_per_s'), 2)} | {_f(u.get('wall_s'))} | "
                       f"{_f(ratios.get(name, {}).get('uniform'), 2)} |")

    out += chat_table(systems, cfg) + shared_prefix_table(systems, cfg)

    gpu = meta["device"].startswith("cuda")
    memory = memory_rows(result) if "runtime_overhead_bytes" in result else []
    if memory:
        out += ["", f"**Peak memory** (resident; fixed runtime overhead of a slice = "
                f"{_mib(result['runtime_overhead_bytes'])} MiB, measured as the peak of a "
                f"{'Ray actor' if cfg['use_ray'] else 'process'} that imports what a slice imports and loads no "
                "weights; hf's is its own process's peak before loading; "
                f"target: peak <= {MEMORY_FACTOR} x (weights + KV cache + overhead); KV cache: the block pool "
                "every slice holds, serve's default of 32,768 tokens)", "",
                "| process | peak MiB | weights MiB | KV cache MiB | overhead MiB | sum MiB | peak / sum |"
                + (" GPU peak MiB |" if gpu else ""), "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for row in memory:
        line = (f"| {row['process']} | {_mib(row['peak'])} | {_mib(row['weights'])} | {_mib(row['cache'])} | "
                f"{_mib(row['overhead'])} | {_mib(row['budget'])} | {_f(row['ratio'], 2)} |")
        out.append(line + (f" {_mib(row['gpu_peak'])} |" if gpu else ""))

    bw = result["bandwidth"]
    out += ["", f"**Memory-bandwidth floor**: copy bandwidth {bw['copy_gb_per_s']:.1f} GB/s (read + write), "
            f"{bw['read_bytes_per_token'] / 1e9:.2f} GB of weights read per decode step -> floor "
            f"{bw['floor_ms_per_token']:.1f} ms/token, ceiling {bw['ceiling_tokens_per_s']:.1f} tokens/s per "
            "stream (a batch of B shares one weight read: B x that).", ""]
    short = str(min(cfg["single_prompts"]))
    against_floor = systems if {"single", "uniform"} & set(cfg["workloads"]) else {}
    if against_floor:
        out += [f"| system | single-stream tokens/s ({short}-token prompt) | % of ceiling | "
                f"uniform tokens/s (c={uc}) | % of {uc} x ceiling |", "|---|---:|---:|---:|---:|"]
    for name, sysres in against_floor.items():
        mean = sysres.get("single", {}).get(short, {}).get("ms_per_token_mean")
        tps = 1000 / mean if mean else None
        uniform = sysres.get("uniform", {}).get("tokens_per_s")
        out.append(f"| {name} | {_f(tps, 2)} | {_f(100 * tps / bw['ceiling_tokens_per_s'] if tps else None, 0)} | "
                   f"{_f(uniform, 2)} | "
                   f"{_f(100 * uniform / (uc * bw['ceiling_tokens_per_s']) if uniform else None, 0)} |")

    rows = target_rows(result)
    if rows:
        out += ["", "**Targets**", "", "| target | value | goal | met |", "|---|---:|---|---|"]
        out += [f"| {r['target']} | {_f(r['value'], 2)} | {r['goal']} | {_met(r['met'])} |" for r in rows]
    rows = result.get("pipeline") or []
    if rows:
        mode = ("each slice one thread and one Ray CPU (`--threads-per-slice`); baselines "
                f"{cfg['num_threads']} threads" if cfg.get("threads_per_slice") else
                f"every slice {cfg['num_threads']} threads"
                + (", sharing the cores, one step in flight" if _shared_cores(result) else ""))
        out += ["", f"**Pipelining** ({mode})", "", "| figure | value | goal | met |", "|---|---:|---|---|"]
        out += [f"| {r['target']} | {_f(r['value'], 2)} | {r['goal']} | {_met(r['met'])} |" for r in rows]
    rows = result.get("peer") or []
    if rows:
        short, top = min(cfg["single_prompts"]), max(cfg["concurrency"])
        units = {"single": f"ms/token mean, {short}-token prompt", "mixed": f"tokens/s, c={top}",
                 "uniform": f"tokens/s, c={cfg['uniform_concurrency']}"}
        cores = systems.get("vllm", {}).get("cpu_cores")
        bound = f"; vLLM computed on CPU cores {cores}" if cores is not None else ""
        out += ["", f"**Against vLLM** (this run, same checkpoint, dtype and requests; relay / vllm{bound})", "",
                "| system | workload | relay | vllm | ratio | goal | met |", "|---|---|---:|---:|---:|---|---|"]
        out += [f"| {r['system']} | {r['workload']} ({units[r['workload']]}) | {_f(r['relay'])} | {_f(r['vllm'])} | "
                f"{_f(r['value'], 2)} | {r['goal']} | {_met(r['met'])} |" for r in rows]
    rows = step_rows(result)
    if rows:
        out += ["", "**Engine steps** (steps each system took for a load workload; wall time / steps)", "",
                "| system | workload | steps | new tokens / step | ms / step |", "|---|---|---:|---:|---:|"]
        out += [f"| {r['system']} | {r['workload']} | {r['steps']} | {_f(r['tokens_per_step'])} | "
                f"{_f(r['ms_per_step'])} |" for r in rows]
    rows = result.get("tensor_parallel") or []
    if rows:
        out += ["", "**Tensor parallelism** (single stream; each slice a group of N ranks against the same slices "
                "at TP 1, this run; ratio below 1: faster)", "",
                "| system | against | prompt tokens | ms/token p50 | TP 1 ms/token p50 | ms/token ratio | TTFT ratio |",
                "|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['system']} | {r['baseline']} | {r['prompt']} | {_f(r['ms_per_token_p50'])} | "
                f"{_f(r['baseline_ms_per_token_p50'])} | {_f(r['ms_per_token_ratio'], 2)} | {_f(r['ttft_ratio'], 2)} |"
                for r in rows]
    return "\n".join(out) + "\n"


def chat_table(systems: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Time to first token per turn of the chat, cold and warm, one row per system and run."""
    rows = [(name, run, sysres["chat"][run]) for name, sysres in systems.items()
            for run in ("cold", "warm") if run in sysres.get("chat", {})]
    if not rows:
        return []
    prompts = rows[0][2]["prompt_tokens"]
    out = ["", f"**Chat** (one conversation by token ids: a {cfg['chat_system']}-token system prompt, then per turn "
           f"{cfg['chat_user']} new user tokens and a {cfg['chat_reply']}-token reply; each turn's prompt = the last "
           "prompt + the reply the system gave + the new tokens; time to first token per turn, s; cold, then the "
           "same conversation again: warm)", "",
           "| system | run | " + " | ".join(f"turn {i} ({n})" for i, n in enumerate(prompts, 1)) + " |",
           "|---|---|" + "---:|" * len(prompts)]
    for name, run, chat in rows:
        out.append(f"| {name} | {run} | " + " | ".join(_f(t / 1000, 2) for t in chat["ttft_ms"]) + " |")
    return out


def shared_prefix_table(systems: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Time to first token of users who share one system prompt: the first user's, then the p50 over all."""
    rows = [(name, sysres["shared-prefix"]) for name, sysres in systems.items() if "shared-prefix" in sysres]
    if not rows:
        return []
    out = ["", f"**Shared prefix** ({cfg['shared_users']} users, each a {cfg['shared_system']}-token system prompt "
           f"they share + {cfg['shared_user']} tokens of their own, {cfg['shared_new']} new tokens, "
           f"{cfg['shared_concurrency']} at a time; time to first token, ms)", "",
           "| system | first user | p50 | p95 | wall s |", "|---|---:|---:|---:|---:|"]
    for name, v in rows:
        out.append(f"| {name} | {_f(v['ttft_ms_all'][0], 0)} | {_f(v['ttft_ms_p50'], 0)} | "
                   f"{_f(v['ttft_ms_p95'], 0)} | {_f(v['wall_s'])} |")
    return out


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png (tokens/s by concurrency), latency.png (ms/token and TTFT), chat.png (TTFT per turn),
    memory.png: each one whose workloads ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    cfg = result["config"]
    paths = []

    if any("mixed" in s or "uniform" in s for s in systems.values()):
        paths.append(_throughput_plot(plt, systems, cfg, out))
    names = [n for n, s in systems.items() if "single" in s]
    if names:
        paths.append(_latency_plot(plt, systems, names, cfg, out))
    names = [n for n, s in systems.items() if "chat" in s]
    if names:
        paths.append(_chat_plot(plt, systems, names, out))
    rows = memory_rows(result)
    if rows:
        paths.append(_memory_plot(plt, rows, out))
    return paths


def _throughput_plot(plt: Any, systems: dict[str, Any], cfg: dict[str, Any], out: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, sysres in systems.items():
        cs = sorted(int(c) for c in sysres.get("mixed", {}))
        ax1.plot(cs, [sysres["mixed"][str(c)]["tokens_per_s"] for c in cs], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(cfg["concurrency"], [str(c) for c in cfg["concurrency"]])
    ax1.set_xlabel("concurrency (hf: static batch size)")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("mixed workload")
    ax1.legend()
    names = [n for n, s in systems.items() if "uniform" in s]
    ax2.bar(names, [systems[n]["uniform"]["tokens_per_s"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax2.set_ylabel("output tokens/s")
    ax2.set_title(f"uniform workload, concurrency {cfg['uniform_concurrency']}")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    return out / "throughput.png"


def _latency_plot(plt: Any, systems: dict[str, Any], names: list[str], cfg: dict[str, Any], out: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = [str(n) for n in cfg["single_prompts"]]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(lengths))]
        p50 = [systems[name]["single"][n]["ms_per_token_p50"] or 0 for n in lengths]
        p95 = [systems[name]["single"][n]["ms_per_token_p95"] or 0 for n in lengths]
        ax1.bar(xs, p50, width, label=name, color=f"C{i}",
                yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]], capsize=3)
        ax2.bar(xs, [systems[name]["single"][n]["ttft_ms"] or 0 for n in lengths], width, label=name, color=f"C{i}")
    for ax, title in ((ax1, "ms per output token (p50, whisker p95)"), (ax2, "time to first token, ms")):
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(lengths))],
                      [f"{n}-token prompt" for n in lengths])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return out / "latency.png"


def _chat_plot(plt: Any, systems: dict[str, Any], names: list[str], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        for run, style in (("cold", "-"), ("warm", "--")):
            if run in systems[name]["chat"]:
                chat = systems[name]["chat"][run]
                ax.plot(chat["prompt_tokens"], [t / 1000 for t in chat["ttft_ms"]], style, marker="o",
                        color=f"C{i}", label=f"{name} {run}")
    ax.set_xlabel("prompt tokens (the turn's whole history)")
    ax.set_ylabel("time to first token, s")
    ax.set_title("chat, turn by turn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "chat.png", dpi=110)
    plt.close(fig)
    return out / "chat.png"


def _memory_plot(plt: Any, rows: list[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["peak"] / MIB for r in rows], 0.4, label="peak RSS")
    ax.bar([x + 0.4 for x in xs], [r["budget"] / MIB for r in rows], 0.4, label="weights + KV + overhead")
    ax.set_xticks([x + 0.2 for x in xs], [r["process"].replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    return out / "memory.png"


def write_tables(result: dict[str, Any], out: Path) -> str:
    """bench.json and table.md into `out`, from a whole result or a partial one; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    result["ratios"] = compute_ratios(result)
    result["targets"] = target_rows(result)
    result["pipeline"] = pipeline_rows(result)
    result["peer"] = peer_rows(result)
    result["tensor_parallel"] = tensor_parallel_rows(result)
    table = render_table(result)
    _write_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(out / "table.md", table)
    return table


def _write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: a run killed while writing leaves the previous phase's file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(result: dict[str, Any], out: Path) -> str:
    """bench.json, table.md and the plots into `out` (a whole result); returns the table."""
    table = write_tables(result, out)
    write_plots(result, out)
    return table
