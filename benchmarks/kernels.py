"""DAR attention kernels on CUDA against dense full attention: time, achieved GB/s and fraction of peak HBM.

One attention layer per row, every request at the same context; caches in ``--dtype`` (bf16 by default), window
blocks of 16 tokens and far blocks of 64 (the plugin's: a far page holds as many bytes as a window page), block
tables shuffled with block 0 as the null block; the window cache holds only the blocks a step reads (sinks and
window), as in serving. Shapes (window 64, ranks per KV head):

* ``smollm2``: SmolLM2-135M, 9 query heads, 3 KV heads, head_dim 64, ranks 16/16;
* ``llama8b``: Llama-3-8B-like, 32 query heads, 8 KV heads, head_dim 128, ranks 32/32.

Rows: ``decode`` (one new token per request) at ``--contexts`` x ``--batches``; ``prefill`` (a 512-token chunk
from scratch) and ``extend`` (a 512-token chunk after 4096 cached tokens) at batch 1 (``--no-prefill``: none).

* DAR: ``dar_paged_attention_triton`` (the three kernels of one layer), eager (``dar_us``) and, for decode, replayed
  from a CUDA graph (``dar_graph_us``; ``graph_equals_eager`` checks its output);
* baseline: torch's ``scaled_dot_product_attention`` with the flash backend on a dense full-width cache of the same
  batch and context, ``[B, J, L, D]`` (decode: the query heads of a KV head fold into the query length, which is
  exact for one query and needs no GQA support; prefill/extend: ``enable_gqa`` and a lower-right causal mask);
* vLLM's ``unified_attention`` (its ``TRITON_ATTN`` kernel) on the same dense cache in vLLM's layout, decode only,
  when vLLM is importable (``vllm_us``; null otherwise).

Bytes per decode row: ``decode_bytes`` (the byte model: full-width K/V for the baseline; reduced far K/V, window,
the fresh token and the fp32 projections for DAR). ``*_gbps`` = bytes / median time (``triton.testing.do_bench``,
which clears the L2 cache between calls); ``fraction_of_peak_hbm`` = DAR's GB/s / the card's peak HBM bandwidth
(``PEAK_HBM`` by device name; null for cards not listed, and for prefill rows, which are not bandwidth bound).
``targets`` checks issue 21's targets on the row they name. Without a CUDA device it says so and exits 0.

    python benchmarks/kernels.py --json --out benchmarks/results/gpu/kernels.json
    python benchmarks/kernels.py --shapes llama8b --contexts 32768 --batches 64
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

WINDOW_BLOCK, FAR_BLOCK = 16, 64
CHUNK, EXTEND_HISTORY = 512, 4096
# Peak HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_HBM = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 80GB HBM3", 3.35e12), ("H100 SXM", 3.35e12),
            ("A100-SXM4-80GB", 2.0e12), ("A100 80GB", 2.0e12))
# Issue 21: decode at 32K x 64 on the Llama-8B-like shape reaches >= 70% of peak HBM and >= 2x the dense baseline.
TARGETS = {"shape": "llama8b", "kind": "decode", "context": 32768, "batch": 64, "fraction_of_peak_hbm": 0.70,
           "speedup_vs_sdpa": 2.0}


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    key_rank: int
    value_rank: int
    window: int = 64
    sinks: int = 0

    @property
    def groups(self) -> int:
        return self.kv_heads  # per-head projections


SHAPES = {"smollm2": Shape(9, 3, 64, 16, 16), "llama8b": Shape(32, 8, 128, 32, 32)}


def decode_bytes(seq_len: int, s: Shape, itemsize: int) -> dict[str, int]:
    """Per layer: ``full`` (dense K/V per sequence), ``dar`` (DAR's K/V per sequence), ``projections`` (fp32 maps
    per step): ``DarConfig.decode_bytes``, the byte model, for one layer of shape ``s``."""
    from vllm_dar.config import DarConfig, ModelShape

    shape = ModelShape(num_layers=1, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim)
    layer = DarConfig.uniform(shape, window=s.window, key_rank=s.key_rank, value_rank=s.value_rank,
                              sink_tokens=s.sinks)
    return asdict(layer.decode_bytes(seq_len, itemsize=itemsize))


def peak_hbm(name: str) -> float | None:
    """Peak HBM bandwidth in bytes/s of the card called ``name``, or None when it is not in ``PEAK_HBM``."""
    return next((peak for key, peak in PEAK_HBM if key in name), None)


def bench(fn) -> float:
    """Median seconds per call (Triton's do_bench: warm-up, L2 cleared before every timed call)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def window_table(batch: int, seq_len: int, q_len: int, s: Shape) -> tuple[torch.Tensor, int]:
    """[B, cdiv(L, 16)] table whose real (shuffled) blocks cover what the window cache keeps: the sinks and the
    ``window - 1`` positions before the chunk; every other entry is the null block 0. Returns (table, blocks)."""
    c0 = seq_len - q_len
    lo = max(0, c0 - max(s.window, 1) + 1)
    keep = torch.zeros(-(-seq_len // WINDOW_BLOCK), dtype=torch.bool)
    keep[: -(-min(s.sinks, lo) // WINDOW_BLOCK)] = True
    keep[lo // WINDOW_BLOCK: -(-c0 // WINDOW_BLOCK)] = True
    cols = keep.nonzero().flatten()
    table = torch.zeros(batch, keep.numel(), dtype=torch.int32)
    table[:, cols] = (torch.randperm(batch * cols.numel(), dtype=torch.int32) + 1).view(batch, -1)
    return table, batch * cols.numel() + 1


def dar_inputs(batch: int, seq_len: int, q_len: int, s: Shape, dtype, device) -> tuple[tuple, dict]:
    """Arguments of ``dar_paged_attention_triton`` for ``batch`` requests of ``q_len`` new tokens at ``seq_len``."""
    from vllm_dar.ops.paged import PagedProjections
    from vllm_dar.reference import LayerProjections

    h, j, d, g, rk, rv = s.heads, s.kv_heads, s.head_dim, s.groups, s.key_rank, s.value_rank
    dg = j // g * d
    proj = PagedProjections.from_layer(LayerProjections(
        q_proj=torch.randn(j, d, rk) / d ** 0.5, k_down=torch.randn(g, dg, rk) / dg ** 0.5,
        v_down=torch.randn(g, dg, rv) / dg ** 0.5, v_up=torch.randn(j, rv, d) / rv ** 0.5), h).to(device)
    wtable, nbw = window_table(batch, seq_len, q_len, s)
    nbf = -(-seq_len // FAR_BLOCK)
    ftable = (torch.randperm(batch * nbf, dtype=torch.int32) + 1).view(batch, nbf)
    t = batch * q_len
    args = (torch.randn(t, h, d, device=device, dtype=dtype), torch.randn(t, j, d, device=device, dtype=dtype),
            torch.randn(t, j, d, device=device, dtype=dtype), torch.empty(t, h, d, device=device, dtype=dtype))
    kwargs = {"window_cache": torch.randn(nbw, j, WINDOW_BLOCK, 2 * d, device=device, dtype=dtype),
              "window_table": wtable.to(device),
              "far_cache": torch.randn(batch * nbf + 1, g, FAR_BLOCK, rk + rv, device=device, dtype=dtype),
              "far_table": ftable.to(device),
              "query_start_loc": torch.arange(0, t + 1, q_len, device=device, dtype=torch.int32),
              "seq_lens": torch.full((batch,), seq_len, device=device, dtype=torch.int32), "proj": proj,
              "window": s.window, "sink_tokens": s.sinks, "scale": d ** -0.5}
    return args, kwargs


def time_dar(batch: int, seq_len: int, q_len: int, s: Shape, dtype, device, *, graph: bool) -> dict:
    from vllm_dar.ops.triton_ops import dar_paged_attention_triton

    args, kwargs = dar_inputs(batch, seq_len, q_len, s, dtype, device)

    def step():
        dar_paged_attention_triton(*args, **kwargs)

    out = {"dar_us": bench(step) * 1e6}
    if graph:
        step()
        eager = args[3].clone()
        g = capture(step)
        args[3].zero_()
        g.replay()
        torch.cuda.synchronize()
        out["graph_equals_eager"] = bool(torch.equal(args[3], eager))
        out["dar_graph_us"] = bench(g.replay) * 1e6
    return out


def time_sdpa(batch: int, seq_len: int, q_len: int, s: Shape, dtype, device) -> float:
    """Flash SDPA over a dense [B, J, L, D] cache. Decode folds a KV head's query heads into the query length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    h, j, d = s.heads, s.kv_heads, s.head_dim
    k = torch.randn(batch, j, seq_len, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    if q_len == 1:
        q = torch.randn(batch, j, h // j, d, device=device, dtype=dtype)  # [B, J, H/J, D]: one position

        def step():
            sdpa(q, k, v)
    else:
        q = torch.randn(batch, h, q_len, d, device=device, dtype=dtype)
        mask = causal_lower_right(q_len, seq_len)

        def step():
            sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return bench(step)
        except RuntimeError:
            if q_len == 1:
                raise
        # this torch's flash path refuses GQA with a lower-right mask: K/V expanded to H heads (a chunk of 512
        # queries is compute bound, so the extra K/V bytes barely show)
        k, v = k.repeat_interleave(h // j, dim=1), v.repeat_interleave(h // j, dim=1)

        def step():
            sdpa(q, k, v, attn_mask=mask)
        return bench(step)


def time_vllm(batch: int, seq_len: int, s: Shape, dtype, device) -> float:
    """vLLM's ``unified_attention`` decode on the dense cache in its layout, its split-softmax (3D) path enabled
    as its TRITON_ATTN backend enables it."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    h, j, d = s.heads, s.kv_heads, s.head_dim
    nb = -(-seq_len // WINDOW_BLOCK)
    kv = torch.randn(batch * nb + 1, j, WINDOW_BLOCK, 2 * d, device=device, dtype=dtype)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)  # [nb, block, J, D] views, as TRITON_ATTN
    query = torch.randn(batch, h, d, device=device, dtype=dtype)
    out = torch.empty_like(query)
    segments = 16  # vLLM's NUM_PAR_SOFTMAX_SEGMENTS; threshold as its backend (128 // J)
    seg_out = torch.empty(batch, h, segments, d, device=device, dtype=torch.float32)
    seg_max = torch.empty(batch, h, segments, device=device, dtype=torch.float32)
    seg_sum = torch.empty_like(seg_max)
    one = torch.ones(1, 1, device=device, dtype=torch.float32).expand(batch, j)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    lens = torch.full((batch,), seq_len, device=device, dtype=torch.int32)
    table = (torch.randperm(batch * nb, device=device) + 1).view(batch, nb).to(torch.int32)

    def step():
        unified_attention(
            q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=lens,
            max_seqlen_k=seq_len, softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1), block_table=table,
            softcap=0, q_descale=None, k_descale=one, v_descale=one, seq_threshold_3D=128 // j,
            num_par_softmax_segments=segments, softmax_segm_output=seg_out, softmax_segm_max=seg_max,
            softmax_segm_expsum=seg_sum)

    return bench(step)


def measure(kind: str, name: str, batch: int, seq_len: int, q_len: int, dtype, device, gpu: str,
            with_vllm: bool) -> dict:
    """One row: times, bytes, GB/s, fraction of peak; an exception in one part is recorded, not raised."""
    s = SHAPES[name]
    peak = peak_hbm(gpu)
    row = {"kind": kind, "shape": name, **asdict(s), "batch": batch, "context": seq_len, "q_len": q_len,
           "dtype": str(dtype).removeprefix("torch."), "gpu": gpu,
           "peak_hbm_gbps": None if peak is None else peak / 1e9}
    parts = [("dar", lambda: row.update(time_dar(batch, seq_len, q_len, s, dtype, device, graph=q_len == 1))),
             ("sdpa", lambda: row.update(sdpa_us=time_sdpa(batch, seq_len, q_len, s, dtype, device) * 1e6))]
    if with_vllm and q_len == 1:
        parts.append(("vllm", lambda: row.update(vllm_us=time_vllm(batch, seq_len, s, dtype, device) * 1e6)))
    for part, run in parts:
        try:
            run()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the rest of the grid
            row[f"{part}_error"] = f"{type(e).__name__}: {e}"[:500]
        torch.cuda.empty_cache()
    dar_t, sdpa_t = row.get("dar_us"), row.get("sdpa_us")
    row["speedup_vs_sdpa"] = round(sdpa_t / dar_t, 3) if dar_t and sdpa_t else None
    row["fraction_of_peak_hbm"] = None
    if q_len == 1:
        b = decode_bytes(seq_len, s, dtype.itemsize)
        dar_bytes, full_bytes = batch * b["dar"] + b["projections"], batch * b["full"]
        row.update(dar_bytes=dar_bytes, sdpa_bytes=full_bytes, bytes_ratio=round(full_bytes / dar_bytes, 3))
        for who, t, nbytes in (("dar", dar_t, dar_bytes), ("sdpa", sdpa_t, full_bytes),
                               ("vllm", row.get("vllm_us"), full_bytes)):
            gbps = nbytes / t / 1e3 if t else None  # bytes / us / 1e3 = GB/s
            row[f"{who}_gbps"] = None if gbps is None else round(gbps, 1)
            frac = round(gbps / row["peak_hbm_gbps"], 3) if gbps and row["peak_hbm_gbps"] else None
            row["fraction_of_peak_hbm" if who == "dar" else f"{who}_fraction_of_peak_hbm"] = frac
    for key in ("dar_us", "dar_graph_us", "sdpa_us", "vllm_us"):
        if row.get(key) is not None:
            row[key] = round(row[key], 2)
    return row


def check_targets(rows: list[dict]) -> dict:
    row = next((r for r in rows if all(r.get(k) == TARGETS[k] for k in ("shape", "kind", "context", "batch"))),
               None)
    if row is None:
        return {"row": None, "met": None}
    got = {k: row.get(k) for k in ("fraction_of_peak_hbm", "speedup_vs_sdpa")}
    met = all(got[k] is not None and got[k] >= TARGETS[k] for k in got)
    return {"row": {k: TARGETS[k] for k in ("shape", "kind", "context", "batch")}, "targets": {
        k: TARGETS[k] for k in got}, "measured": got, "met": met}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--no-prefill", action="store_true", help="decode rows only")
    ap.add_argument("--json", action="store_true", help="print each row as one JSON line")
    ap.add_argument("--out", help="also write {gpu, rows, targets} to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device on this machine, so the GPU kernels cannot be timed; nothing "
              "was measured (tests/kernels checks their results in Triton's interpreter).")
        return 0
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    with_vllm = importlib.util.find_spec("vllm") is not None
    grid = [("decode", n, b, c, 1) for n in args.shapes for c in args.contexts for b in args.batches]
    if not args.no_prefill:
        grid += [(kind, n, 1, c, CHUNK) for n in args.shapes
                 for kind, c in (("prefill", CHUNK), ("extend", EXTEND_HISTORY + CHUNK))]
    torch.manual_seed(0)
    t0, rows = time.time(), []
    for kind, name, batch, ctx, q_len in grid:
        row = measure(kind, name, batch, ctx, q_len, dtype, device, gpu, with_vllm)
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{kind:8s} {name:8s} batch {batch:3d} context {ctx:6d}: DAR {row.get('dar_us')} us, "
              f"SDPA {row.get('sdpa_us')} us, x{row['speedup_vs_sdpa']}, {row['fraction_of_peak_hbm']} of peak",
              flush=True)
    result = {"gpu": gpu, "peak_hbm_gbps": rows[0]["peak_hbm_gbps"], "dtype": args.dtype,
              "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "rows": rows,
              "targets": check_targets(rows)}
    print(json.dumps({"targets": result["targets"], "seconds": result["seconds"]}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if any("dar_error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
