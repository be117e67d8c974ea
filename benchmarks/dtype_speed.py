"""Which dtype vLLM's CPU backend serves fastest: bfloat16 vs float32 SmolLM2-135M, one run, alternating.

Each measurement is a fresh ``python`` subprocess with its own ``LLM`` (engines free memory badly), in the
order fp32, bf16, fp32, bf16, ... so machine noise hits both dtypes alike. After a warm-up each engine runs:

* prefill: 8 prompts of 1024 real-text tokens (held-out python3.11-doc), ``max_tokens=1``; prompt tokens / s.
* decode: 8 other prompts, ``max_tokens=64``, greedy, ``ignore_eos``; batch / (time per decode step), the
  step time from vLLM's per-request metrics (``RequestOutput.metrics``) of the last request to finish prefill.

``max_num_batched_tokens`` holds the whole batch. The engine core starts on the first request before the
other 7 arrive, so prefill runs as 1 + 7 requests and the first request is a step ahead; timing decode on the
last-prefilled request sees only steps where all 8 (in its last step 7) decode. Prefix caching is off.
Reports per-dtype medians, the bf16/fp32 ratios and how often the greedy tokens of the two dtypes agree. Run:

    python benchmarks/dtype_speed.py --json          # 2 rounds: 10-20 min on 2 cores (~1 min compile/engine)
    python benchmarks/dtype_speed.py --quick --json  # 1 round, shorter prompts
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import harness

# name -> (checkpoint directory under --models-dir, dtype to serve it in); fp32 first in every round
CHECKPOINTS = {"fp32": ("smollm2-135m-f32", "float32"), "bf16": ("smollm2-135m", "bfloat16")}


def measure(*, model: str, dtype: str, batch: int, prompt_len: int, decode_tokens: int, kv_gib: int) -> dict:
    """Build one engine, warm it up, time a prefill batch and a decode batch (runs in the subprocess)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)  # same KV pool for both dtypes, cheap to allocate
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.data import split_files, token_windows
    from vllm_dar.vllm_engine import shutdown_llm

    windows = token_windows(AutoTokenizer.from_pretrained(model), split_files()[1], context=prompt_len,
                            max_windows=2 * batch)
    prefill_prompts = [TokensPrompt(prompt_token_ids=w) for w in windows[:batch]]
    decode_prompts = [TokensPrompt(prompt_token_ids=w) for w in windows[batch:]]
    llm = LLM(model=model, dtype=dtype, max_model_len=2048, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * prompt_len), enable_prefix_caching=False,
              disable_log_stats=False, seed=0)  # log stats on: RequestOutput.metrics is None without them

    try:
        def run(prompts, max_tokens):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            return outs, time.perf_counter() - t0

        run(prefill_prompts, 2)  # warm-up: compilation and first-touch allocations
        outs, prefill_wall = run(prefill_prompts, 1)
        m = [o.metrics for o in outs]
        prefill_s = max(x.first_token_ts for x in m) - min(x.scheduled_ts for x in m)  # engine-core clock
        outs, decode_wall = run(decode_prompts, decode_tokens)
        last = max(outs, key=lambda o: o.metrics.first_token_ts)  # its decode steps are full-batch steps
        step_s = (last.metrics.last_token_ts - last.metrics.first_token_ts) / (len(last.outputs[0].token_ids) - 1)
        return {
            "served_dtype": str(llm.llm_engine.model_config.dtype),
            "prefill_tok_s": batch * prompt_len / prefill_s,
            "decode_tok_s": batch / step_s,
            "prefill_wall_s": prefill_wall,
            "decode_wall_s": decode_wall,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
        }
    finally:
        shutdown_llm(llm)


def spawn(args: argparse.Namespace, name: str) -> dict:
    """One measurement (``measure``) in a fresh interpreter; its log is shown unless ``--json``."""
    argv = ["--worker", name, "--models-dir", args.models_dir, "--batch", str(args.batch),
            "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
            "--kv-gib", str(args.kv_gib)]
    return harness.run_worker(__file__, argv, show_output=not args.json)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=harness.MODELS,
                    help="directory holding smollm2-135m and smollm2-135m-f32 (default: the repository's "
                         "models/, where scripts/setup.sh builds them)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for every engine")
    ap.add_argument("--quick", action="store_true", help="1 round, 256-token prompts, 32 decode tokens")
    ap.add_argument("--json", action="store_true")
    harness.add_worker_args(ap, choices=list(CHECKPOINTS))
    a = ap.parse_args()
    if a.worker:
        path, dtype = CHECKPOINTS[a.worker]
        res = measure(model=os.path.join(a.models_dir, path), dtype=dtype, batch=a.batch,
                      prompt_len=a.prompt_len, decode_tokens=a.decode_tokens, kv_gib=a.kv_gib)
        harness.write_json(a.out, res, indent=None)
        return 0
    if a.quick:
        a.rounds, a.prompt_len, a.decode_tokens = 1, 256, 32

    t0 = time.time()
    runs: dict[str, list[dict]] = {name: [] for name in CHECKPOINTS}
    for r in range(a.rounds):
        for name in CHECKPOINTS:
            runs[name].append(spawn(a, name))
            print(f"round {r} {name}: prefill {runs[name][-1]['prefill_tok_s']:.0f} tok/s, "
                  f"decode {runs[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    keys = ("prefill_tok_s", "decode_tok_s", "prefill_wall_s", "decode_wall_s")
    med = {n: {k: statistics.median(x[k] for x in rs) for k in keys} for n, rs in runs.items()}
    result = {
        "setup": {"batch": a.batch, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
                  "rounds": a.rounds, "kv_gib": a.kv_gib, "cpu_threads": os.cpu_count()},
        "served_dtype": {n: rs[0]["served_dtype"] for n, rs in runs.items()},
        "median": med,
        "per_round": {n: [{k: round(x[k], 1) for k in keys} for x in rs] for n, rs in runs.items()},
        "ratio_bf16_over_fp32": {k: med["bf16"][k] / med["fp32"][k] for k in keys[:2]},
        "greedy_agreement_bf16_vs_fp32": harness.token_agreement(runs["bf16"][0]["tokens"],
                                                                 runs["fp32"][0]["tokens"]),
        "repeatable": {n: all(x["tokens"] == rs[0]["tokens"] for x in rs) for n, rs in runs.items()},
        "wall_s": round(time.time() - t0, 1),
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for n in CHECKPOINTS:
            print(f"{n}: prefill {med[n]['prefill_tok_s']:.0f} tok/s, "
                  f"decode {med[n]['decode_tok_s']:.1f} tok/s")
        print(f"bf16/fp32: {result['ratio_bf16_over_fp32']}")
        print(f"agreement: {result['greedy_agreement_bf16_vs_fp32']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
