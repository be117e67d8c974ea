"""Decode speed of stock vLLM (fp32 KV), stock vLLM with its FP8 KV cache, and a DAR model: same prompts, same KV memory.

Three engines, each in a fresh ``python`` subprocess (engines free memory badly) with ``VLLM_CPU_KVCACHE_SPACE=--kv-gib``
and the same ``LLM(dtype="float32", max_num_batched_tokens=4096, max_num_seqs=max batch, enable_prefix_caching=False)``:

* ``stock``: the full fp32 model (``--stock``), ``kv_cache_dtype="auto"`` (fp32 K/V);
* ``fp8``:   the same model with ``kv_cache_dtype="fp8"`` (vLLM's CPU backend needs AVX-512 or AMX for it);
* ``dar``:   a DAR-converted directory (``--dar``); the plugin serves it because its config.json has a ``dar`` section.

For every context ``C`` one engine per kind is built with ``max_model_len = C + decode tokens + stagger`` (so vLLM's
logged ``kv_cache_max_concurrency`` is its admission bound at that context) and runs every batch size ``B`` of the
grid; the order is round-major, then context, then engine (rotated each round), so machine noise hits all alike.
A configuration runs ``B`` random-token prompts of ``C`` tokens (``random.Random(C * 1000 + B)``: identical across
engines), greedy, ``ignore_eos``. Per configuration and engine:

* ``tpot_s`` (decode only): the median engine step time over *pure full-batch decode steps*. vLLM's per-step
  scheduler details (``enable_logging_iteration_details``: context/generation requests of each step) say which
  steps hold no prefill chunk at all and decode all ``B`` requests; the step's time is its inter-token latency
  (difference of consecutive engine-core output timestamps, ``IterationStats.inter_token_latencies_iter``), read
  by wrapping the engine's ``StatLoggerManager.record``. Per-request first/last token timestamps would mix prefill
  chunks of later requests into decode, and a max_tokens=1 vs 1+N difference carries the prefill's noise in full.
  So that ``decode-tokens`` full-batch steps exist, request ``i`` gets ``decode-tokens + stagger_i`` tokens, with
  ``stagger_i`` an upper bound on how many steps after it the last request finishes prefill (chunked prefill,
  4096 tokens per step). If an engine cannot hold ``B`` requests at ``C``, no step decodes all ``B``: ``tpot_s``
  is then taken over the pure decode steps of the largest batch seen, named by ``decode_batch``.
* ``decode_tok_s`` = ``decode_batch / tpot_s``; ``output_tok_s``: all generated tokens / wall time of the call
  (prefill included); ``ttft_s``: ``first_token_ts - queued_ts`` of ``RequestOutput.metrics`` (engine-core clock),
  median over requests (``ttft_first_s``: the first request's, a lone ``C``-token prefill).
* capacity: ``max_batch_logged`` = floor of vLLM's ``kv_cache_max_concurrency``; ``max_batch_bytes`` = KV memory /
  KV bytes of one ``C + decode-tokens`` request from the shapes (no block rounding or window admission slack);
  ``max_concurrent``: largest overlap of the requests' [scheduled, last token] intervals in this run.
* ``bound``: the bytes-moved lower bound of one decode step at the measured ``decode_batch``: every weight read
  once (fp32; tied embeddings once, as the LM head), plus each request's K/V at context ``C`` (stock: full
  width; fp8: 1 byte/element; DAR: reduced K/V of every token plus full width for window and sinks, from the
  ``dar`` section, plus its projections), divided by the memory bandwidth measured here (the best of a large
  ``torch`` copy, read + write bytes, a ``sum`` and a matrix-vector product, at 1 and all threads, before and
  after the engines; ``--bandwidth GBPS`` overrides it). ``tpot_over_bound`` shows the gap to that limit; on a
  loaded machine the measured bandwidth can fall below what an engine reached, and the ratio below 1.

The JSON (``--json``; ``--save`` writes ``benchmarks/results/throughput.json`` and a PNG beside it when
matplotlib is importable) carries per configuration the medians over rounds, ``tpot_ratio`` (DAR / stock) and
``tpot_ratio_fp8`` (FP8 / stock). Run::

    vllm-dar convert models/smollm2-135m-f32 /tmp/tp-dar --window 64 --key-rank 16 --value-rank 16 \\
        --sink-tokens 4 --calib-tokens 2048                                   # ~2 min
    python benchmarks/throughput.py --dar /tmp/tp-dar --context 512 --batch 1 --rounds 1 --json   # ~15 min
    python benchmarks/throughput.py --render benchmarks/results/throughput.json    # table + PNG of a saved run

Each engine start-up (compilation) takes 3-5 min on the loaded 2-core machine; one round of 2048 x 8 took 31 min
(19 of them the DAR engine on the reference loop op). Single rounds there vary by up to 2x (stock 512 x 1: 59 and
81 ms per token in two runs), hence rounds; ``--engines`` and ``--dar-kernels`` (``VLLM_DAR_KERNELS``) narrow a rerun.
    python benchmarks/throughput.py --dar /tmp/tp-dar --save   # full grid 512/2K/4K/8K x 1/8/32, 2 rounds

The full grid takes many hours on the 2-core reference machine (stock prefills ~300 tokens/s: a 32 x 8K batch
alone is ~15 min per engine, and 8K attention prefill is slower still); ``--contexts``/``--batches`` pick a sub-grid.
An 8K context plus decode tokens exceeds SmolLM2's 8192 positions: those engines set
``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` (random tokens; only speed is measured).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
ENGINES = ("stock", "fp8", "dar")
KV_DTYPE = {"stock": "auto", "fp8": "fp8", "dar": "auto"}
MAX_BATCHED_TOKENS = 4096  # vLLM's CPU default; set explicitly so the stagger below is known before the engine
MAX_POSITIONS = 8192


# ---------------------------------------------------------------- schedule and step timing (pure functions)

def stagger(batch: int, context: int, budget: int = MAX_BATCHED_TOKENS) -> list[int]:
    """Extra tokens for request i so all ``batch`` requests decode together for the nominal decode tokens.

    Chunked prefill finishes request i no earlier than step floor((i+1) C / budget) and the last request no later
    than step ceil(B C / (budget - B)) (decodes take one budget token each); +2 for a request arriving a step late.
    """
    last = math.ceil(batch * context / max(budget - batch, 1))
    return [max(0, last - (i + 1) * context // budget) + 2 if batch > 1 else 0 for i in range(batch)]


def decode_steps(steps: list[dict], batch: int) -> tuple[int, list[float]]:
    """(decode batch, step times) over pure decode steps: no request in prefill (``ctx == 0``); the full ``batch``
    if any step decoded all of it, else the largest batch that any pure decode step held."""
    pure = [s for s in steps if s["ctx"] == 0 and s["itl"]]
    if not pure:
        return 0, []
    size = batch if any(s["gen"] == batch for s in pure) else max(s["gen"] for s in pure)
    return size, [statistics.median(s["itl"]) for s in pure if s["gen"] == size]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Largest number of [start, end] intervals covering one instant (an end frees its slot before a start)."""
    running = peak = 0
    for _, delta in sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals]):
        running += delta
        peak = max(peak, running)
    return peak


# ---------------------------------------------------------------- bytes-moved bound (from shapes)

def safetensors_numel(path: str) -> dict[str, int]:
    """Element count of every tensor in a safetensors file (header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def weight_bytes(model_dir: str, itemsize: int = 4) -> int:
    """Bytes of weights one decode step reads at ``itemsize`` (fp32 served): all of them, except that an untied
    input embedding is only gathered (a few rows), while a tied one is read whole as the LM head."""
    with open(os.path.join(model_dir, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    numel = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            numel.update(safetensors_numel(os.path.join(model_dir, name)))
    total = sum(v for k, v in numel.items() if tied or not k.endswith("embed_tokens.weight"))
    dar = os.path.join(model_dir, "dar", "projections.safetensors")
    if os.path.exists(dar):
        total += sum(safetensors_numel(dar).values())
    return total * itemsize


def kv_bytes_per_request(engine: str, model_dir: str, context: int) -> int:
    """K/V bytes one request of ``context`` tokens holds (and a decode step reads) in ``engine``'s cache."""
    from vllm_dar.config import DarConfig, ModelShape

    if engine == "dar":
        cfg = DarConfig.from_model_dir(model_dir)
        if cfg is None:
            raise SystemExit(f"--dar {model_dir}: config.json has no dar section")
        return cfg.kv_elems(context) * 4
    with open(os.path.join(model_dir, "config.json")) as f:
        s = ModelShape.from_hf_config(json.load(f))
    return context * s.num_layers * 2 * s.num_kv_heads * s.head_dim * (1 if engine == "fp8" else 4)


def memory_bandwidth(mib: int = 256, repeats: int = 7, threads: int | None = None) -> dict[str, float]:
    """Best memory bandwidth (bytes/s) over ``mib`` MiB fp32 tensors, at 1 thread (what vLLM serves with on this
    2-core machine) and at ``threads`` (default: all): ``copy`` (``dst.copy_(src)``, read + write bytes), ``read``
    (``src.sum()``) and ``gemv`` (``W @ x``, the read pattern of a decode step's weights), and ``best`` of all,
    which the bound uses (the highest rate seen keeps the bound a lower bound)."""
    import torch

    src = torch.ones(mib * 2**20 // 4)  # [N] fp32
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    w = src.view(-1, 4096)  # [N / 4096, 4096]
    x = torch.ones(4096)  # [4096]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
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


# ---------------------------------------------------------------- one engine (runs in the subprocess)

class StepRecorder:
    """Per engine step: requests in prefill (``ctx``) and decode (``gen``), and the inter-token latencies of the
    step's decoded tokens (engine-core clock). Wraps ``StatLoggerManager.record`` (needs log stats on)."""

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
                                   "preempted": iteration_stats.num_preempted_reqs})
            return inner(scheduler_stats, iteration_stats, *args, **kwargs)

        manager.record = record


def measure_engine(*, engine: str, model: str, context: int, batches: list[int], decode_tokens: int,
                   kv_gib: int) -> dict:
    """Build one engine for ``context`` and run every batch size on it."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    max_len = context + decode_tokens + max(stagger(max(batches), context))
    if max_len > MAX_POSITIONS:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    import logging
    import random

    from vllm import LLM, SamplingParams, TokensPrompt

    logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)  # one line per step otherwise
    llm = LLM(model=model, dtype="float32", kv_cache_dtype=KV_DTYPE[engine], max_model_len=max_len,
              max_num_seqs=max(batches), max_num_batched_tokens=MAX_BATCHED_TOKENS, enable_prefix_caching=False,
              disable_log_stats=False, enable_logging_iteration_details=True, seed=0)
    cache = llm.llm_engine.vllm_config.cache_config
    recorder = StepRecorder(llm.llm_engine)
    warm = [TokensPrompt(prompt_token_ids=[1000 + i] * 64) for i in range(max(batches))]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    out = {"engine": engine, "model": model, "context": context, "max_model_len": max_len,
           "kv_cache_max_concurrency": cache.kv_cache_max_concurrency,
           "kv_capacity_tokens": cache.kv_cache_size_tokens, "num_blocks": cache.num_gpu_blocks,
           "block_size": cache.block_size, "kv_cache_dtype": cache.cache_dtype, "batches": {}}
    for batch in batches:
        rng = random.Random(context * 1000 + batch)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(context)])
                   for _ in range(batch)]
        params = [SamplingParams(temperature=0.0, max_tokens=decode_tokens + extra, ignore_eos=True)
                  for extra in stagger(batch, context)]
        recorder.steps.clear()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        m = [o.metrics for o in outs]
        size, times = decode_steps(recorder.steps, batch)
        ttft = [x.first_token_ts - x.queued_ts for x in m]
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        out["batches"][str(batch)] = {
            "tpot_s": statistics.median(times) if times else None,
            "tpot_mean_s": statistics.fmean(times) if times else None,
            "decode_steps": len(times), "decode_batch": size,
            "decode_tok_s": size / statistics.median(times) if times else None,
            "output_tok_s": generated / wall, "generated_tokens": generated, "wall_s": wall,
            "ttft_s": statistics.median(ttft), "ttft_first_s": ttft[0], "ttft_max_s": max(ttft),
            "max_concurrent": max_overlap([(x.scheduled_ts, x.last_token_ts) for x in m]),
            "preemptions": sum(x.num_preemptions for x in m),
            "steps": len(recorder.steps),
        }
    return out


def spawn(args: argparse.Namespace, engine: str, context: int, batches: list[int]) -> dict:
    """One engine in a fresh interpreter; the result comes back through a file, vLLM's log goes to a file."""
    model = args.dar if engine == "dar" else args.stock
    with tempfile.NamedTemporaryFile(suffix=".json") as out, \
            tempfile.NamedTemporaryFile(prefix=f"throughput-{engine}-{context}-", suffix=".log", delete=False) as log:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", model, "--out", out.name,
               "--contexts", str(context), "--batches", ",".join(map(str, batches)),
               "--decode-tokens", str(args.decode_tokens), "--kv-gib", str(args.kv_gib)]
        env = dict(os.environ)
        if engine == "dar" and args.dar_kernels:
            env["VLLM_DAR_KERNELS"] = args.dar_kernels
        t0 = time.time()
        done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(log.name) as f:
            lines = f.readlines()
        if done.returncode:
            sys.stderr.write("".join(lines[-40:]))
            raise SystemExit(f"{engine} at context {context} failed (exit {done.returncode}); log: {log.name}")
        with open(out.name) as f:
            result = json.load(f)
        os.unlink(log.name)
        # the plugin's start-up line (DAR ops, window block size, KV bytes per token), for the record
        result["plugin_log"] = next((x.split("] ", 1)[-1].strip() for x in lines if "vllm-dar: DAR backend" in x), None)
        result["engine_wall_s"] = time.time() - t0
        return result


# ---------------------------------------------------------------- aggregation, report, plot

MEDIAN_KEYS = ("tpot_s", "tpot_mean_s", "decode_tok_s", "output_tok_s", "ttft_s", "ttft_first_s", "ttft_max_s",
               "wall_s")


def median_or_none(values: list) -> float | None:
    """Median over rounds; None when any round had no such figure (no pure decode step)."""
    return None if None in values else statistics.median(values)


def ratio(row: dict, a: str, b: str, key: str = "tpot_s") -> float | None:
    """row[a][key] / row[b][key]; None when an engine did not run or had no such figure."""
    if a not in row or b not in row:
        return None
    x, y = row[a][key], row[b][key]
    return x / y if x and y else None


def summarise(args, runs: dict, bandwidth: float) -> dict:
    """Medians over rounds per configuration and engine, bounds, ratios."""
    weights = {e: weight_bytes(args.dar if e == "dar" else args.stock) for e in args.engines}
    configs = []
    for context in args.contexts:
        for batch in args.batches:
            row: dict = {"context": context, "batch": batch}
            for e in args.engines:
                rs = runs[(e, context)]
                per = [r["batches"][str(batch)] for r in rs]
                med = {k: median_or_none([p[k] for p in per]) for k in MEDIAN_KEYS}
                size = per[0]["decode_batch"]
                model = args.dar if e == "dar" else args.stock
                kv_req = kv_bytes_per_request(e, model, context)
                bound_bytes = weights[e] + size * kv_req
                bound_s = bound_bytes / bandwidth
                row[e] = {
                    **med, "decode_batch": size, "decode_steps": [p["decode_steps"] for p in per],
                    "max_concurrent": max(p["max_concurrent"] for p in per),
                    "preemptions": max(p["preemptions"] for p in per),
                    "max_batch_logged": math.floor(rs[0]["kv_cache_max_concurrency"]),
                    "kv_cache_max_concurrency": rs[0]["kv_cache_max_concurrency"],
                    "max_model_len": rs[0]["max_model_len"], "plugin_log": rs[0].get("plugin_log"),
                    "max_batch_bytes": args.kv_gib * 2**30 // kv_bytes_per_request(
                        e, model, context + args.decode_tokens),
                    "bound": {"weights_bytes": weights[e], "kv_bytes_per_request": kv_req,
                              "bytes": bound_bytes, "seconds": bound_s},
                    "bound_s": bound_s, "tpot_over_bound": med["tpot_s"] / bound_s if med["tpot_s"] else None,
                    "per_round": [{k: p[k] for k in ("tpot_s", "decode_tok_s", "output_tok_s", "ttft_s")}
                                  for p in per],
                }

            row["tpot_ratio"] = ratio(row, "dar", "stock")
            row["tpot_ratio_fp8"] = ratio(row, "fp8", "stock")
            row["bound_ratio"] = ratio(row, "dar", "stock", "bound_s")
            row["same_decode_batch"] = len({row[e]["decode_batch"] for e in args.engines}) == 1
            row["max_batch_ratio"] = ratio(row, "dar", "stock", "max_batch_logged")
            configs.append(row)
    return {
        "settings": {"stock": args.stock, "dar": args.dar, "kv_gib": args.kv_gib, "rounds": args.rounds,
                     "decode_tokens": args.decode_tokens, "max_num_batched_tokens": MAX_BATCHED_TOKENS,
                     "contexts": args.contexts, "batches": args.batches, "dtype": "float32",
                     "engines": args.engines, "dar_kernels": args.dar_kernels or "plugin default",
                     "cpu_count": os.cpu_count()},
        "bandwidth_bytes_s": bandwidth,
        "configs": configs,
        "engine_wall_s": {f"{e}@{c}": [round(r["engine_wall_s"], 1) for r in runs[(e, c)]]
                          for e in args.engines for c in args.contexts},
    }


def table(result: dict) -> str:
    """Markdown table: per configuration and engine, the measured figures and the bound."""
    lines = [("| context | batch | engine | decode batch | TPOT ms | bound ms | TPOT/bound | decode tok/s | "
              "output tok/s | TTFT s | max batch (logged) | TPOT vs stock |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["configs"]:
        for e in result["settings"].get("engines", ENGINES):
            r = row[e]
            rel = {"stock": 1.0 if r["tpot_s"] else None, "fp8": row["tpot_ratio_fp8"], "dar": row["tpot_ratio"]}[e]
            fmt = (lambda v, f: "n/a" if v is None else format(v, f))
            lines.append(f"| {row['context']} | {row['batch']} | {e} | {r['decode_batch']} | "
                         f"{fmt(r['tpot_s'] and r['tpot_s'] * 1e3, '.1f')} | {r['bound']['seconds'] * 1e3:.1f} | "
                         f"{fmt(r['tpot_over_bound'], '.1f')} | {fmt(r['decode_tok_s'], '.1f')} | "
                         f"{r['output_tok_s']:.1f} | {r['ttft_s']:.2f} | {r['max_batch_logged']} | "
                         f"{'n/a' if rel is None else f'{rel:.2f}x'} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """TPOT (solid) and its bound (dashed) against context per batch, and the logged max batch; False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cap) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"stock": "tab:blue", "fp8": "tab:orange", "dar": "tab:green"}
    batches = sorted({r["batch"] for r in result["configs"]})
    marks = dict(zip(batches, "os^vD"))
    for e in result["settings"].get("engines", ENGINES):
        for b in batches:
            rows = [r for r in result["configs"] if r["batch"] == b and r[e]["tpot_s"]]
            xs = [r["context"] for r in rows]
            ax.plot(xs, [r[e]["tpot_s"] * 1e3 for r in rows], marker=marks[b], color=colors[e], label=f"{e} B={b}")
            ax.plot(xs, [r[e]["bound"]["seconds"] * 1e3 for r in rows], ls="--", marker="_", markersize=14,
                    color=colors[e], alpha=0.5)
        rows = [r for r in result["configs"] if r["batch"] == batches[0]]
        cap.plot([r["context"] for r in rows], [r[e]["max_batch_logged"] for r in rows], marker="o",
                 color=colors[e], label=e)
    for a in (ax, cap):
        a.set_xscale("log", base=2)
        a.set_xlabel("context (tokens)")
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("decode ms per output token (dashed, -: bound)")
    ax.legend(fontsize=7, ncol=3)
    cap.set_yscale("log")
    cap.set_ylabel(f"max batch at context (vLLM logged, {result['settings']['kv_gib']} GiB KV)")
    cap.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fp32 on vLLM CPU: stock vs FP8 KV vs DAR")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock", default="/work/models/smollm2-135m-f32" if os.path.isdir("/work/models")
                    else os.path.join(REPO, "models/smollm2-135m-f32"))
    ap.add_argument("--dar", default=os.path.join(REPO, "models/smollm2-135m-dar"), help="a DAR-converted dir")
    ap.add_argument("--context", type=int, help="one context (with --batch: one configuration)")
    ap.add_argument("--batch", type=int, help="one batch size")
    ap.add_argument("--contexts", type=int_list, default=[512, 2048, 4096, 8192])
    ap.add_argument("--batches", type=int_list, default=[1, 8, 32])
    ap.add_argument("--decode-tokens", type=int, default=32, help="full-batch decode steps wanted per run")
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (integer GiB) for every engine")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES), help="a subset of stock,fp8,dar (ratios need stock)")
    ap.add_argument("--dar-kernels", choices=("torch", "reference", "triton"), default=None,
                    help="VLLM_DAR_KERNELS for the DAR engine (default: the plugin's default)")
    ap.add_argument("--bw-threads", type=int, default=None, help="threads of the bandwidth copy (default: all)")
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s for the bound instead of measuring it")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/throughput.json (+ .png)")
    ap.add_argument("--render", metavar="JSON", help="print the table of a saved result and plot it beside it")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.engines = [e for e in ENGINES if e in a.engines.split(",")]
    if a.context:
        a.contexts = [a.context]
    if a.batch:
        a.batches = [a.batch]
    if a.render:
        with open(a.render) as f:
            result = json.load(f)
        png = os.path.splitext(a.render)[0] + ".png"
        print(table(result))
        print(f"plot: {png}" if plot(result, png) else "no plot: matplotlib not importable", file=sys.stderr)
        return 0
    if a.worker:
        res = measure_engine(engine=a.worker, model=a.model, context=a.contexts[0], batches=a.batches,
                             decode_tokens=a.decode_tokens, kv_gib=a.kv_gib)
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0
    if "dar" in a.engines:
        kv_bytes_per_request("dar", a.dar, 1)  # fail now, not after the stock engine, if --dar is not DAR

    t0 = time.time()
    bandwidth = [memory_bandwidth(threads=a.bw_threads)]  # measured before and after the engines
    runs: dict[tuple[str, int], list[dict]] = {(e, c): [] for e in a.engines for c in a.contexts}
    for r in range(a.rounds):
        for context in a.contexts:
            for e in a.engines[r % len(a.engines):] + a.engines[: r % len(a.engines)]:
                res = spawn(a, e, context, a.batches)
                runs[(e, context)].append(res)
                for b, x in res["batches"].items():
                    tpot = "n/a" if x["tpot_s"] is None else f"{x['tpot_s'] * 1e3:.1f} ms"
                    print(f"round {r} {e:5s} C={context} B={b}: TPOT {tpot} (decode batch {x['decode_batch']}), "
                          f"{x['output_tok_s']:.1f} out tok/s, TTFT {x['ttft_s']:.2f} s, "
                          f"max batch logged {res['kv_cache_max_concurrency']:.1f}", file=sys.stderr)
    bandwidth.append(memory_bandwidth(threads=a.bw_threads))
    result = summarise(a, runs, a.bandwidth * 1e9 if a.bandwidth else max(b["best"] for b in bandwidth))
    result["bandwidth_measurements"] = bandwidth
    result["wall_s"] = round(time.time() - t0, 1)
    if a.save:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "throughput.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        png = path[:-5] + ".png"
        print(f"wrote {path}" + (f" and {png}" if plot(result, png) else " (no plot: matplotlib not importable)"),
              file=sys.stderr)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"memory bandwidth (best of copy and read): {result['bandwidth_bytes_s'] / 1e9:.1f} GB/s")
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
