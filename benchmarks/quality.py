"""Quality of DAR conversions of the default model, side by side with the full model in one run.

Perplexity on held-out real text (python3.11-doc sources; calibration uses the other files), teacher-forced greedy
agreement with the full model, and the KV bytes each setting keeps. Run:

    python benchmarks/quality.py                   # the README table (about 40 minutes on 2 cores)
    python benchmarks/quality.py --rows full dar   # a subset
    python benchmarks/quality.py --rows heal --threads 1 --json --merge benchmarks/results/quality.json

Learned rows: ``fit``-suffixed rows refine a row's projections layer-wise (``--method fit``); ``heal`` rows start
from a row's conversion and run ``vllm_dar.heal`` (distillation from the full model, plus ``--heal-lm-weight``
times the next-token loss if given; projections only) within ``--heal-minutes``/``--heal-tokens``; both keep the
bytes of the row they start from and record their cost. ``heal-qkvo-*`` rows also train every layer's q/k/v/o
attention weights (``--heal-weight-lr``), ``heal-qk-*`` its q/k weights only; their perplexity is the trained
model's, still compared with the original full model, and their ``full_attention`` scores the trained weights with
full attention (is the healed model still as good a full-attention model? perplexity, not a distance).
``delta_by_half``: each row against the full model over the first and the second half of the window's positions.
``--merge`` puts the rows into an existing results JSON (same model and held-out text), replacing same-named rows.

Token budgets (``vllm_dar.config.BudgetConfig``): ``--prefix P`` scores every row on each window's continuation
after a ``P``-token prompt (teacher-forced, exactly what a request prefilled with the prompt then decoding gets),
and reports KV bytes right after the prompt; the ``budget-*`` rows (``BUDGET_ROWS``) need it: the recipe with
per-layer budgets of distant prompt tokens (pyramid, uniform, or none kept: window and sinks only), e.g.
``--rows full calibrated-joint budget-pyramid-0.1 budget-uniform-0.1 budget-none --prefix 1536``.

Domains (``vllm_dar.data.DOMAINS``): ``--eval-domains docs code release-notes licenses`` also scores every row on
each domain's held-out windows (``licenses`` is never calibrated or trained on); ``--train-domains`` sets the text
calibration and healing read (default: the documentation only, as the main table).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import harness
import torch

from vllm_dar._fs import atomic_file
from vllm_dar.config import BudgetConfig
from vllm_dar.convert import calibrate_model, plan
from vllm_dar.data import DOMAINS, domain_split, mixed_train_files, split_files, token_windows
from vllm_dar.evaluate import perplexity
from vllm_dar.heal import PRECISIONS
from vllm_dar.hf import model_shape
from vllm_dar.kv_dtype import KV_CACHE_DTYPES

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
    "calibrated": ("calibrated windows+ranks per head (the recipe's budget), PCA, 4 sinks",
                   dict(window=64, key_rank=16, value_rank=16, sink_tokens=4, schedule="calibrated")),
    "joint": ("DAR w=64 r=48/48 joint across the 3 KV heads (LRKV-style), PCA, 4 sinks",
              dict(window=64, key_rank=48, value_rank=48, sink_tokens=4, head_sharing="joint")),
    "joint-w128": ("DAR w=128 r=42/42 joint, PCA, 4 sinks",
                   dict(window=128, key_rank=42, value_rank=42, sink_tokens=4, head_sharing="joint")),
    "uniform-joint": ("uniform w=0 r=54/54 joint (same bytes as dar), PCA, 4 sinks",
                      dict(window=0, key_rank=54, value_rank=54, sink_tokens=4, head_sharing="joint")),
    "calibrated-joint": ("calibrated windows+ranks, joint (the recommended recipe), PCA, 4 sinks",
                         dict(window=64, key_rank=48, value_rank=48, sink_tokens=4, schedule="calibrated",
                              head_sharing="joint")),
    "fit": ("DAR w=64 r=16/16 per head, PCA + layer-wise fit (--method fit), 4 sinks; starts from dar",
            dict(window=64, key_rank=16, value_rank=16, sink_tokens=4, method="fit")),
    "calibrated-joint-fit": ("calibrated-joint + layer-wise fit (--method fit); starts from calibrated-joint",
                             dict(window=64, key_rank=48, value_rank=48, sink_tokens=4, schedule="calibrated",
                                  head_sharing="joint", method="fit")),
}
# FP8 KV cache rows: name -> (the row whose model they evaluate, the FP8 format both caches store: for DAR rows,
# what --kv-cache-dtype serves with VLLM_DAR_FP8_WINDOW=1); their kv_fraction counts one byte per element against
# a 16-bit cache (vLLM's default dtype): half the row's.
FP8_ROWS = {"full-fp8": ("full", "fp8_e4m3"), "full-fp8-e5m2": ("full", "fp8_e5m2"),
            "calibrated-joint-fp8": ("calibrated-joint", "fp8_e4m3"),
            "calibrated-joint-fp8-e5m2": ("calibrated-joint", "fp8_e5m2"),
            "calibrated-joint-fp8-far": ("calibrated-joint", "fp8_e4m3")}
# FP8 rows whose window cache stays in the model dtype (only the far cache in FP8): what --kv-cache-dtype fp8
# serves by default (vllm_dar.kv_dtype.cache_dtypes); kv_fraction counts the far cache's bytes at one byte and the
# window's at two.
FP8_FAR_ONLY = {"calibrated-joint-fp8-far"}
# Token-budget rows: name -> (the row whose conversion they evaluate, budget schedule, mean fraction of the
# candidates kept); need --prefix. budget-none keeps no candidate: the window and the sinks only (StreamingLLM-like).
BUDGET_ROWS = {"budget-pyramid-0.1": ("calibrated-joint", "pyramid", 0.1),
               "budget-uniform-0.1": ("calibrated-joint", "uniform", 0.1),
               "budget-pyramid-0.2": ("calibrated-joint", "pyramid", 0.2),
               "budget-uniform-0.2": ("calibrated-joint", "uniform", 0.2),
               "budget-pyramid-0.5": ("calibrated-joint", "pyramid", 0.5),
               "budget-uniform-0.5": ("calibrated-joint", "uniform", 0.5),
               "budget-none": ("calibrated-joint", "uniform", 0.0)}
# Healed rows: name -> the row whose conversion they start from (same schedule, so the same KV bytes).
HEAL_ROWS = {"heal": "dar", "heal-calibrated-joint": "calibrated-joint", "heal-uniform": "uniform",
             "heal-calibrated-joint-fit": "calibrated-joint-fit",
             "heal-qkvo-calibrated-joint-fit": "calibrated-joint-fit",
             "heal-qk-calibrated-joint-fit": "calibrated-joint-fit"}
# Healed rows that also train attention weights (vllm_dar.heal's ``weights``): name -> letters of "qkvo".
HEAL_WEIGHTS = {"heal-qkvo-calibrated-joint-fit": "qkvo", "heal-qk-calibrated-joint-fit": "qk"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=harness.source_model(), help="full-attention model (VLLM_DAR_MODEL)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, *HEAL_ROWS, *FP8_ROWS, *BUDGET_ROWS],
                    help="default: every row except the (slow) heal rows")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--wide-eval-windows", type=int, default=0,
                    help="also score every row on this many held-out windows (the first --eval-windows of them are "
                         "the main table's); recorded as the row's 'wide'")
    ap.add_argument("--prefix", type=int, default=None, metavar="P",
                    help="score each window's continuation after a P-token prompt (needed by the budget rows)")
    ap.add_argument("--calib-tokens", type=int, default=8 * 2048)
    ap.add_argument("--eval-domains", nargs="+", choices=list(DOMAINS), default=[],
                    help="also score every row on --eval-windows held-out windows of each of these text domains "
                         "(vllm_dar.data.DOMAINS), recorded as the row's 'domains' with their mean")
    ap.add_argument("--train-domains", nargs="+", choices=[n for n, d in DOMAINS.items() if d.trained],
                    default=["docs"], help="text the calibration and the heal rows read: the training parts of "
                                           "these domains, interleaved (vllm_dar.data.mixed_train_files)")
    ap.add_argument("--kv-budget", type=float, default=None,
                    help="budget for the calibrated rows, windows as vLLM reserves them (default: convert's, "
                         "the recommended recipe's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--heal-minutes", type=float, default=30.0, help="wall-time budget of each heal row")
    ap.add_argument("--heal-tokens", type=int, default=None, help="training-token budget of each heal row")
    ap.add_argument("--heal-context", type=int, default=None, help="tokens per training sequence (default: --context)")
    ap.add_argument("--heal-lr", type=float, default=3e-3)
    ap.add_argument("--heal-lm-weight", type=float, default=0.0,
                    help="weight of the next-token loss on the training text beside the KL (vllm_dar.heal's lm_weight)")
    ap.add_argument("--heal-weight-lr", type=float, default=2e-4, help="learning rate of trained attention weights")
    ap.add_argument("--heal-average-tail", type=float, default=0.0,
                    help="fraction of the budget whose steps' parameters are averaged (vllm_dar.heal's average_tail)")
    ap.add_argument("--heal-seed", type=int, default=0, help="order of the training windows (vllm_dar.heal's seed)")
    ap.add_argument("--heal-precision", choices=PRECISIONS, default="auto",
                    help="matmul precision of heal steps (vllm_dar.heal's precision)")
    ap.add_argument("--merge", metavar="JSON", help="merge the rows into this results file (rewritten in place)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="print the markdown table of a saved --json result and exit")
    a = ap.parse_args()
    if a.prefix is None and any(r in BUDGET_ROWS for r in a.rows):
        ap.error("the budget rows evict at a prompt's end: give --prefix P")
    if a.render:
        with open(a.render) as f:
            print(markdown(json.load(f)))
        return 0
    torch.set_num_threads(a.threads)

    t0 = time.time()
    cache = {}
    plans = {}  # row -> (cfg, projections) of its conversion, for the rows that evaluate it again

    def stats_for(sinks):  # calibration per sink setting (sink positions are left out of the fit)
        if sinks not in cache:
            cache[sinks] = calibrate_model(a.model, calib_files=train_files(a), calib_tokens=a.calib_tokens,
                                           context=a.context, sink_tokens=sinks)
        return cache[sinks]

    model, _, _ = stats_for(4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    windows = token_windows(tok, split_files()[1], context=a.context, max_windows=a.eval_windows)
    shape = model_shape(model)
    full = perplexity(model, windows, prefix=a.prefix)
    wide_windows = token_windows(tok, split_files()[1], context=a.context, max_windows=a.wide_eval_windows) \
        if a.wide_eval_windows else None
    wide_full = perplexity(model, wide_windows, prefix=a.prefix) if wide_windows else None
    bytes_at = a.prefix or a.context  # KV bytes are counted right after the prompt
    domain_windows = {d: token_windows(tok, domain_split(d)[1], context=a.context, max_windows=a.eval_windows)
                      for d in a.eval_domains}
    domain_full = {d: perplexity(model, w, prefix=a.prefix) for d, w in domain_windows.items()}
    results = []
    for name in a.rows:
        start = HEAL_ROWS.get(name)
        evaluates, fp8 = FP8_ROWS.get(name, (None, None))
        evaluates, budget = (BUDGET_ROWS[name][0], BUDGET_ROWS[name][1:]) if name in BUDGET_ROWS else (evaluates, None)
        kv_dtype = KV_CACHE_DTYPES[fp8] if fp8 else None
        desc, kw = ROWS[start or evaluates or name]
        far_only = name in FP8_FAR_ONLY
        if fp8:
            what = "reduced K/V (far cache only; window in the model dtype)" if far_only else "K/V"
            desc = f"{desc}; {what} stored as {fp8} (vllm_dar.kv_dtype, scale 1); KV bytes against a 16-bit cache"
        t = time.time()
        cost = None
        if kw is None and kv_dtype is not None:
            res = perplexity(model, windows, reference_argmax=full["argmax"], kv_dtype=kv_dtype, prefix=a.prefix)
            frac = 0.5
        elif kw is None:
            res, frac = full, 1.0
        else:
            kw = dict(kw)
            if kw.get("schedule") == "calibrated":
                kw["kv_budget"] = a.kv_budget or plan_fraction(shape, a.context)
            key = evaluates or name
            if start is None and key in plans:  # an FP8 or budget row of a conversion planned earlier in this run
                cfg, proj = plans[key]
            else:
                _, stats, _ = stats_for(kw["sink_tokens"])
                cfg, proj = plan(shape, stats, context=a.context, **kw)
                if start is None:  # heal rows train their projections: never shared
                    plans[key] = cfg, proj
            if budget is not None:
                schedule, mean = budget
                cfg = dataclasses.replace(cfg, budget=BudgetConfig.make(mean, shape.num_layers, schedule=schedule))
                desc = f"{desc}; {cfg.budget.describe()}, mean {mean} of the candidates"
            cost = {"calib_tokens": a.calib_tokens, "convert_minutes": round((time.time() - t) / 60, 2)}
            restore = None
            if start is not None:
                letters = HEAL_WEIGHTS.get(name, "")
                trained = "projections" + (f" and {'/'.join(letters)} attention weights" if letters else "")
                loss = "KL to the full model" + (f" + {a.heal_lm_weight} x LM loss" if a.heal_lm_weight else "")
                desc = f"{start} healed: {desc}; {trained} trained, {loss}"
                restore = {k: v.detach().clone() for k, v in model.state_dict().items()} if letters else None
                proj, heal_cost = heal_rows(model, tok, cfg, proj, a, weights=letters)
                cost.update(heal_cost, starts_from=start)
            elif kw.get("method") == "fit":
                cost["starts_from"] = name.removesuffix("-fit") if name != "fit" else "dar"
            frac = cfg.kv_fraction(bytes_at)
            if kv_dtype is not None:  # one byte per element against two; far only: the far cache's share
                far = cfg.far_elems_per_token() / cfg.kv_bytes_per_token(bytes_at, 1)
                frac *= 1 - 0.5 * far if far_only else 0.5
            res = perplexity(model, windows, cfg=cfg, projections=proj, reference_argmax=full["argmax"],
                             kv_dtype=kv_dtype, far_only=far_only, prefix=a.prefix)
            if wide_windows:
                res["wide"] = perplexity(model, wide_windows, cfg=cfg, projections=proj, kv_dtype=kv_dtype,
                                         prefix=a.prefix)
            res["domains"] = {d: perplexity(model, w, cfg=cfg, projections=proj, kv_dtype=kv_dtype,
                                            far_only=far_only, prefix=a.prefix) for d, w in domain_windows.items()}
            if restore is not None:  # drift: the trained weights under full attention (issue 22)
                res["full_attention"] = perplexity(model, windows, prefix=a.prefix)
                res["full_attention_domains"] = {d: perplexity(model, w, prefix=a.prefix)
                                                 for d, w in domain_windows.items()}
                model.load_state_dict(restore)  # later rows start from the source weights
        row = {"row": name, "setting": desc, "perplexity": round(res["perplexity"], 3),
               "delta_vs_full": round(res["perplexity"] / full["perplexity"] - 1, 4),
               "kv_fraction": round(frac, 4), "top1_agreement": round(res.get("top1_agreement", 1.0), 4),
               "delta_by_half": delta_by_half(res, full), "seconds": round(time.time() - t, 1)}
        if wide_windows:
            w = res.get("wide", wide_full)
            row["wide"] = {"eval_tokens": wide_full["tokens"], "perplexity": round(w["perplexity"], 3),
                           "full_perplexity": round(wide_full["perplexity"], 3),
                           "delta_vs_full": round(w["perplexity"] / wide_full["perplexity"] - 1, 4),
                           "delta_by_half": delta_by_half(w, wide_full)}
        if domain_windows:
            scored = res.get("domains") or {d: perplexity(model, w, kv_dtype=kv_dtype, prefix=a.prefix) if kv_dtype else
                                            domain_full[d] for d, w in domain_windows.items()}
            row["domains"] = {d: {"perplexity": round(r["perplexity"], 3),
                                  "full_perplexity": round(domain_full[d]["perplexity"], 3),
                                  "delta_vs_full": round(r["perplexity"] / domain_full[d]["perplexity"] - 1, 4),
                                  "trained": DOMAINS[d].trained and d in a.train_domains}
                              for d, r in scored.items()}
            row["domains_mean_delta"] = round(sum(v["delta_vs_full"] for v in row["domains"].values())
                                              / len(row["domains"]), 4)
        if "full_attention" in res:  # did the healed attention weights drift as a full-attention model?
            fa = res["full_attention"]
            row["full_attention"] = {"perplexity": round(fa["perplexity"], 3),
                                     "delta_vs_full": round(fa["perplexity"] / full["perplexity"] - 1, 4),
                                     "domains": {d: round(r["perplexity"] / domain_full[d]["perplexity"] - 1, 4)
                                                 for d, r in res["full_attention_domains"].items()}}
        if cost is not None and (start is not None or kw.get("method") == "fit"):
            row["cost"] = cost
        if kw is not None:
            row["windows"] = sorted(set(cfg.window)) if len(set(cfg.window)) <= 6 else [min(cfg.window),
                                                                                         max(cfg.window)]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"model": a.model, "context": a.context, "eval_tokens": full["tokens"],
           "calib_tokens": a.calib_tokens, "full_perplexity": round(full["perplexity"], 3), "rows": results,
           "seconds": round(time.time() - t0, 1)}
    out["threads"] = a.threads
    out["train_domains"] = a.train_domains
    if a.prefix is not None:
        out["prefix"] = a.prefix  # rows score the continuation; kv_fraction is right after the prompt
    if a.merge:
        out = merge(a.merge, out)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{'row':18} {'ppl':>8} {'vs full':>8} {'KV':>6} {'top1':>6}  setting")
        for r in results:
            print(f"{r['row']:18} {r['perplexity']:8.3f} {r['delta_vs_full']:+8.1%} {r['kv_fraction']:6.1%} "
                  f"{r['top1_agreement']:6.1%}  {r['setting']}")
    return 0


def train_files(a) -> list[str] | None:
    """The calibration and heal text of ``--train-domains``; None: the documentation's calibration split (the
    default, which ``calibrate_model`` and the heal read themselves)."""
    return None if a.train_domains == ["docs"] else mixed_train_files(a.train_domains)


def heal_rows(model, tok, cfg, proj, a, weights: str = "") -> tuple[list, dict]:
    """Heal ``proj`` (and the attention ``weights`` of ``model``, in place) within the row budget; returns
    (healed projections, cost)."""
    from vllm_dar.heal import HealSettings, averaged_steps, heal_projections

    settings = HealSettings(context=a.heal_context or a.context, max_tokens=a.heal_tokens, max_minutes=a.heal_minutes,
                            lr=a.heal_lr, lm_weight=a.heal_lm_weight, weights=weights, weight_lr=a.heal_weight_lr,
                            precision=a.heal_precision, seed=a.heal_seed, average_tail=a.heal_average_tail)
    train = token_windows(tok, train_files(a) or split_files()[0], context=settings.context,
                          max_tokens=settings.data_tokens)
    loads = []
    t = time.time()
    healed, state, _ = heal_projections(model, cfg, proj, train, settings,
                                        on_step=lambda m: loads.append(os.getloadavg()[0]))
    hist = state["history"]
    return healed, {"heal_minutes": round(state["seconds"] / 60, 2), "heal_wall_minutes": round(
        (time.time() - t) / 60, 2), "train_tokens": state["tokens"], "steps": state["step"],
        "heal_context": settings.context, "lr": settings.lr, "precision": settings.precision, "seed": settings.seed,
        "bf16_steps": settings.bf16_steps(), "average_tail": settings.average_tail,
        "averaged_steps": averaged_steps(state),
        **({"weights": weights, "weight_lr": settings.weight_lr} if weights else {}),
        **({"lm_weight": settings.lm_weight} if settings.lm_weight else {}),
        "kl_first": hist[0]["kl"], "kl_last": hist[-1]["kl"],
        "kl_last10": round(sum(h["kl"] for h in hist[-10:]) / len(hist[-10:]), 5),
        "threads": a.threads, "load_avg_1min": round(sum(loads) / len(loads), 2)}


def merge(path: str, out: dict) -> dict:
    """Merge ``out``'s rows into the results file at ``path`` under a lock (several runs may finish together)."""
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "vllm-dar-quality-merge.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            old = json.load(f)
        for k in ("model", "context", "eval_tokens", "calib_tokens"):
            if os.path.basename(str(old[k])) != os.path.basename(str(out[k])):
                raise SystemExit(f"--merge: {k} {out[k]!r} differs from {path}'s {old[k]!r}")
        if abs(old["full_perplexity"] - out["full_perplexity"]) > 0.01:
            raise SystemExit(f"--merge: full perplexity {out['full_perplexity']} != {old['full_perplexity']}")
        new = {r["row"]: r for r in out["rows"]}
        rows = [new.pop(r["row"], r) for r in old["rows"]] + list(new.values())
        merged = {**old, "rows": rows}
        with atomic_file(path) as tmp, open(tmp, "w") as f:
            json.dump(merged, f, indent=1)
            f.write("\n")
    return merged


def markdown(out: dict) -> str:
    """The README's quality tables: every row, then the cost of the learned rows."""
    head = (f"Held-out text: {out['eval_tokens']} tokens at context {out['context']}; calibration "
            f"{out['calib_tokens']} tokens from other files. Full model perplexity {out['full_perplexity']}.")
    rows = [[r["row"], r["setting"], f"{r['perplexity']:.2f}", f"{r['delta_vs_full']:+.1%}",
             f"{r['kv_fraction']:.1%}", f"{r['top1_agreement']:.1%}"] for r in out["rows"]]
    parts = [head, "", harness.markdown_table(
        ["row", "setting", "perplexity", "vs full", "KV bytes", "top-1 agreement"], rows)]
    costs = []
    for r in out["rows"]:
        c = r.get("cost")
        if c is None:
            continue
        minutes = c["convert_minutes"] + c.get("heal_wall_minutes", 0)
        load = f" (load {c['load_avg_1min']}, {c['threads']} thread(s))" if "load_avg_1min" in c else ""
        ctx = f" ({c['heal_context']})" if "heal_context" in c else ""
        costs.append([r["row"], c["starts_from"], f"{minutes:.1f}{load}", c["calib_tokens"],
                      f"{c.get('train_tokens', 0)}{ctx}"])
    if costs:
        header = ["row", "starts from", "minutes on this machine", "calibration tokens",
                  "training tokens (context)"]
        parts += ["", harness.markdown_table(header, costs)]
    return "\n".join(parts)


def delta_by_half(res: dict, full: dict) -> list[float]:
    """Perplexity against the full model's over the first and the second half of the positions of the windows
    (distant tokens, which DAR reduces, weigh more in the second half)."""
    n = len(full["position_nll"])
    halves = [slice(0, n // 2), slice(n // 2, n)]
    return [round(math.exp(float(res["position_nll"][h].mean() - full["position_nll"][h].mean())) - 1, 4)
            for h in halves]


def plan_fraction(shape, context: int) -> float:
    """The calibrated rows' budget: convert's default (``Recipe.calibrated_budget``, counted as vLLM reserves the
    caches: ``reserved_fraction``), so that ``calibrated-joint`` is the recipe ``scripts/main.sh`` converts."""
    from vllm_dar.convert.recipe import Recipe

    return Recipe(context=context).calibrated_budget(shape)


if __name__ == "__main__":
    sys.exit(main())
