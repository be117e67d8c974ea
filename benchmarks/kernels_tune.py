"""Where a DAR attention call's time goes on CUDA, and which launch parameters make it faster.

Three parts, each on ``benchmarks/kernels.py``'s inputs (shapes, tables, bf16 caches), timed as CUDA-graph replays
(``kernels.bench``: median, L2 cleared), so host launch overhead is left out except where a row names it:

* ``split``: the call with one kernel replaced by nothing (query projection, far pass, full-width pass); the
  differences from the whole call are each kernel's time. Plus ``eager_synchronised``: the same call launched from
  Python (synchronised), whose excess over the replay is the launchers' host time.
* ``far``: the far pass's launch parameters (``num_warps``, ``num_stages`` and its key step: what
  ``triton_ops._far_plan`` returns; and the key splits) on the decode rows; the whole call is timed (splits also
  cost the merge in the full-width pass).
* ``full``: the full-width pass's (``num_warps``, ``num_stages``, ``FULL_BLOCK_N``) and ``PREFILL_ROWS``, which
  sets both passes' prefill tiles, on a 512-token prefill chunk from scratch and after 4096 cached tokens.

Every variant's output is compared with the default launch's (max relative error, bf16 rounding: < 2e-2) so a
fast wrong variant shows. ``--budget`` seconds caps each row of a sweep (variants past it are skipped and say so).
One JSON line per variant on stdout and in ``--out``. ``--dry``: tiny shapes in Triton's interpreter on the CPU,
no timing (checks the plumbing before device time is spent).

    python benchmarks/kernels_tune.py --out tune.jsonl --budget 60
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb


class _Tuned:
    """A Triton kernel whose launches get extra options (``num_warps``, ``num_stages``); ``skip`` launches nothing."""

    def __init__(self, kernel, skip: bool = False, **options):
        self.kernel, self.skip, self.options = kernel, skip, options

    def __getitem__(self, grid):
        if self.skip:
            return lambda **kw: None
        return lambda **kw: self.kernel[grid](**kw, **self.options)


class Variant:
    """Launch-parameter overrides for ``vllm_dar.ops.triton_ops`` while a variant runs (restored on exit)."""

    def __init__(self, kernels: dict | None = None, constants: dict | None = None):
        self.kernels, self.constants, self.saved = kernels or {}, constants or {}, {}

    def __enter__(self):
        from vllm_dar.ops import triton_ops

        for name, opts in self.kernels.items():
            self.saved[name] = getattr(triton_ops, name)
            setattr(triton_ops, name, _Tuned(self.saved[name], **opts))
        for name, value in self.constants.items():
            self.saved[name] = getattr(triton_ops, name)
            setattr(triton_ops, name, value)
        return self

    def __exit__(self, *exc):
        from vllm_dar.ops import triton_ops

        for name, value in self.saved.items():
            setattr(triton_ops, name, value)


def call(args, kwargs, splits=None):
    from vllm_dar.ops import triton_ops

    k = kwargs
    triton_ops._launch(*args, k["window_cache"], k["window_table"], k["far_cache"], k["far_table"],
                       k["query_start_loc"], k["seq_lens"], k["proj"], k["window"], k["sink_tokens"], k["scale"],
                       splits=splits)


def time_variant(args, kwargs, ref, variant: Variant, splits, dry: bool) -> dict:
    """Graph-replay time (us) of one call under ``variant`` and its max relative error against ``ref``."""
    out = args[3]
    with variant:
        def step():
            call(args, kwargs, splits)
        out.fill_(float("nan"))
        step()
        err = None if ref is None else float(((out.float() - ref).abs().max() / ref.abs().max()).item())
        if dry:
            return {"err": err}
        graph = kb.capture(step)
        return {"us": round(kb.bench(graph.replay) * 1e6, 2), "err": err}


def eager_us(args, kwargs) -> float:
    def step():
        call(args, kwargs)
        torch.cuda.synchronize()
    step()
    t0, n = time.perf_counter(), 50
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per row of a sweep")
    ap.add_argument("--parts", nargs="+", default=["split", "far", "full"])
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args(argv)
    if a.dry:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        decode_rows = [("smollm2", 2, 600)]
        prefill_rows = [("smollm2", 1, 100, 100)]
        grids = {"far": [{"w": 4, "st": 2, "bn": 32, "sp": 2}], "full": [{"w": 4, "st": 1, "bn": 64, "rows": 64}]}
    else:
        if not torch.cuda.is_available():
            print("kernels_tune.py: no CUDA device (use --dry to check the plumbing)")
            return 0
        device = torch.device("cuda")
        decode_rows = [("llama8b", 64, 32768), ("smollm2", 64, 32768)]
        prefill_rows = [("llama8b", 1, 512, 512), ("llama8b", 1, 4608, 512), ("smollm2", 1, 512, 512)]
        grids = {"far": [{"w": w, "st": st, "bn": bn, "sp": sp} for w, st, bn, sp in
                         itertools.product((4, 8, 2), (3, 2, 4), (64, 128, 32), (None, 8))],
                 "full": [{"w": w, "st": st, "bn": bn, "rows": rows} for w, st, bn, rows in
                          itertools.product((4, 8), (3, 2, 1), (32, 64), (64, 128))]}
    dtype = torch.bfloat16 if not a.dry else torch.float32
    sink = open(a.out, "w") if a.out else None  # noqa: SIM115 - written line by line, closed at the end
    t0 = time.time()

    def emit(row):
        row["t"] = round(time.time() - t0, 1)
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    emit({"gpu": gpu, "torch": torch.__version__})
    for part in a.parts:
        rows = {"split": decode_rows + prefill_rows, "far": decode_rows, "full": prefill_rows}[part]
        for row in rows:
            name, batch, ctx = row[:3]
            q_len = row[3] if len(row) > 3 else 1
            args, kwargs = kb.dar_inputs(batch, ctx, q_len, kb.SHAPES[name], dtype, device)
            call(args, kwargs)
            ref = args[3].float().clone()
            row_t0 = time.time()
            base = {"part": part, "shape": name, "batch": batch, "context": ctx, "q_len": q_len}
            if part == "split":
                variants = [("whole", Variant())] + [
                    (f"without_{k}", Variant({k: {"skip": True}}))
                    for k in ("dar_query_project_kernel", "dar_far_kernel", "dar_full_kernel")]
                for label, v in variants:
                    r = time_variant(args, kwargs, None, v, None, a.dry)
                    emit(base | {"variant": label} | r)
                if not a.dry:
                    emit(base | {"variant": "eager_synchronised", "us": round(eager_us(args, kwargs), 2)})
                continue
            for opts in grids[part]:
                if time.time() - row_t0 > (a.budget if part == "far" else a.budget / 2):
                    emit(base | {"skipped": "budget", "opts": opts})
                    break
                if part == "far":
                    plan = (opts["bn"], {"num_warps": opts["w"], "num_stages": opts["st"]})
                    v = Variant(constants={"_far_plan": lambda *_, plan=plan: plan})
                    splits = opts["sp"]
                else:
                    v = Variant({"dar_full_kernel": {"num_warps": opts["w"], "num_stages": opts["st"]}},
                                {"FULL_BLOCK_N": opts["bn"], "PREFILL_ROWS": opts["rows"]})
                    splits = None
                try:
                    r = time_variant(args, kwargs, ref, v, splits, a.dry)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result, not a stop
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                emit(base | {"opts": opts} | r)
            del args, kwargs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
