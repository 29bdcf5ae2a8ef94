"""The peer: vLLM's OpenAI server as a baseline (`--baselines vllm --vllm-python PATH`), on the same checkpoint,
workloads and dtype as the relay.

vLLM needs its own environment (its CPU build pins a torch and a transformers of its own), so it runs as a
subprocess of the Python the user names, never imported here. Requests go by token ids with `ignore_eos`, as
the relay's do, streamed over HTTP and read with asyncio streams (a client with no cost of its own); vLLM
returns each chunk's token ids (`return_token_ids`), so tokens are counted, not chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from .measure import resolve_device_dtype
from .streaming import run_phase, stream_load
from .workloads import BenchConfig, Phase, Request

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 900.0  # vLLM's CPU build compiles its model graph at startup: minutes on 2 cores
# vLLM's CPU KV cache, in GiB (its default is 4); an environment value wins.
KVCACHE_SPACE_GIB = "2"
HTTP_TIMEOUT_S = 10.0  # a GET of /health or /metrics


def vllm_version(python: str) -> str:
    """vLLM's version in `python`'s environment; raises RuntimeError with the reason it cannot be used."""
    if not python:
        raise RuntimeError("no --vllm-python given (a Python whose environment has vLLM; docs/benchmarks.md)")
    try:
        done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{python} does not run: {e}") from e
    if done.returncode != 0:
        raise RuntimeError(f"{python} cannot import vllm: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip().splitlines()[-1]


def compute_cores(server_log: str) -> str | None:
    """The cores vLLM's CPU worker bound its threads to, from its log (`core ids=[0]`): by default it reserves
    a core for its engine and API server: one of a 2-core machine's two computes."""
    found = re.findall(r"core ids=\[([0-9, ]*)\]", server_log)
    return found[-1] if found else None


def steps_from_metrics(text: str) -> int | None:
    """The engine steps in a vLLM `/metrics` page (summed over engines), or None where it has no such metric."""
    counts = re.findall(r"^vllm:iteration_tokens_total_count(?:{[^}]*})? ([0-9.e+]+)$", text, re.M)
    return round(sum(float(c) for c in counts)) if counts else None


def server_command(cfg: BenchConfig, port: int) -> list[str]:
    """vLLM's OpenAI server on the bench's checkpoint, dtype, context and batch size."""
    dtype = str(resolve_device_dtype(cfg.device, cfg.dtype)[1]).removeprefix("torch.")
    return [cfg.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model,
            "--served-model-name", "bench", "--dtype", dtype, "--max-model-len", str(cfg.max_context),
            "--max-num-seqs", str(cfg.max_batch), "--seed", str(cfg.seed), "--host", "127.0.0.1",
            "--port", str(port), *cfg.vllm_args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM's server in a subprocess for the whole run; its log in `<out>/vllm-server.log`."""

    name = "vllm"

    def __init__(self, cfg: BenchConfig, process: subprocess.Popen, port: int, header: dict[str, Any]) -> None:
        self.cfg = cfg
        self.process = process
        self.port = port
        self.header = header

    @classmethod
    async def start(cls, cfg: BenchConfig, version: str) -> VllmServer:
        port = _free_port()
        command = server_command(cfg, port)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KVCACHE_SPACE_GIB)}
        logfile = Path(cfg.out) / "vllm-server.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with logfile.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        header = {"system": cls.name, "version": version, "command": command,
                  "kvcache_space_gib": env["VLLM_CPU_KVCACHE_SPACE"], "log": str(logfile)}
        server = cls(cfg, process, port, header)
        try:
            await server._wait_ready(logfile)
            await stream_load(server.stream, [Request(tuple(range(1, 9)), 2)], 1)  # warm-up through the whole path
        except BaseException:
            server.close()
            raise
        header["startup_s"] = time.perf_counter() - started
        header["cpu_cores"] = compute_cores(logfile.read_text(errors="replace"))
        log.info("vllm %s: up in %.1f s on port %d, computing on CPU cores %s", version, header["startup_s"], port,
                 header["cpu_cores"] or "(not in its log)")
        return server

    async def _wait_ready(self, logfile: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"vLLM's server exited with {self.process.returncode}:\n{tail}")
            if await self._healthy():
                return
            await asyncio.sleep(1.0)
        raise TimeoutError(f"vLLM's server was not ready in {STARTUP_TIMEOUT_S:.0f} s (its log: {logfile})")

    async def _healthy(self) -> bool:
        got = await self._get("/health")
        return got is not None and got[0] == 200

    async def _get(self, path: str) -> tuple[int, str] | None:
        """GET `path` from the server: (status, body), or None if it cannot be reached or does not answer within
        `HTTP_TIMEOUT_S`. HTTP/1.0, so the body comes whole (no chunking) and the server closes after it."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return None
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            return None
        finally:
            writer.close()
        head, _, body = response.decode(errors="replace").partition("\r\n\r\n")
        status = head.split(maxsplit=2)[1:2]
        return (int(status[0]), body) if status and status[0].isdigit() else None

    async def stream(self, request: Request) -> AsyncIterator[Sequence[int]]:
        """The request as a streamed completion by token ids, greedy with `ignore_eos` (a `TokenStream`)."""
        body = json.dumps({"model": "bench", "prompt": list(request.prompt_token_ids),
                           "max_tokens": request.max_new_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True, "return_token_ids": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            status = await reader.readline()
            if status.split()[1:2] != [b"200"]:
                raise RuntimeError(f"vLLM answered {status.decode().strip()}: {(await reader.read()).decode()[:500]}")
            while await reader.readline() != b"\r\n":  # headers; the body is chunked
                pass
            pending = b""
            while size := int((await reader.readline()).strip(), 16):
                pending += (await reader.readexactly(size + 2))[:-2]
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        ids = [i for choice in json.loads(event[6:])["choices"] for i in choice.get("token_ids") or []]
                        if ids:
                            yield ids
        finally:
            writer.close()

    async def run(self, phase: Phase) -> dict[str, Any]:
        """The phase's figures, plus how many engine steps vLLM took for them (its `/metrics`)."""
        before = await self.engine_steps()
        value = await run_phase(self.stream, phase, self.cfg.single_repeats)
        after = await self.engine_steps()
        if before is not None and after is not None:
            value["engine_steps"] = after - before
        return value

    async def engine_steps(self) -> int | None:
        """Steps vLLM's engine has run: the count of its tokens-per-iteration histogram; None without it."""
        got = await self._get("/metrics")
        if got is None or got[0] != 200:
            log.warning("vllm: no step count (its /metrics answered %s)", "nothing" if got is None else got[0])
            return None
        return steps_from_metrics(got[1])

    async def snapshot(self) -> dict[str, Any]:
        """Peak resident memory of the server's processes (the API server, its engine core, its worker)."""
        return {"server_peak_rss_bytes": _tree_peak_rss(self.process.pid)}

    def close(self) -> None:
        """SIGTERM to the server's process group (its engine and worker too), SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _tree_peak_rss(pid: int) -> int:
    """Sum of VmHWM over `pid` and its descendants (psutil finds them; /proc has the peak)."""
    import psutil  # here, not at the top: bench/gpu.sh's image may lack it, and only this baseline needs it

    total = 0
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in processes:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
