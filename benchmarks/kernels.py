"""Decode attention on CUDA: the Triton DAR kernels vs vLLM's own Triton kernel at equal context and batch.

One layer of the default model's shape (H=9 query heads, J=3 KV heads, D=64, fp16 caches, block size 16), every
request decoding one token at ``--context``. DAR: window 64, ranks 16/16 per head, no sinks (``--window``,
``--rank``, ``--sinks``). vLLM: ``unified_attention`` (the kernel behind ``TRITON_ATTN``) with its split-softmax
(3D) path enabled as its backend enables it. Achieved GB/s = bytes a decode step must move (the byte model in
``vllm_dar.config``: K/V per sequence, DAR's fp32 projections once per step) / median time
(``triton.testing.do_bench``). The ratio is vLLM's time / DAR's time (> 1: DAR faster). Prints one JSON line per
batch size. Without a CUDA device it says so and exits 0: nothing here is measured on the CPU.

    python benchmarks/kernels.py                      # batches 1, 8, 32, 128 at 4096 tokens
    python benchmarks/kernels.py --context 16384 --batch 1 16
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

H, J, D, BLOCK = 9, 3, 64, 16


def _table(batch: int, blocks_per_seq: int, device) -> torch.Tensor:
    """Shuffled block ids (block 0 reserved as vLLM's null block)."""
    ids = torch.randperm(batch * blocks_per_seq, device=device) + 1
    return ids.view(batch, blocks_per_seq).to(torch.int32)


def bench_dar(batch: int, context: int, *, window: int, rank: int, sinks: int, device) -> float:
    from vllm_dar.ops.paged import PagedProjections
    from vllm_dar.ops.triton_ops import dar_paged_attention_triton
    from vllm_dar.reference import LayerProjections

    nb = -(-context // BLOCK)
    g = J  # per-head projections
    proj = PagedProjections.from_layer(LayerProjections(
        q_proj=torch.randn(J, D, rank) / D ** 0.5, k_down=torch.randn(g, D, rank) / D ** 0.5,
        v_down=torch.randn(g, D, rank) / D ** 0.5, v_up=torch.randn(J, rank, D) / rank ** 0.5), H)
    proj = PagedProjections(**{f: getattr(proj, f).to(device) for f in proj.__dataclass_fields__})
    # The window cache keeps few blocks per request in serving; allocating a full table only costs memory.
    window_cache = torch.randn(batch * nb + 1, J, BLOCK, 2 * D, device=device, dtype=torch.float16)
    far_cache = torch.randn(batch * nb + 1, g, BLOCK, 2 * rank, device=device, dtype=torch.float16)
    query = torch.randn(batch, H, D, device=device, dtype=torch.float16)
    key = torch.randn(batch, J, D, device=device, dtype=torch.float16)
    value = torch.randn_like(key)
    out = torch.empty_like(query)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    kw = {"window_cache": window_cache, "window_table": _table(batch, nb, device), "far_cache": far_cache,
          "far_table": _table(batch, nb, device), "query_start_loc": qsl, "seq_lens": lens, "proj": proj,
          "window": window, "sink_tokens": sinks, "scale": D ** -0.5}
    import triton.testing

    return triton.testing.do_bench(lambda: dar_paged_attention_triton(query, key, value, out, **kw)) * 1e-3


def bench_vllm(batch: int, context: int, *, device) -> float:
    import triton.testing
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    nb = -(-context // BLOCK)
    kv = torch.randn(batch * nb + 1, J, BLOCK, 2 * D, device=device, dtype=torch.float16)  # vLLM's layout
    key_cache, value_cache = kv.transpose(1, 2).split(D, dim=-1)  # [nb, BLOCK, J, D] views, as TRITON_ATTN
    query = torch.randn(batch, H, D, device=device, dtype=torch.float16)
    out = torch.empty_like(query)
    segments = 16  # vLLM's NUM_PAR_SOFTMAX_SEGMENTS; threshold as its backend (128 // J)
    seg_out = torch.empty(batch, H, segments, D, device=device, dtype=torch.float32)
    seg_max = torch.empty(batch, H, segments, device=device, dtype=torch.float32)
    seg_sum = torch.empty_like(seg_max)
    one = torch.ones(1, 1, device=device, dtype=torch.float32).expand(batch, J)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    table = _table(batch, nb, device)

    def run():
        unified_attention(
            q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=lens,
            max_seqlen_k=context, softmax_scale=D ** -0.5, causal=True, window_size=(-1, -1), block_table=table,
            softcap=0, q_descale=None, k_descale=one, v_descale=one, seq_threshold_3D=128 // J,
            num_par_softmax_segments=segments, softmax_segm_output=seg_out, softmax_segm_max=seg_max,
            softmax_segm_expsum=seg_sum)

    return triton.testing.do_bench(run) * 1e-3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device on this machine, so the GPU kernels cannot be timed; "
              "nothing was measured (tests/kernels checks their results in Triton's interpreter).")
        return 0
    from vllm_dar.config import DarConfig, ModelShape

    device = torch.device("cuda")
    torch.manual_seed(0)
    shape = ModelShape(num_layers=1, num_heads=H, num_kv_heads=J, head_dim=D)
    layer = DarConfig.uniform(shape, window=args.window, key_rank=args.rank, value_rank=args.rank,
                              sink_tokens=args.sinks)
    b = layer.decode_bytes(args.context, itemsize=2)  # fp16 caches
    for batch in args.batch:
        t_dar = bench_dar(batch, args.context, window=args.window, rank=args.rank, sinks=args.sinks, device=device)
        t_vllm = bench_vllm(batch, args.context, device=device)
        dar_bytes, full_bytes = batch * b.dar + b.projections, batch * b.full
        print(json.dumps({
            "context": args.context, "batch": batch, "dar_us": round(t_dar * 1e6, 1),
            "vllm_us": round(t_vllm * 1e6, 1), "dar_gbps": round(dar_bytes / t_dar / 1e9, 1),
            "vllm_gbps": round(full_bytes / t_vllm / 1e9, 1), "speedup_vs_vllm": round(t_vllm / t_dar, 2),
            "bytes_ratio": round(full_bytes / dar_bytes, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
