"""How fast one healing step runs, per training setting, side by side in one process.

A healing step (``vllm_dar.heal``) is a teacher forward, a student forward with DAR attention, the fused
vocabulary projection and KL, a backward pass and an Adam step. This times steps of the real default model on
calibration-split text, starting from the ``calibrated-joint`` conversion of ``benchmarks/quality.py`` (the
row that the heal rows start from, fitted or not: fitting changes values, not shapes), with the projections
and the q/k/v/o attention weights trained, as ``heal --weights qkvo`` does. Settings:

* ``fp32-one-call``: fp32 matmuls; each layer's DAR attention is one SDPA call over every key, full and reduced
  (``dar_attention_sdpa(chunk=T)``; the path before query blocks also read the reduced copies of the sinks and
  of the last ``window`` keys, which no query sees, so it was a little slower still);
* ``fp32``: fp32 matmuls, DAR attention in query blocks of 128 (the default);
* ``bf16``: the default path under bf16 autocast (``--precision bf16``; ``auto`` picks it on CPUs with native
  bf16 dot products).

Every setting fuses ``lm_head`` with the loss (``vllm_dar.heal._DistillHead``); the unfused loss is gone, so
its cost is not measured here. Settings take turns, one step each per round, so machine noise hits them alike;
the first round is a warm-up. Reports each setting's median step time and tokens per second, and the ratios to
``fp32-one-call``; and, for what bf16 costs in accuracy, the KL between the source model's next-token
distributions in fp32 and under bf16 autocast on the same windows (per token, averaged), beside the
distillation KL the steps see. Run:

    python benchmarks/heal_speed.py --json > benchmarks/results/heal_speed.json   # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import harness
import torch
from quality import ROWS, plan_fraction

from vllm_dar import hf
from vllm_dar.convert import calibrate_model, plan
from vllm_dar.data import split_files, token_windows
from vllm_dar.heal import HealSettings, train_step, trainables
from vllm_dar.reference import dar_attention_sdpa

SETTINGS = ("fp32-one-call", "fp32", "bf16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=harness.source_model(), help="full-attention model (VLLM_DAR_MODEL)")
    ap.add_argument("--context", type=int, default=1024, help="tokens per training sequence")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    kw = dict(ROWS["calibrated-joint"][1])
    model, stats, _ = calibrate_model(a.model, calib_files=None, calib_tokens=2048, context=2048,
                                      sink_tokens=kw["sink_tokens"], progress=False)
    shape = hf.model_shape(model)
    cfg, proj = plan(shape, stats, context=2048, kv_budget=plan_fraction(shape, 2048), **kw)
    windows = token_windows(AutoTokenizer.from_pretrained(a.model), split_files()[0], context=a.context,
                            max_windows=a.rounds + 1)

    run = {p: HealSettings(max_tokens=a.context, context=a.context, weights="qkvo", precision=p)
           for p in ("fp32", "bf16")}  # heal's default learning rates
    teacher, _, params, opt = trainables(model, proj, run["fp32"])
    blocked = hf.dar_attention_sdpa
    times, kls = {s: [] for s in SETTINGS}, []
    for r in range(a.rounds + 1):
        ids = torch.tensor([windows[r]])
        for s in SETTINGS:
            hf.dar_attention_sdpa = functools.partial(dar_attention_sdpa, chunk=1 << 30) \
                if s == "fp32-one-call" else blocked
            t = time.perf_counter()
            m = train_step(model, cfg, ids, params, opt, run["bf16" if s == "bf16" else "fp32"], teacher)
            if r:
                times[s].append(time.perf_counter() - t)
                kls.append(m["kl"])
    hf.dar_attention_sdpa = blocked
    bf16_kl = []
    with torch.no_grad():
        for w in windows[1:]:
            ids = torch.tensor([w])
            ref = torch.log_softmax(teacher(ids).logits.float(), -1)[0]
            with run["bf16"].autocast():
                low = torch.log_softmax(teacher(ids).logits.float(), -1)[0]
            bf16_kl.append(float(torch.nn.functional.kl_div(low, ref, log_target=True, reduction="batchmean")))
    med = {s: statistics.median(v) for s, v in times.items()}
    out = {"model": a.model, "context": a.context, "threads": a.threads, "rounds": a.rounds,
           "windows": [min(cfg.window), max(cfg.window)],
           "kl_fp32_vs_bf16_source_model": round(statistics.mean(bf16_kl), 6),
           "distillation_kl_of_the_steps": round(statistics.mean(kls), 5),
           "settings": {s: {"step_s": round(med[s], 3), "tokens_per_s": round(a.context / med[s], 1),
                            "speedup_vs_fp32_one_call": round(med[SETTINGS[0]] / med[s], 2),
                            "steps_s": [round(x, 3) for x in v]} for s, v in times.items()}}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for s, v in out["settings"].items():
            print(f"{s:14} {v['step_s']:7.2f} s/step {v['tokens_per_s']:7.1f} tok/s "
                  f"{v['speedup_vs_fp32_one_call']:5.2f}x")
        print(f"KL(fp32 || bf16) of the source model {out['kl_fp32_vs_bf16_source_model']:.2e} per token; "
              f"distillation KL of the steps {out['distillation_kl_of_the_steps']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
