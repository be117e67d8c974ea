"""Quality of DAR conversions of the default model, side by side with the full model in one run.

Perplexity on held-out real text (python3.11-doc sources; calibration uses the other files), teacher-forced greedy
agreement with the full model, and the KV bytes each setting keeps. Run:

    python benchmarks/quality.py                   # the README table (about 40 minutes on 2 cores)
    python benchmarks/quality.py --rows full dar   # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from vllm_dar.convert import calibrate_model, plan
from vllm_dar.data import split_files, token_windows
from vllm_dar.evaluate import perplexity
from vllm_dar.hf import model_shape

# name -> (description, plan kwargs). Every DAR row keeps <= ~30% of the full KV bytes at context 2048.
ROWS = {
    "full": ("full attention (stock)", None),
    "dar-plain": ("DAR w=64 r=16/16 per head, PCA, no sinks (the plain recipe)",
                  dict(window=64, key_rank=16, value_rank=16, sink_tokens=0)),
    "uniform-plain": ("uniform w=0 r=16/16 per head, PCA, no sinks",
                      dict(window=0, key_rank=16, value_rank=16, sink_tokens=0)),
    "dar": ("DAR w=64 r=16/16 per head, PCA, 4 sinks", dict(window=64, key_rank=16, value_rank=16, sink_tokens=4)),
    "uniform": ("uniform w=0 r=16/16 per head, PCA, 4 sinks",
                dict(window=0, key_rank=16, value_rank=16, sink_tokens=4)),
    "thin-keys": ("DAR w=64 r_k=8 r_v=24 per head, PCA, 4 sinks",
                  dict(window=64, key_rank=8, value_rank=24, sink_tokens=4)),
    "qk": ("DAR w=64 r=16/16 per head, qk (query-aware keys, o_proj-aware values), 4 sinks",
           dict(window=64, key_rank=16, value_rank=16, sink_tokens=4, method="qk")),
    "pyramid": ("pyramid ranks per head (same bytes as dar), PCA, 4 sinks",
                dict(window=64, key_rank=16, value_rank=16, sink_tokens=4, schedule="pyramid")),
    "calibrated": ("calibrated windows+ranks per head (same bytes as dar), PCA, 4 sinks",
                   dict(window=64, key_rank=16, value_rank=16, sink_tokens=4, schedule="calibrated")),
    "joint": ("DAR w=64 r=48/48 joint across the 3 KV heads (LRKV-style), PCA, 4 sinks",
              dict(window=64, key_rank=48, value_rank=48, sink_tokens=4, head_sharing="joint")),
    "joint-w128": ("DAR w=128 r=42/42 joint, PCA, 4 sinks",
                   dict(window=128, key_rank=42, value_rank=42, sink_tokens=4, head_sharing="joint")),
    "uniform-joint": ("uniform w=0 r=54/54 joint (same bytes as dar), PCA, 4 sinks",
                      dict(window=0, key_rank=54, value_rank=54, sink_tokens=4, head_sharing="joint")),
    "calibrated-joint": ("calibrated windows+ranks, joint (same bytes as dar), PCA, 4 sinks",
                         dict(window=64, key_rank=48, value_rank=48, sink_tokens=4, schedule="calibrated",
                              head_sharing="joint")),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("VLLM_DAR_MODEL", "models/smollm2-135m-f32"))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=8 * 2048)
    ap.add_argument("--kv-budget", type=float, default=None,
                    help="budget for the calibrated rows (default: what the 'dar' row costs)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="print the markdown table of a saved --json result and exit")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            print(markdown(json.load(f)))
        return 0
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.time()
    cache = {}

    def stats_for(sinks):  # calibration per sink setting (sink positions are left out of the fit)
        if sinks not in cache:
            cache[sinks] = calibrate_model(a.model, calib_files=None, calib_tokens=a.calib_tokens,
                                           context=a.context, sink_tokens=sinks)
        return cache[sinks]

    model, _, _ = stats_for(4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    windows = token_windows(tok, split_files()[1], context=a.context, max_windows=a.eval_windows)
    shape = model_shape(model)
    full = perplexity(model, windows)
    results = []
    for name in a.rows:
        desc, kw = ROWS[name]
        t = time.time()
        if kw is None:
            res, frac = full, 1.0
        else:
            kw = dict(kw)
            if kw.get("schedule") == "calibrated":
                kw["kv_budget"] = a.kv_budget or plan_fraction(shape, a.context)
            _, stats, _ = stats_for(kw["sink_tokens"])
            cfg, proj = plan(shape, stats, context=a.context, **kw)
            frac = cfg.kv_fraction(a.context)
            res = perplexity(model, windows, cfg=cfg, projections=proj, reference_argmax=full["argmax"])
        row = {"row": name, "setting": desc, "perplexity": round(res["perplexity"], 3),
               "delta_vs_full": round(res["perplexity"] / full["perplexity"] - 1, 4),
               "kv_fraction": round(frac, 4), "top1_agreement": round(res.get("top1_agreement", 1.0), 4),
               "seconds": round(time.time() - t, 1)}
        if kw is not None:
            row["windows"] = sorted(set(cfg.window)) if len(set(cfg.window)) <= 6 else [min(cfg.window),
                                                                                         max(cfg.window)]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"model": a.model, "context": a.context, "eval_tokens": full["tokens"],
           "calib_tokens": a.calib_tokens, "full_perplexity": round(full["perplexity"], 3), "rows": results,
           "seconds": round(time.time() - t0, 1)}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{'row':18} {'ppl':>8} {'vs full':>8} {'KV':>6} {'top1':>6}  setting")
        for r in results:
            print(f"{r['row']:18} {r['perplexity']:8.3f} {r['delta_vs_full']:+8.1%} {r['kv_fraction']:6.1%} "
                  f"{r['top1_agreement']:6.1%}  {r['setting']}")
    return 0


def markdown(out: dict) -> str:
    lines = [f"Held-out text: {out['eval_tokens']} tokens at context {out['context']}; calibration "
             f"{out['calib_tokens']} tokens from other files. Full model perplexity {out['full_perplexity']}.", "",
             "| row | setting | perplexity | vs full | KV bytes | top-1 agreement |", "|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['row']} | {r['setting']} | {r['perplexity']:.2f} | {r['delta_vs_full']:+.1%} | "
                     f"{r['kv_fraction']:.1%} | {r['top1_agreement']:.1%} |")
    return "\n".join(lines)


def plan_fraction(shape, context: int) -> float:
    from vllm_dar.config import DarConfig

    return DarConfig.uniform(shape, window=64, key_rank=16, value_rank=16, sink_tokens=4).kv_fraction(context)


if __name__ == "__main__":
    sys.exit(main())
