"""What the benchmark scripts share: default paths, engines in subprocesses, engine-step timing, the memory
bandwidth probe, weight bytes, tables, plots and result files.

Every script in ``benchmarks/`` is a thin CLI over this module and ``vllm_dar``; ``python benchmarks/x.py``
puts ``benchmarks/`` on ``sys.path``, so the scripts (and the tests, which add it) ``import harness``. KV byte
counts come from ``vllm_dar.config``'s byte model, never from here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from vllm_dar import envs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")  # scripts/setup.sh builds the default model here
RESULTS = os.path.join(REPO, "benchmarks", "results")
DAR_MODEL = os.path.join(MODELS, "smollm2-135m-dar")  # the default --dar: make it with `vllm-dar convert`
MAX_BATCHED_TOKENS = 4096  # vLLM's CPU default, set explicitly so a benchmark knows its prefill chunks


def source_model() -> str:
    """The full-attention model a benchmark starts from: ``VLLM_DAR_MODEL``, else the fp32 default model."""
    return envs.VLLM_DAR_MODEL or os.path.join(MODELS, "smollm2-135m-f32")


def dar_engine_env(ops: str | None, *, fp8_window: bool = False) -> dict[str, str]:
    """A DAR engine's environment: this process's, with ``VLLM_DAR_OPS=ops`` when ``ops`` is given and
    ``VLLM_DAR_FP8_WINDOW`` set to ``fp8_window`` (FP8 caches: the window's too, ``vllm_dar.kv_dtype``)."""
    env = {**os.environ, "VLLM_DAR_FP8_WINDOW": "1" if fp8_window else "0"}
    return {**env, "VLLM_DAR_OPS": ops} if ops else env


def dar_ops(ops: str | None) -> str:
    """The DAR ops a benchmark asks its engines for, for its record: ``ops``, else ``VLLM_DAR_OPS`` (through
    ``vllm_dar.envs``, which refuses a bad or renamed value before any engine starts). The plugin's start-up
    line says what ran (``reference`` when the C++ kernel cannot be built)."""
    return ops or envs.VLLM_DAR_OPS


# ---------------------------------------------------------------- engines in subprocesses

def add_model_args(ap: argparse.ArgumentParser, *, dar: bool = True) -> None:
    """``--stock`` (default: ``source_model()``) and, with ``dar``, ``--dar`` (default: ``DAR_MODEL``)."""
    ap.add_argument("--stock", default=source_model(), help="full-attention model (VLLM_DAR_MODEL)")
    if dar:
        ap.add_argument("--dar", default=DAR_MODEL, help="a DAR-converted dir")


def add_worker_args(ap: argparse.ArgumentParser, **worker) -> None:
    """The hidden ``--worker`` (what one worker process runs; ``worker``: its add_argument keywords, e.g.
    ``choices``) and ``--out`` (where it writes its JSON) that ``run_worker`` passes."""
    ap.add_argument("--worker", help=argparse.SUPPRESS, **worker)
    ap.add_argument("--out", help=argparse.SUPPRESS)


def run_worker(script: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
               show_output: bool = False, log_name: str | None = None) -> tuple[dict, list[str]]:
    """Run ``python SCRIPT *argv --out FILE`` in a fresh interpreter and return (the JSON object it wrote to
    FILE, its output lines). One engine per process: vLLM engines free their memory badly, and a crash stays
    there.

    Output (stdout and stderr): with ``show_output``, inherited (no lines come back); else to a temporary log
    file named after ``log_name`` (default: the script), deleted on success and kept on failure. A failed
    worker raises SystemExit naming its exit status and log, after the log's last 40 lines on stderr.
    """
    with tempfile.TemporaryDirectory(prefix="vllm-dar-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(script), *argv, "--out", out]
        lines, log_path = [], None
        if show_output:
            done = subprocess.run(cmd, check=False, env=env)
        else:
            name = log_name or os.path.splitext(os.path.basename(script))[0]
            fd, log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            with os.fdopen(fd, "w") as log:
                done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
            with open(log_path) as f:
                lines = f.readlines()
        if done.returncode:
            sys.stderr.write("".join(lines[-40:]))
            where = f"; log: {log_path}" if log_path else ""
            raise SystemExit(f"{os.path.basename(script)} worker {' '.join(argv)} failed "
                             f"(exit {done.returncode}){where}")
        if log_path:
            os.unlink(log_path)
        with open(out) as f:
            return json.load(f), lines


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON at ``path`` (folders created), newline-terminated."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


# ---------------------------------------------------------------- engine-step timing (pure functions)

def stagger(batch: int, context: int, budget: int = MAX_BATCHED_TOKENS) -> list[int]:
    """Extra tokens for request i so all ``batch`` requests decode together for the nominal decode tokens.

    Chunked prefill finishes request i no earlier than step floor((i+1) C / budget) and the last request no
    later than step ceil(B C / (budget - B)) (decodes take one budget token each); +2 for a request arriving a
    step late.
    """
    last = math.ceil(batch * context / max(budget - batch, 1))
    return [max(0, last - (i + 1) * context // budget) + 2 if batch > 1 else 0 for i in range(batch)]


def decode_steps(steps: list[dict], batch: int) -> tuple[int, list[float]]:
    """(decode batch, step times) over pure decode steps: no request in prefill (``ctx == 0``); the full
    ``batch`` if any step decoded all of it, else the largest batch that any pure decode step held."""
    pure = [s for s in steps if s["ctx"] == 0 and s["itl"]]
    if not pure:
        return 0, []
    size = batch if any(s["gen"] == batch for s in pure) else max(s["gen"] for s in pure)
    return size, [statistics.median(s["itl"]) for s in pure if s["gen"] == size]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Largest number of [start, end] intervals covering one instant (an end frees its slot before a
    start)."""
    running = peak = 0
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # -1 sorts first
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Position-wise share of identical greedy tokens, and mean share before the first divergence."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    prefix = []
    for ra, rb in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra))
        prefix.append(n / len(ra))
    return {"identical_tokens": same / sum(len(r) for r in a),
            "mean_prefix_before_divergence": sum(prefix) / len(a)}


class StepRecorder:
    """Per engine step: requests in prefill (``ctx``) and decode (``gen``), the inter-token latencies of the
    step's decoded tokens (engine-core clock), and the fraction of the KV block pool in use after the step
    (``kv_usage``: vLLM's scheduler stats). Wraps ``StatLoggerManager.record``; the
    engine needs log stats on and ``enable_logging_iteration_details=True``."""

    def __init__(self, llm_engine) -> None:
        self.steps: list[dict] = []
        manager = llm_engine.logger_manager
        inner = manager.record

        def record(scheduler_stats=None, iteration_stats=None, *args, **kwargs):
            details = getattr(scheduler_stats, "iteration_details", None)
            if details is not None and iteration_stats is not None and not details.is_dummy:
                self.steps.append({"ctx": details.num_ctx_requests, "ctx_tokens": details.num_ctx_tokens,
                                   "gen": details.num_generation_requests,
                                   "itl": list(iteration_stats.inter_token_latencies_iter),
                                   "preempted": iteration_stats.num_preempted_reqs,
                                   "kv_usage": scheduler_stats.kv_cache_usage})
            return inner(scheduler_stats, iteration_stats, *args, **kwargs)

        manager.record = record


# ---------------------------------------------------------------- what a decode step's bound needs

def memory_bandwidth(mib: int = 256, repeats: int = 7, threads: int | None = None,
                     timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best memory bandwidth (bytes/s) over ``mib`` MiB fp32 tensors, at 1 thread and at ``threads`` (default:
    all): ``copy`` (``dst.copy_(src)``, read + write bytes), ``read`` (``src.sum()``) and ``gemv`` (``W @ x``,
    the read pattern of a decode step's weights), and ``best`` of all (the highest rate seen keeps a
    bytes-moved bound a lower bound). Keys: ``copy_1t``, ``read_1t``, ``gemv_1t``, the same at ``{threads}t``,
    ``best``."""
    import torch

    src = torch.ones(mib * 2**20 // 4)  # [N] fp32
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    w = src.view(-1, 4096)  # [N / 4096, 4096]
    x = torch.ones(4096)  # [4096]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = timer()
            fn()
            times.append(timer() - t0)
        return min(times)

    nbytes, out = src.numel() * 4, {}
    previous = torch.get_num_threads()
    for n in sorted({1, threads or os.cpu_count() or 1}):
        torch.set_num_threads(n)
        out[f"copy_{n}t"] = 2 * nbytes / best(lambda: dst.copy_(src))
        out[f"read_{n}t"] = nbytes / best(src.sum)
        out[f"gemv_{n}t"] = nbytes / best(lambda: torch.mv(w, x))
    torch.set_num_threads(previous)
    return {**out, "best": max(out.values())}


def safetensors_numel(path: str) -> dict[str, int]:
    """Element count of every tensor in a safetensors file (header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def weight_bytes(model_dir: str, itemsize: int = 4) -> int:
    """Bytes of model weights one decode step reads at ``itemsize`` (fp32 served): every top-level safetensors
    tensor, except that an untied input embedding is only gathered (a few rows), while a tied one is read
    whole as the LM head. DAR's projections are not weights here: ``DarConfig.decode_bytes`` counts them."""
    with open(os.path.join(model_dir, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    numel = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            numel.update(safetensors_numel(os.path.join(model_dir, name)))
    return sum(v for k, v in numel.items() if tied or not k.endswith("embed_tokens.weight")) * itemsize


# ---------------------------------------------------------------- reports

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (an argparse type)."""
    return [int(x) for x in text.split(",") if x]


def fp8_kv_unsupported() -> str | None:
    """Why vLLM 0.32's CPU attention cannot run an FP8 KV cache here (its ``_get_attn_isa`` check: x86 with
    AVX-512 or AMX), or None when it can."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"FP8 KV cache on CPU needs x86 with AVX-512 or AMX (this CPU: {platform.machine()})"
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return "FP8 KV cache on CPU needs AVX-512 or AMX, which this CPU lacks"
    return None
