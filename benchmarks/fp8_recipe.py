"""Conversions for an FP8 far cache: quality at 4K context against KV bytes, beside the recommended recipe.

Issue 19's targets for ``vllm serve --kv-cache-dtype fp8`` (far cache in FP8, window in the model dtype) compare
a 4K-token request's KV bytes with DAR alone (the recommended recipe, >= 1.8x fewer) and with stock FP8 (>= 3x
fewer), at perplexity within +0.5% of DAR alone. The recommended recipe served that way misses one capacity
target per dtype (``capacity.py --theory``). Each row here is a real conversion (``vllm_dar.convert``'s
calibration and ``plan``, PCA projections, no training) scored with the far cache rounded to FP8 e4m3 as served
(the Hugging Face reference, ``vllm_dar.evaluate.perplexity``'s ``far_only``), on held-out documentation
windows of ``--eval-context`` tokens, with its bytes per token at ``--eval-context`` + 32 tokens by the byte model
(``DarConfig.kv_bytes_per_token``, as ``capacity.py --theory``). Rows (``ROWS``):

``recipe``           ``vllm-dar convert``'s defaults (calibrated and priced at 2048 tokens), also scored without
                     FP8: the "DAR alone" of the targets;
``plain-4096``       ``vllm-dar convert --context 4096 --kv-budget 0.295``: calibrated and priced at 4096 tokens;
``fp8-bf16``         the same context, budget 0.185, priced for an FP8 far cache beside a bf16 window
                     (``plan(kv_cache_dtype="fp8", dtype="bfloat16")``, ``vllm_dar.convert.priced_itemsizes``;
                     not a ``convert`` option);
``fp8-fp32``         the same, budget 0.11, priced beside an fp32 window (``dtype="float32"``).

The model is the fp32 source (``VLLM_DAR_MODEL``): window and arithmetic in fp32, only the far cache rounded.

The budgets were chosen on the byte model to land a little under 3,300 bytes per token in bf16 (1.8x fewer than
the recipe's 5,958) or 3,800 in fp32 (3x fewer than stock FP8's 11,520). Run::

    python benchmarks/fp8_recipe.py --json > benchmarks/results/fp8_recipe.json   # about 17 minutes here
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import harness
import torch

from vllm_dar.convert import calibrate_model, plan
from vllm_dar.data import split_files, token_windows
from vllm_dar.evaluate import perplexity
from vllm_dar.hf import model_shape
from vllm_dar.kv_dtype import KV_CACHE_DTYPES

# name -> (calibration and budget context, plan's kv_cache_dtype and dtype (the prices), kv_budget (None: default))
ROWS = {"recipe": (2048, "auto", "bfloat16", None),
        "fp8-bf16": (4096, "fp8", "bfloat16", 0.185),
        "plain-4096": (4096, "auto", "bfloat16", 0.295),
        "fp8-fp32": (4096, "fp8", "float32", 0.11)}
STOCK_FP8 = "stock_fp8"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=harness.source_model(), help="full-attention model (VLLM_DAR_MODEL)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--eval-context", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    tokens = a.eval_context + 32  # a request of --eval-context prompt tokens and 32 new ones (capacity.py)
    calibrations = {}

    def calibration(context):
        if context not in calibrations:
            calibrations[context] = calibrate_model(a.model, calib_files=None, calib_tokens=a.calib_tokens,
                                                    context=context, sink_tokens=4, progress=False)
        return calibrations[context]

    model, _, _ = calibration(ROWS[a.rows[0]][0])
    shape = model_shape(model)
    from transformers import AutoTokenizer

    windows = token_windows(AutoTokenizer.from_pretrained(a.model), split_files()[1], context=a.eval_context,
                            max_windows=a.eval_windows)
    full = perplexity(model, windows, progress=False)
    stock = {"bfloat16": shape.kv_bytes_per_token(2), "float32": shape.kv_bytes_per_token(4),
             STOCK_FP8: shape.kv_bytes_per_token(1)}
    rows = []
    for name in a.rows:
        context, kv_cache_dtype, dtype, budget = ROWS[name]
        t = time.time()
        _, stats, _ = calibration(context)
        cfg, proj = plan(shape, stats, window=64, key_rank=48, value_rank=64, sink_tokens=4, schedule="calibrated",
                         head_sharing="joint", kv_budget=budget, context=context, kv_cache_dtype=kv_cache_dtype,
                         dtype=dtype, progress=False)
        row = {"row": name, "context": context, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype,
               "kv_budget": budget, "windows": list(cfg.window), "key_rank": list(cfg.key_rank),
               "value_rank": list(cfg.value_rank), "far_elems_per_token": cfg.far_elems_per_token(),
               "bytes_per_token": {"bfloat16": round(cfg.kv_bytes_per_token(tokens, 2), 1),
                                   "float32": round(cfg.kv_bytes_per_token(tokens, 4), 1),
                                   "bfloat16_far_fp8": round(cfg.kv_bytes_per_token(tokens, 2, 1), 1),
                                   "float32_far_fp8": round(cfg.kv_bytes_per_token(tokens, 4, 1), 1)}}
        scored = {"far_fp8": KV_CACHE_DTYPES["fp8"]}
        if name == "recipe":
            scored = {"model_dtype": None, **scored}
        for key, kv_dtype in scored.items():
            res = perplexity(model, windows, cfg=cfg, projections=proj, kv_dtype=kv_dtype,
                             far_only=kv_dtype is not None, progress=False)
            row[f"delta_vs_full_{key}"] = round(res["perplexity"] / full["perplexity"] - 1, 4)
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("windows", "key_rank", "value_rank")}),
              file=sys.stderr, flush=True)
    recipe = next((r for r in rows if r["row"] == "recipe"), None)
    for r in rows:  # issue 19's ratios: DAR alone is the recipe in the served dtype, without FP8
        b = r["bytes_per_token"]
        r["capacity"] = {f"{d}_vs_stock_fp8": round(stock[STOCK_FP8] / b[f"{d}_far_fp8"], 3)
                         for d in ("bfloat16", "float32")}
        if recipe is not None:
            r["capacity"].update({f"{d}_vs_dar": round(recipe["bytes_per_token"][d] / b[f"{d}_far_fp8"], 3)
                                  for d in ("bfloat16", "float32")})
            if "delta_vs_full_model_dtype" in recipe:
                r["vs_dar_alone"] = round((1 + r["delta_vs_full_far_fp8"]) / (1 + recipe["delta_vs_full_model_dtype"])
                                          - 1, 4)
    out = {"model": a.model, "eval_context": a.eval_context, "eval_tokens": full["tokens"], "tokens": tokens,
           "full_perplexity": round(full["perplexity"], 3), "stock_bytes_per_token": stock, "rows": rows,
           "threads": a.threads, "seconds": round(time.time() - t0, 1)}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for r in rows:
            print(r["row"], r["bytes_per_token"], r["capacity"], r.get("vs_dar_alone"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
