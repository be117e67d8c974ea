"""Decode speed of stock vLLM, stock vLLM with its FP8 KV cache, a DAR model and a DAR model with FP8 caches:
same prompts, same KV memory, same served dtype (``--dtype``: fp32 by default, or bf16, vLLM's default serving
dtype; K/V cached in it, or in FP8: ``fp8`` stock's whole cache, ``dar-fp8`` DAR's far cache, ``dar-fp8-window``
both DAR caches, ``vllm_dar.kv_dtype.cache_dtypes``), each engine in a fresh process.

Per context ``C`` and batch ``B``, per engine: time per decode step (``tpot_s``, over engine steps that decode
the whole batch and hold no prefill), decode and output tokens/s, time to first token (at ``B = 1``: one
prompt's prefill, after a warm-up), the batch vLLM's KV cache admits, and the bytes-moved bound of a step
(weights plus the K/V it reads, over the memory bandwidth measured here); medians over ``--rounds``, with
DAR / stock, FP8 / stock, DAR+FP8 / stock and DAR+FP8 / DAR ratios. The README's Throughput section says how each figure is taken. Run::

    python benchmarks/throughput.py --context 4096 --batch 16 --kv-gib 4 --rounds 1 --engines stock,dar --json
    python benchmarks/throughput.py --contexts 512,4096,8192 --batch 1 --dtype bfloat16 --engines stock,dar
    python benchmarks/throughput.py --save   # grid 512/2K/4K/8K x 1/8/32, 2 rounds: hours
    python benchmarks/throughput.py --render benchmarks/results/throughput.json  # table + PNG of a saved run

``--dar`` defaults to the recommended recipe (``scripts/main.sh``); ``--contexts``/``--batches`` pick a
sub-grid; ``--engines`` and ``--dar-ops`` (``VLLM_DAR_OPS``) narrow a rerun; ``--save`` writes
``benchmarks/results/throughput.json`` (``throughput-bf16.json`` for ``--dtype bfloat16``) and a PNG beside it
(with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import harness

from vllm_dar import envs, kv_dtype
from vllm_dar.checkpoint import read_config
from vllm_dar.config import DarConfig, ModelShape

ENGINES = ("stock", "fp8", "dar", "dar-fp8", "dar-fp8-window")
KV_DTYPE = {"stock": "auto", "fp8": "fp8", "dar": "auto", "dar-fp8": "fp8", "dar-fp8-window": "fp8"}
DTYPES = {"float32": 4, "bfloat16": 2}  # served dtype -> bytes per element of weights and of an "auto" KV cache
MAX_POSITIONS = 8192  # SmolLM2's RoPE table: a position past it aborts the engine (index out of bounds)


def is_dar(engine: str) -> bool:
    """Whether ``engine`` serves ``--dar`` (``dar``, ``dar-fp8``, ``dar-fp8-window``) rather than ``--stock``."""
    return engine.startswith("dar")


def kv_itemsizes(engine: str, dtype: str) -> tuple[int, int]:
    """Bytes per cached element (window or full-attention cache, far cache): the served dtype's ("auto"), or 1
    where FP8 stores it (module docstring)."""
    return kv_dtype.cache_itemsizes(KV_DTYPE[engine], DTYPES[dtype], dar=is_dar(engine),
                                    fp8_window=engine == "dar-fp8-window")


# ---------------------------------------------------------------- K/V bytes (vllm_dar.config's byte model)

def kv_model(engine: str, model_dir: str) -> DarConfig | ModelShape:
    """The byte model of ``engine``'s cache: the ``dar`` section for ``dar``, the model's shapes otherwise."""
    if is_dar(engine):
        cfg = DarConfig.from_model_dir(model_dir)
        if cfg is None:
            raise SystemExit(f"--dar {model_dir}: config.json has no dar section")
        return cfg
    return ModelShape.from_hf_config(read_config(model_dir))


def kv_bytes_per_request(engine: str, model_dir: str, context: int, dtype: str) -> int:
    """K/V bytes one request of ``context`` tokens holds in ``engine``'s cache (no block rounding)."""
    model, (size, far_size) = kv_model(engine, model_dir), kv_itemsizes(engine, dtype)
    if isinstance(model, ModelShape):
        return model.kv_elems(context) * size
    return round(model.kv_bytes_per_token(context, size, far_size) * context)


def decode_read_bytes(engine: str, model_dir: str, context: int, batch: int, dtype: str) -> dict[str, int]:
    """K/V bytes one decode step of ``batch`` requests at ``context`` reads in ``engine``'s cache:
    ``per_request``, and for DAR its fp32 ``projections`` (once per step); ``total``."""
    model = kv_model(engine, model_dir)
    if isinstance(model, DarConfig):
        b = model.decode_bytes(context, *kv_itemsizes(engine, dtype))
        return {"per_request": b.dar, "projections": b.projections, "total": batch * b.dar + b.projections}
    per = model.kv_elems(context) * kv_itemsizes(engine, dtype)[0]
    return {"per_request": per, "projections": 0, "total": batch * per}


# ---------------------------------------------------------------- one engine (runs in the subprocess)

def measure_engine(*, engine: str, model: str, context: int, batches: list[int], decode_tokens: int,
                   kv_gib: int, dtype: str) -> dict:
    """Build one engine for ``context`` and run every batch size on it."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    # Prompts are the context, or shorter where prompt, decode tokens and the stagger would pass MAX_POSITIONS
    # (the 8K grid point: 8192 - 32 - the stagger).
    extra = decode_tokens + max(harness.stagger(max(batches), context))
    prompt = min(context, MAX_POSITIONS - extra)
    max_len = prompt + extra
    import logging
    import random

    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import shutdown_llm

    logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)  # one line per step otherwise
    llm = LLM(model=model, dtype=dtype, kv_cache_dtype=KV_DTYPE[engine], max_model_len=max_len,
              max_num_seqs=max(batches), max_num_batched_tokens=harness.MAX_BATCHED_TOKENS,
              enable_prefix_caching=False, disable_log_stats=False, enable_logging_iteration_details=True,
              seed=0)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        recorder = harness.StepRecorder(llm.llm_engine)
        warm = [TokensPrompt(prompt_token_ids=[1000 + i] * 64) for i in range(max(batches))]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        out = {"engine": engine, "model": model, "context": context, "prompt_len": prompt,
               "max_model_len": max_len,
               "kv_cache_max_concurrency": cache.kv_cache_max_concurrency,
               "kv_capacity_tokens": cache.kv_cache_size_tokens, "num_blocks": cache.num_gpu_blocks,
               "block_size": cache.block_size, "kv_cache_dtype": cache.cache_dtype, "batches": {}}
        for batch in batches:
            rng = random.Random(context * 1000 + batch)
            prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(prompt)])
                       for _ in range(batch)]
            params = [SamplingParams(temperature=0.0, max_tokens=decode_tokens + extra, ignore_eos=True)
                      for extra in harness.stagger(batch, context)]
            recorder.steps.clear()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            m = [o.metrics for o in outs]
            size, times = harness.decode_steps(recorder.steps, batch)
            ttft = [x.first_token_ts - x.queued_ts for x in m]
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            out["batches"][str(batch)] = {
                "tpot_s": statistics.median(times) if times else None,
                "tpot_mean_s": statistics.fmean(times) if times else None,
                "decode_steps": len(times), "decode_batch": size,
                "decode_tok_s": size / statistics.median(times) if times else None,
                "output_tok_s": generated / wall, "generated_tokens": generated, "wall_s": wall,
                "ttft_s": statistics.median(ttft), "ttft_first_s": ttft[0], "ttft_max_s": max(ttft),
                "max_concurrent": harness.max_overlap([(x.scheduled_ts, x.last_token_ts) for x in m]),
                "preemptions": sum(x.num_preemptions for x in m),
                "steps": len(recorder.steps),
            }
        return out

    finally:
        shutdown_llm(llm)


def spawn(args: argparse.Namespace, engine: str, context: int, batches: list[int]) -> dict:
    """One engine in a fresh interpreter (``measure_engine``), its log kept for the plugin's start-up line."""
    model = args.dar if is_dar(engine) else args.stock
    argv = ["--worker", engine, "--model", model, "--contexts", str(context),
            "--batches", ",".join(map(str, batches)), "--decode-tokens", str(args.decode_tokens),
            "--kv-gib", str(args.kv_gib), "--dtype", args.dtype]
    env = harness.dar_engine_env(args.dar_ops, fp8_window=engine == "dar-fp8-window") if is_dar(engine) else None
    t0 = time.time()
    result, lines = harness.run_worker(__file__, argv, env=env, log_name=f"throughput-{engine}-{context}")
    # the plugin's start-up line (DAR ops, window block size, KV bytes per token), for the record
    plugin = [x.split("] ", 1)[-1].strip() for x in lines if "vllm-dar: DAR backend" in x]
    result["plugin_log"] = plugin[0] if plugin else None
    result["engine_wall_s"] = time.time() - t0
    return result


# ---------------------------------------------------------------- aggregation, report, plot

MEDIAN_KEYS = ("tpot_s", "tpot_mean_s", "decode_tok_s", "output_tok_s", "ttft_s", "ttft_first_s",
               "ttft_max_s", "wall_s")


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
    weights = {e: harness.weight_bytes(args.dar if is_dar(e) else args.stock, DTYPES[args.dtype])
               for e in args.engines}
    configs = []
    for context in args.contexts:
        for batch in args.batches:
            row: dict = {"context": context, "batch": batch}
            for e in args.engines:
                rs = runs[(e, context)]
                per = [r["batches"][str(batch)] for r in rs]
                med = {k: median_or_none([p[k] for p in per]) for k in MEDIAN_KEYS}
                size = per[0]["decode_batch"]
                model = args.dar if is_dar(e) else args.stock
                prompt = rs[0]["prompt_len"]  # below the context at 8K (``measure_engine``)
                read = decode_read_bytes(e, model, prompt, size, args.dtype)
                bound_bytes = weights[e] + read["total"]
                bound_s = bound_bytes / bandwidth
                row[e] = {
                    **med, "prompt_len": prompt, "decode_batch": size,
                    "decode_steps": [p["decode_steps"] for p in per],
                    "max_concurrent": max(p["max_concurrent"] for p in per),
                    "preemptions": max(p["preemptions"] for p in per),
                    "max_batch_logged": math.floor(rs[0]["kv_cache_max_concurrency"]),
                    "kv_cache_max_concurrency": rs[0]["kv_cache_max_concurrency"],
                    "max_model_len": rs[0]["max_model_len"], "plugin_log": rs[0].get("plugin_log"),
                    "max_batch_bytes": args.kv_gib * 2**30 // kv_bytes_per_request(
                        e, model, prompt + args.decode_tokens, args.dtype),
                    "bound": {"weights_bytes": weights[e], "kv_bytes_per_request": read["per_request"],
                              "projections_bytes": read["projections"], "bytes": bound_bytes,
                              "seconds": bound_s},
                    "bound_s": bound_s, "tpot_over_bound": med["tpot_s"] / bound_s if med["tpot_s"] else None,
                    "per_round": [{k: p[k] for k in ("tpot_s", "decode_tok_s", "output_tok_s", "ttft_s")}
                                  for p in per],
                }

            row["tpot_ratio"] = ratio(row, "dar", "stock")
            row["tpot_ratio_fp8"] = ratio(row, "fp8", "stock")
            row["tpot_ratio_dar_fp8"] = ratio(row, "dar-fp8", "stock")
            row["tpot_ratio_dar_fp8_to_dar"] = ratio(row, "dar-fp8", "dar")
            row["tpot_ratio_dar_fp8_window"] = ratio(row, "dar-fp8-window", "stock")
            row["tpot_ratio_dar_fp8_window_to_dar"] = ratio(row, "dar-fp8-window", "dar")
            row["bound_ratio"] = ratio(row, "dar", "stock", "bound_s")
            row["same_decode_batch"] = len({row[e]["decode_batch"] for e in args.engines}) == 1
            row["max_batch_ratio"] = ratio(row, "dar", "stock", "max_batch_logged")
            configs.append(row)
    return {
        "settings": {"stock": args.stock, "dar": args.dar, "kv_gib": args.kv_gib, "rounds": args.rounds,
                     "decode_tokens": args.decode_tokens,
                     "max_num_batched_tokens": harness.MAX_BATCHED_TOKENS,
                     "contexts": args.contexts, "batches": args.batches, "dtype": args.dtype,
                     "engines": args.engines, "dar_ops": harness.dar_ops(args.dar_ops),
                     "cpu_count": os.cpu_count()},
        "bandwidth_bytes_s": bandwidth,
        "configs": configs,
        "engine_wall_s": {f"{e}@{c}": [round(r["engine_wall_s"], 1) for r in runs[(e, c)]]
                          for e in args.engines for c in args.contexts},
    }


def table(result: dict) -> str:
    """Markdown table: per configuration and engine, the measured figures and the bound."""
    def fmt(v, f):
        return "n/a" if v is None else format(v, f)

    rows = []
    for row in result["configs"]:
        for e in result["settings"].get("engines", ENGINES):
            r = row[e]
            rel = {"stock": 1.0 if r["tpot_s"] else None, "fp8": row["tpot_ratio_fp8"],
                   "dar": row["tpot_ratio"], "dar-fp8": row.get("tpot_ratio_dar_fp8"),
                   "dar-fp8-window": row.get("tpot_ratio_dar_fp8_window")}[e]
            rows.append([row["context"], row["batch"], e, r["decode_batch"],
                         fmt(r["tpot_s"] and r["tpot_s"] * 1e3, ".1f"), f"{r['bound']['seconds'] * 1e3:.1f}",
                         fmt(r["tpot_over_bound"], ".1f"), fmt(r["decode_tok_s"], ".1f"),
                         f"{r['output_tok_s']:.1f}", f"{r['ttft_s']:.2f}", r["max_batch_logged"],
                         fmt(rel, ".2f") + ("x" if rel is not None else "")])
    return harness.markdown_table(
        ["context", "batch", "engine", "decode batch", "TPOT ms", "bound ms", "TPOT/bound", "decode tok/s",
         "output tok/s", "TTFT s", "max batch (logged)", "TPOT vs stock"], rows)


def plot(result: dict, path: str) -> bool:
    """TPOT (solid) and its bound (dashed) against context per batch, and the logged max batch; False without
    matplotlib."""
    plt = harness.pyplot()
    if plt is None:
        return False
    fig, (ax, cap) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"stock": "tab:blue", "fp8": "tab:orange", "dar": "tab:green", "dar-fp8": "tab:red",
              "dar-fp8-window": "tab:purple"}
    batches = sorted({r["batch"] for r in result["configs"]})
    marks = dict(zip(batches, "os^vD"))
    for e in result["settings"].get("engines", ENGINES):
        for b in batches:
            rows = [r for r in result["configs"] if r["batch"] == b and r[e]["tpot_s"]]
            xs = [r["context"] for r in rows]
            ax.plot(xs, [r[e]["tpot_s"] * 1e3 for r in rows], marker=marks[b], color=colors[e],
                    label=f"{e} B={b}")
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
    fig.suptitle(f"SmolLM2-135M {result['settings'].get('dtype', 'float32')} on vLLM CPU: stock vs FP8 KV vs DAR")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    ap.add_argument("--context", type=int, help="one context (with --batch: one configuration)")
    ap.add_argument("--batch", type=int, help="one batch size")
    ap.add_argument("--contexts", type=harness.int_list, default=[512, 2048, 4096, 8192])
    ap.add_argument("--batches", type=harness.int_list, default=[1, 8, 32])
    ap.add_argument("--decode-tokens", type=int, default=32, help="full-batch decode steps wanted per run")
    ap.add_argument("--kv-gib", type=int, default=2,
                    help="VLLM_CPU_KVCACHE_SPACE (integer GiB) for every engine")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                    help="served dtype of every engine (K/V cached in it, or FP8 for fp8)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"a subset of {','.join(ENGINES)} (ratios need stock)")
    ap.add_argument("--dar-ops", choices=envs.OPS_KINDS, default=None,
                    help="VLLM_DAR_OPS for the DAR engine (default: the environment's, else the plugin's)")
    ap.add_argument("--bw-threads", type=int, default=None,
                    help="threads of the bandwidth copy (default: all)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="GB/s for the bound instead of measuring it")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/throughput.json (+ .png)")
    ap.add_argument("--render", metavar="JSON",
                    help="print the table of a saved result and plot it beside it")
    harness.add_worker_args(ap, choices=ENGINES)
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
                             decode_tokens=a.decode_tokens, kv_gib=a.kv_gib, dtype=a.dtype)
        harness.write_json(a.out, res, indent=None)
        return 0
    if any(map(is_dar, a.engines)):  # fail now, not after the stock engine, if --dar is not DAR or VLLM_DAR_OPS is bad
        kv_model("dar", a.dar)
        harness.dar_ops(a.dar_ops)

    t0 = time.time()
    bandwidth = [harness.memory_bandwidth(threads=a.bw_threads)]  # measured before and after the engines
    runs: dict[tuple[str, int], list[dict]] = {(e, c): [] for e in a.engines for c in a.contexts}
    for r in range(a.rounds):
        for context in a.contexts:
            for e in a.engines[r % len(a.engines):] + a.engines[: r % len(a.engines)]:
                res = spawn(a, e, context, a.batches)
                runs[(e, context)].append(res)
                for b, x in res["batches"].items():
                    tpot = "n/a" if x["tpot_s"] is None else f"{x['tpot_s'] * 1e3:.1f} ms"
                    print(f"round {r} {e:7s} C={context} B={b}: TPOT {tpot} "
                          f"(decode batch {x['decode_batch']}), {x['output_tok_s']:.1f} out tok/s, "
                          f"TTFT {x['ttft_s']:.2f} s, max batch logged {res['kv_cache_max_concurrency']:.1f}",
                          file=sys.stderr)
    bandwidth.append(harness.memory_bandwidth(threads=a.bw_threads))
    result = summarise(a, runs, a.bandwidth * 1e9 if a.bandwidth else max(b["best"] for b in bandwidth))
    result["bandwidth_measurements"] = bandwidth
    result["wall_s"] = round(time.time() - t0, 1)
    if a.save:
        path = os.path.join(harness.RESULTS, "throughput.json" if a.dtype == "float32" else "throughput-bf16.json")
        harness.write_json(path, result)
        png = path[:-5] + ".png"
        plotted = plot(result, png)
        print(f"wrote {path}" + (f" and {png}" if plotted else " (no plot: matplotlib not importable)"),
              file=sys.stderr)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"memory bandwidth (best of copy and read): {result['bandwidth_bytes_s'] / 1e9:.1f} GB/s")
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
