"""KV capacity and real 4K-request concurrency of a stock vs a DAR model at the same fixed KV memory.

Each engine runs in a fresh ``python`` subprocess with ``LLM(max_model_len=4096+64, gpu_memory_utilization=0.5,
dtype="float32", kv_cache_memory_bytes=--kv-gib GiB, enable_prefix_caching=False, disable_log_stats=False)`` (a
fixed KV memory, because automatic sizing on CPU is noisy; ``VLLM_CPU_KVCACHE_SPACE`` is unset, as it would
override it in whole GiB) with vLLM's default scheduler settings (or ``--max-num-batched-tokens``). ``--engines``:
``stock`` (``--stock``), ``dar`` (``--dar``), and each with ``-fp8`` (``kv_cache_dtype="fp8"``: one byte per
element; for DAR the far cache only, ``vllm_dar.kv_dtype.cache_dtypes``), and ``dar-fp8-window`` (both DAR caches
in FP8: ``VLLM_DAR_FP8_WINDOW=1``), and ``dar-budget``: ``--dar`` with per-layer token budgets (``--budget F``
and ``--budget-schedule``, as ``vllm-dar budget`` sets them, on a hard-linked copy in a temporary folder;
``vllm_dar.config.BudgetConfig``: a request gives most of its far cache back once its prompt is prefilled).
Two figures per engine, beside the KV bytes per token they imply and the byte
model's (``vllm_dar.config``, at each cache's element size):

* ``kv_capacity_tokens``: vLLM's own capacity, ``llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens``,
  which the engine core sends back to the frontend; it is the number behind the "CPU KV cache size: N tokens"
  log line (max concurrency for ``max_model_len`` x ``max_model_len``, a worst-case admission bound).
* ``max_concurrent``: how many ``--prompt-len``-token requests actually run at once. ``--requests`` random-token
  prompts are submitted together; each request's interval is [``scheduled_ts``, ``last_token_ts``] from vLLM's
  per-request metrics (``RequestOutput.metrics``, engine-core clock) and the figure is the maximum overlap of
  those intervals. Requests are admitted about one per step (a prompt fills the token budget), so a request must
  outlive ``--requests`` steps for the overlap to be limited by the KV cache, not by ``max_tokens``: hence
  ``--max-tokens 32`` (``ignore_eos``). A preempted request keeps its first ``scheduled_ts``, so its interval
  overstates; ``preemptions`` says whether that happened.

The README's DAR checkpoint (uniform per-head window 64, ranks 16/16, 4 sinks; ``--dar`` defaults to the
recommended recipe that ``scripts/main.sh`` writes) is made with (~2-3 min)::

    vllm-dar convert models/smollm2-135m-f32 models/smollm2-135m-dar-w64 --schedule uniform \\
        --head-sharing per_head --window 64 --key-rank 16 --value-rank 16 --sink-tokens 4 --calib-tokens 2048

Run (a few minutes per model on 2 cores; ``--quick``: 1024-token prompts, 8 requests)::

    python benchmarks/capacity.py --json [--stock DIR] [--dar DIR: default models/smollm2-135m-dar] [--kv-gib 1]
        [--max-num-batched-tokens N] [--engines stock,dar,stock-fp8,dar-fp8]
    # FP8 next to the others: a cache that four 4K requests of dar-fp8 fill, for 24 requests
    python benchmarks/capacity.py --engines stock,stock-fp8,dar,dar-fp8 --kv-gib 0.25 --requests 24 --json
    # the byte model only (every layout, fp32 and bf16; no engine): seconds; --dar-fp8: another conversion in
    # the FP8 rows (the README's 4K conversion: vllm-dar convert ... --context 4096 --kv-budget 0.295)
    python benchmarks/capacity.py --theory [--dar-fp8 models/smollm2-135m-dar-4k]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import harness

MAX_MODEL_LEN = 4096 + 64
DTYPE = "float32"  # the dtype every engine here serves (and caches K/V) in


def cache_itemsizes(model: str, kv_cache_dtype: str, model_itemsize: int) -> tuple[int, int]:
    """(window or full-attention cache, far cache) bytes per element an engine of ``model`` (stock or DAR)
    stores at ``kv_cache_dtype`` with activations of ``model_itemsize`` bytes (``vllm_dar.kv_dtype``: FP8 is one
    byte; stock FP8 covers its whole cache, DAR's the far cache and, with ``VLLM_DAR_FP8_WINDOW=1``, the
    window)."""
    from vllm_dar.checkpoint import read_config
    from vllm_dar.kv_dtype import cache_itemsizes as itemsizes

    return itemsizes(kv_cache_dtype, model_itemsize, dar="dar" in read_config(model))


def bytes_per_token(model: str, kv_gib: int, capacity_tokens: int, itemsizes: tuple[int, int]) -> dict:
    """KV bytes per token of a ``MAX_MODEL_LEN`` sequence at ``itemsizes`` bytes per element (``cache_itemsizes``:
    the engine's cache dtypes, whatever the checkpoint's): what vLLM's capacity figure implies (the fixed KV memory
    over the logged tokens: block rounding, the window's tails and page padding included) and the theoretical
    figure of ``vllm_dar.config``'s byte model (stock: full K/V; DAR: reduced K/V of every token + full width for
    window and sinks); ``bytes_per_token_full``: full attention at the window's element size."""
    from vllm_dar.checkpoint import read_config
    from vllm_dar.config import ModelShape

    full = ModelShape.from_hf_config(read_config(model)).kv_bytes_per_token(itemsizes[0])
    return {"bytes_per_token_allocated": kv_gib * 2 ** 30 / capacity_tokens,
            "bytes_per_token_theoretical": layout_bytes_per_token(model, MAX_MODEL_LEN, itemsizes),
            "bytes_per_token_full": full}


def layout_bytes_per_token(model: str, context: int, itemsizes: tuple[int, int]) -> float:
    """The byte model's K/V bytes per token of a ``context``-token sequence (``vllm_dar.config``; full
    attention for a model without a ``dar`` section), caches at ``itemsizes`` (``cache_itemsizes``)."""
    from vllm_dar.checkpoint import read_config
    from vllm_dar.config import DarConfig, ModelShape

    raw = read_config(model)
    shape = ModelShape.from_hf_config(raw)
    if "dar" not in raw:
        return shape.kv_bytes_per_token(itemsizes[0])
    return DarConfig.from_json(raw["dar"], shape).kv_bytes_per_token(context, *itemsizes)


def held(steps: list[dict], *, num_blocks: int, block_bytes: float, tokens: float) -> dict | None:
    """KV blocks held per running request over the pure decode steps that ran the most requests (module
    docstring), and the bytes per token that implies at ``tokens`` tokens a request; None without such a step."""
    import statistics

    pure = [s for s in steps if s["ctx"] == 0 and s["gen"] > 0]
    if not pure:
        return None
    most = max(s["gen"] for s in pure)
    blocks = statistics.median(s["kv_usage"] * (num_blocks - 1) / s["gen"] for s in pure if s["gen"] == most)
    return {"running": most, "blocks_per_request": blocks, "bytes_per_token": blocks * block_bytes / tokens,
            "steps": sum(s["gen"] == most for s in pure)}


ENGINES = ("stock", "dar", "stock-fp8", "dar-fp8", "dar-fp8-window", "dar-budget")


def measure(*, model: str, kv_gib: float, requests: int, prompt_len: int, max_tokens: int,
            max_num_batched_tokens: int | None, kv_cache_dtype: str = "auto") -> dict:
    """Build one engine, read its KV capacity, run the concurrent batch (runs in the subprocess)."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes in whole GiB
    import random

    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import shutdown_llm

    extra = {} if max_num_batched_tokens is None else {"max_num_batched_tokens": max_num_batched_tokens}
    llm = LLM(model=model, max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.5, dtype=DTYPE,
              kv_cache_memory_bytes=round(kv_gib * 2**30), kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=False, disable_log_stats=False, enable_logging_iteration_details=True,
              seed=0, **extra)
    try:
        config = llm.llm_engine.vllm_config
        recorder = harness.StepRecorder(llm.llm_engine)
        rng = random.Random(0)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(prompt_len)])
                   for _ in range(requests)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        m = [o.metrics for o in outs]
        cache = config.cache_config
        tokens = prompt_len + max_tokens / 2
        itemsizes = cache_itemsizes(model, kv_cache_dtype, config.model_config.dtype.itemsize)  # as served
        return {
            "held": held(recorder.steps, num_blocks=cache.num_gpu_blocks,
                         block_bytes=kv_gib * 2**30 / cache.num_gpu_blocks, tokens=tokens),
            "bytes_per_token_theoretical_held": layout_bytes_per_token(model, round(tokens), itemsizes),
            **bytes_per_token(model, kv_gib, cache.kv_cache_size_tokens, itemsizes),
            "kv_capacity_tokens": cache.kv_cache_size_tokens,
            "kv_max_concurrency_logged": cache.kv_cache_max_concurrency,
            "num_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_concurrent": harness.max_overlap([(x.scheduled_ts, x.last_token_ts) for x in m]),
            "preemptions": sum(x.num_preemptions for x in m),
            "engine_s": max(x.last_token_ts for x in m) - min(x.scheduled_ts for x in m),
        }
    finally:
        shutdown_llm(llm)


def budget_copy(dar: str, folder: str, budget: str, schedule: str) -> str:
    """``dar`` with token budgets ``budget`` (``--token-budget``'s syntax) in ``folder``: files hard-linked,
    config.json rewritten (``vllm_dar.checkpoint.set_budget`` replaces it, never the shared file)."""
    import shutil

    from vllm_dar.checkpoint import read_config, set_budget
    from vllm_dar.config import BudgetConfig, ModelShape, parse_budget

    out = os.path.join(folder, "dar-budget")
    shutil.copytree(dar, out, copy_function=os.link)
    layers = ModelShape.from_hf_config(read_config(dar)).num_layers
    set_budget(out, BudgetConfig.make(parse_budget(budget), layers, schedule=schedule))
    return out


def spawn(args: argparse.Namespace, engine: str) -> dict:
    """One engine of ``ENGINES`` (``measure``) in a fresh interpreter; its log is shown unless ``--json``."""
    model = args.dar if engine.startswith("dar") else args.stock
    if engine.startswith("dar-fp8"):
        model = args.dar_fp8 or args.dar
    if engine == "dar-budget":
        model = budget_copy(args.dar, args.tmp, args.budget, args.budget_schedule)
    argv = ["--worker", model, "--kv-gib", str(args.kv_gib), "--requests", str(args.requests),
            "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
            "--kv-cache-dtype", "fp8" if "-fp8" in engine else "auto"]
    if args.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = harness.dar_engine_env(None, fp8_window=engine == "dar-fp8-window")
    return harness.run_worker(__file__, argv, env=env, show_output=not args.json)[0]


def theory_table(stock: str, dar: str, tokens: int, dar_fp8: str | None = None) -> dict:
    """Bytes per token of a ``tokens``-token request by the byte model (``layout_bytes_per_token``) for stock,
    stock FP8 and DAR with no, its far or both caches in FP8 (the FP8 rows of ``dar_fp8``, default ``dar``),
    served in fp32 and in bf16, and the capacity ratios that follow (issue 19's targets compare ``dar-fp8`` with
    ``dar`` and ``stock-fp8``)."""
    out = {}
    dar_fp8 = dar_fp8 or dar
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        b = {"stock": layout_bytes_per_token(stock, tokens, (size, size)),
             "stock-fp8": layout_bytes_per_token(stock, tokens, (1, 1)),
             "dar": layout_bytes_per_token(dar, tokens, (size, size)),
             "dar-fp8": layout_bytes_per_token(dar_fp8, tokens, (size, 1)),
             "dar-fp8-window": layout_bytes_per_token(dar_fp8, tokens, (1, 1))}
        out[dtype] = {"bytes_per_token": {k: round(v, 1) for k, v in b.items()},
                      "capacity_ratios": {f"{a}/{o}": round(b[o] / b[a], 3) for a in ("dar-fp8", "dar-fp8-window")
                                          for o in ("dar", "stock-fp8")}}
    return {"tokens": tokens, "dar": dar, "dar_fp8": dar_fp8, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_model_args(p)
    p.add_argument("--kv-gib", type=float, default=1, help="KV cache memory (GiB) of every engine")
    p.add_argument("--engines", default="stock,dar", help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--dar-fp8", default=None, metavar="DIR",
                   help="the DAR checkpoint the dar-fp8 engines (and --theory's FP8 rows) serve, e.g. one converted "
                        "for 4K FP8 serving (README, FP8 KV caches); ratios to dar then compare two conversions "
                        "(default: --dar)")
    p.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)  # set per engine by spawn
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=32, help="must exceed --requests - 1 (see docstring)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    p.add_argument("--quick", action="store_true", help="1024-token prompts, 8 requests")
    p.add_argument("--budget", default="0.1", metavar="F",
                   help="dar-budget: distant prompt tokens kept (vllm-dar budget --token-budget) (%(default)s)")
    p.add_argument("--budget-schedule", default="pyramid", choices=["pyramid", "uniform"])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--theory", action="store_true",
                   help="print only the byte model's bytes per token of every layout at --prompt-len + "
                        "--max-tokens tokens, fp32 and bf16 (theory_table), and run no engine")
    harness.add_worker_args(p)
    args = p.parse_args()
    if args.quick:
        args.prompt_len, args.requests = 1024, 8
    if args.theory:
        print(json.dumps(theory_table(args.stock, args.dar, args.prompt_len + args.max_tokens, args.dar_fp8),
                         indent=1))
        return
    if args.prompt_len + args.max_tokens > MAX_MODEL_LEN:
        p.error(f"--prompt-len + --max-tokens = {args.prompt_len + args.max_tokens} > max_model_len {MAX_MODEL_LEN}")
    if args.worker:
        result = measure(model=args.worker, kv_gib=args.kv_gib, requests=args.requests,
                         prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                         max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype)
        harness.write_json(args.out, result, indent=None)
        return
    engines = args.engines.split(",")
    if unknown := set(engines) - set(ENGINES):
        p.error(f"--engines: unknown {sorted(unknown)}; expected some of {', '.join(ENGINES)}")
    with tempfile.TemporaryDirectory(prefix="vllm-dar-capacity-", dir=os.path.dirname(os.path.abspath(args.dar))
                                     ) as args.tmp:  # beside --dar: hard links need the same file system
        models = {e: spawn(args, e) for e in engines}
    keys = ("kv_capacity_tokens", "max_concurrent")
    pairs = [("dar", "stock"), ("dar-budget", "dar"), ("dar-budget", "stock"), ("stock-fp8", "stock"),
             ("dar-fp8", "stock"), ("dar-fp8", "dar"),
             ("dar-fp8-window", "dar"), ("dar-fp8-window", "stock-fp8"),
             ("dar-fp8", "stock-fp8")]
    ratios = {f"{a}/{b}": {k: models[a][k] / models[b][k] for k in keys} for a, b in pairs
              if a in models and b in models}
    result = {
        "settings": {k: getattr(args, k) for k in ("stock", "dar", "dar_fp8", "engines", "kv_gib", "requests",
                                                    "prompt_len",
                                                    "max_tokens", "max_num_batched_tokens", "budget",
                                                    "budget_schedule")},
        **models,
        "ratios": ratios,
    }
    if "dar/stock" in ratios:
        result["ratio"] = ratios["dar/stock"]  # the key of earlier results
    if not args.json:
        for name, r in models.items():
            h = r["held"] or {}
            print(f"{name:9s} kv_capacity_tokens={r['kv_capacity_tokens']:,} "
                  f"max_concurrent_{args.prompt_len}={r['max_concurrent']} preemptions={r['preemptions']} "
                  f"held bytes/token={h.get('bytes_per_token', float('nan')):,.0f} "
                  f"(layout {r['bytes_per_token_theoretical_held']:,.0f})")
        for pair, r in ratios.items():
            print(f"ratio {pair}:", {k: round(v, 3) for k, v in r.items()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
