"""Does the FP8 scale matter? The perplexity cost of K/V stored as FP8 e4m3 under five scaling granularities.

vLLM's FP8 KV cache stores ``saturate(x / scale)`` with one ``k_scale`` and one ``v_scale`` per layer, 1.0 unless
the checkpoint ships others (vLLM 0.32 has no runtime calibration of them); vllm-dar's caches do the same
(``vllm_dar.kv_dtype``). Issue 19 asks whether finer scales would make the window cache's FP8 cost small enough
to store it in FP8 too. Each mode rounds every cached tensor of the Hugging Face reference (full-width K and V,
reduced K~ and V~; ``vllm_dar.reference.dar_attention_sdpa``'s ``kv_dtype`` path) with its own scale:

``one``     1.0 (what vLLM and vllm-dar serve today);
``static``  per layer and kind (K, V, K~, V~): amax over ``--calib-windows`` calibration windows / 448 (values past
            it saturate), taken from the full-attention model's K/V (the DAR model's deeper layers see slightly
            different ones); shipping these needs separate window and far scales in the served ops;
``shared``  as ``static``, but where a call rounds both caches (DAR, both in FP8) K and K~ share one scale and V
            and V~ another: what the served ops' one ``k_scale`` / ``v_scale`` per layer could carry as they are;
``tensor``  per call: the scored window's own amax per layer and kind (dynamic);
``token``   per cached row: each row's amax maps to 448 (a token and KV head at full width; a token and projection
            group at reduced width, the whole layer for joint projections).

Rows per mode: the full model with its whole cache in FP8 (stock FP8), DAR with both caches in FP8
(``VLLM_DAR_FP8_WINDOW=1``) and DAR with the far cache only (``--kv-cache-dtype fp8``'s default), each against the
same model unrounded on the same held-out documentation windows. Run (about 20 minutes here)::

    python benchmarks/fp8_scales.py --json > benchmarks/results/fp8_scales.json

The modes are installed by replacing the reference's rounding function (``vllm_dar.reference.round_trip``) for the
duration of a mode with one that stores as ``vllm_dar.kv_dtype.round_trip`` does, at the mode's scale; nothing here
changes what vllm-dar serves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import harness
import torch

from vllm_dar import hf
from vllm_dar import reference as ref
from vllm_dar.checkpoint import load_dar
from vllm_dar.data import split_files, token_windows
from vllm_dar.evaluate import load_for_eval, perplexity
from vllm_dar.kv_dtype import round_trip

MODES = ("one", "static", "shared", "tensor", "token")
E4M3 = torch.float8_e4m3fn


def mode_scale(mode: str, x: torch.Tensor, layer: int, kind: str, amax: dict, both: bool = True) -> torch.Tensor:
    """The scale ``mode`` stores tensor ``x`` (of ``kind`` k, v, kr, vr in ``layer``) with; ``amax``: the
    calibration's per (layer, kind) maxima; ``both``: the call rounds full-width and reduced K/V alike (so
    ``shared`` shares)."""
    top = torch.finfo(E4M3).max
    if mode == "one":
        return torch.tensor(1.0)
    if mode == "static" or (mode == "shared" and not both):
        return torch.tensor(amax[layer, kind] / top)
    if mode == "shared":
        return torch.tensor(max(amax[layer, kind[0]], amax[layer, kind[0] + "r"]) / top)
    if mode == "tensor":
        return x.float().abs().amax().clamp_min(1e-12) / top
    if mode == "token":
        return x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
    raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


@contextlib.contextmanager
def scaled(mode: str, amax: dict):
    """Within the block, the reference rounds every cached tensor with ``mode``'s scale. Which tensor a call
    rounds follows ``dar_attention_sdpa``'s order per layer call: K~, V~ (DAR layers), then K, V (unless far
    only); the layer is the attention module's ``layer_idx``."""
    state = {"layer": 0, "kinds": [], "n": 0}
    layer_fn, saved = hf._dar_layer_fn, ref.round_trip

    def tracked_layer_fn(window, sink_tokens, proj, kv_dtype=None, far_only=False, *a, **kw):
        fn = layer_fn(window, sink_tokens, proj, kv_dtype, far_only, *a, **kw)
        kinds = (["kr", "vr"] if proj is not None else []) + ([] if far_only else ["k", "v"])
        both = proj is not None and not far_only  # full-width and reduced K/V both rounded: ``shared`` shares

        def call(module, q, k, v, scaling):
            state.update(layer=module.layer_idx, kinds=kinds, both=both, n=0, head_dim=k.shape[-1])
            out = fn(module, q, k, v, scaling)
            if kv_dtype is not None and state["n"] != len(kinds):  # the reference rounds in another order now
                raise RuntimeError(f"fp8_scales: expected to round {kinds}, rounded {state['n']} tensors")
            return out
        return call

    def rounded(x, dtype, scale=1.0):
        if dtype is None:
            return x
        kind = state["kinds"][state["n"]]
        if kind in ("k", "v") and x.shape[-1] != state["head_dim"]:
            raise RuntimeError(f"fp8_scales: call {state['n']} rounds a [..., {x.shape[-1]}] tensor as {kind}")
        state["n"] += 1
        return round_trip(x, dtype, mode_scale(mode, x, state["layer"], kind, amax, state["both"]))

    hf._dar_layer_fn, ref.round_trip = tracked_layer_fn, rounded
    try:
        yield
    finally:
        hf._dar_layer_fn, ref.round_trip = layer_fn, saved


def calibration_amax(model, proj, windows) -> dict:
    """Per (layer, kind) absolute maxima of K, V and their reductions K~, V~ over ``windows``."""
    amax: dict = {}

    def sink(i, q, k, v):
        p = proj[i].to(dtype=torch.float32)
        for kind, x in (("k", k), ("v", v), ("kr", ref.reduce_kv(k.float(), p.k_down)),
                        ("vr", ref.reduce_kv(v.float(), p.v_down))):
            amax[i, kind] = max(amax.get((i, kind), 0.0), x.abs().amax().item())

    with torch.no_grad(), hf.capture(model, sink):
        for w in windows:
            model(torch.tensor([w]))
    return amax


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for m in a.modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    torch.set_num_threads(a.threads)
    model, tok, _, _ = load_for_eval(a.stock, "float32")
    cfg, proj = load_dar(a.dar)
    if cfg is None:
        ap.error(f"--dar: {a.dar} has no dar section")
    train, held_out = split_files()
    windows = token_windows(tok, held_out, context=a.context, max_windows=a.eval_windows)
    amax = calibration_amax(model, proj, token_windows(tok, train, context=a.context, max_windows=a.calib_windows))
    full = perplexity(model, windows)["perplexity"]
    dar = perplexity(model, windows, cfg=cfg, projections=proj)["perplexity"]
    out = {"model": a.stock, "dar": a.dar, "context": a.context, "eval_windows": len(windows),
           "calib_windows": a.calib_windows, "threads": a.threads,
           "full_perplexity": round(full, 4), "dar_perplexity": round(dar, 4), "modes": {}}
    for mode in a.modes:
        t = time.time()
        with scaled(mode, amax):
            stock = perplexity(model, windows, kv_dtype=E4M3)["perplexity"]
            both = perplexity(model, windows, cfg=cfg, projections=proj, kv_dtype=E4M3)["perplexity"]
            far = perplexity(model, windows, cfg=cfg, projections=proj, kv_dtype=E4M3, far_only=True)["perplexity"]
        out["modes"][mode] = {"stock_fp8_vs_full": round(stock / full - 1, 4),
                              "dar_both_fp8_vs_dar": round(both / dar - 1, 4),
                              "dar_far_fp8_vs_dar": round(far / dar - 1, 4), "seconds": round(time.time() - t, 1)}
        print(mode, json.dumps(out["modes"][mode]), file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(harness.markdown_table(
            ["scale", "stock FP8 vs full", "DAR, both caches FP8, vs DAR", "DAR, far cache FP8, vs DAR"],
            [[m, *(f"{r[k]:+.2%}" for k in ("stock_fp8_vs_full", "dar_both_fp8_vs_dar", "dar_far_fp8_vs_dar"))]
             for m, r in out["modes"].items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
