"""Per-layer-call time of DAR attention on the CPU: the C++ op (``vllm_dar.ops.cpp``), the per-request reference
op (``vllm_dar.ops.paged``) and stock vLLM's C++ CPU attention (``torch.ops._C.cpu_attention_with_kv_cache``,
called as ``vllm/v1/attention/backends/cpu_attn.py`` calls it, on a full-width cache in its own layout).

Columns: ``fast`` = the C++ op (``VLLM_DAR_OPS=cpp``), ``loop`` = the reference op (``VLLM_DAR_OPS=reference``,
also the fallback where the C++ op cannot be built), ``stock`` = vLLM's kernel. Times are process CPU time (the
machine is shared; wall time would count other processes holding our core), one thread.

Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64), DAR w=64, r=16/16 per head, 4 sinks. Block
sizes are what each engine uses: 128 for stock (vLLM's CPU default), 16-token window and 64-token far blocks for
DAR (the plugin's default; the far page equals the window page). Blocks are placed in random order.
Decode: batch 1/8/16/32 at context 512/2K/4K; prefill: one 512-token chunk at
context 512 (from scratch) and at context 4K (extend). Cache contents are random (timing only; correctness is
``tests/ops/test_cpp_ops.py``). Both engines' metadata is built once per batch and not timed, as each engine
builds it once per step for all layers: stock's scheduler metadata, and the int32 host offsets and block tables
our CPU builder hands the op (``plugin/cpu.py``).

``bound_us``: bytes a decode must read from the caches (DAR: far K/V of positions [S, L - w) at reduced width +
sinks + window at full width; stock: full K/V of all L positions) over the read bandwidth measured here (one
thread summing a 256 MB tensor; memcpy is printed too).

With ``--model DIR`` (a DAR checkpoint) each config is timed on every layer's own shape and projections (window,
ranks, groups; the far block the plugin would use), summed over the layers; stock is its one layer shape times
the number of layers; the reference loop is skipped.

    python benchmarks/attention_cpu.py [--json] [--quick] [--threads 1] [--profile CONFIG]
    python benchmarks/attention_cpu.py --model models/smollm2-135m-dar --configs decode_b16_ctx4096 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import harness
import torch

from vllm_dar import kv_dtype
from vllm_dar.checkpoint import load_dar
from vllm_dar.config import DarConfig, ModelShape
from vllm_dar.ops import cpp, paged
from vllm_dar.ops.paged import PagedProjections
from vllm_dar.reference import LayerProjections

BLOCK = 128  # stock's block (vLLM's CPU default)
WBLOCK = 16  # the plugin's default window block (VLLM_DAR_BLOCK_SIZE)


@dataclass(frozen=True)
class Layer:
    """One layer's attention shape: SmolLM2-135M's heads, and a DAR setting (``groups`` projection groups)."""

    H: int = 9
    J: int = 3
    D: int = 64
    groups: int = 3  # 3: per head, 1: joint
    rk: int = 16
    rv: int = 16
    window: int = 64
    sinks: int = 4

    def far_block(self, window_itemsize: int = 1, far_itemsize: int = 1) -> int:
        """The plugin's far block: the page of a window block (``DarConfig.far_block_tokens``), with the caches'
        element sizes (an FP8 far cache beside a wider window holds more positions per page)."""
        return self.config().far_block_tokens(WBLOCK, window_itemsize, far_itemsize)[0]

    def config(self) -> DarConfig:
        """This layer as a one-layer DarConfig (the byte model)."""
        return DarConfig.uniform(ModelShape(num_layers=1, num_heads=self.H, num_kv_heads=self.J, head_dim=self.D),
                                 window=self.window, key_rank=self.rk, value_rank=self.rv, sink_tokens=self.sinks,
                                 head_sharing="per_head" if self.groups == self.J else "joint")


DEFAULT = Layer()  # the fast model's layer: per head, w=64, r=16/16


def model_layers(model_dir: str) -> tuple[list[Layer], list[LayerProjections]]:
    """The layers of a DAR checkpoint (shapes and projections)."""
    cfg, projections = load_dar(model_dir)
    if cfg is None:
        raise SystemExit(f"{model_dir}: no dar section")
    s = cfg.shape
    return [Layer(H=s.num_heads, J=s.num_kv_heads, D=s.head_dim, groups=cfg.groups, rk=lay.key_rank,
                  rv=lay.value_rank, window=lay.window, sinks=lay.sink_tokens)
            for lay in map(cfg.layer, range(s.num_layers))], projections


def read_bandwidth() -> dict:
    """harness's probe at this process's thread count, in process CPU time: ``sum``, and ``copy`` as bytes
    copied."""
    n = torch.get_num_threads()
    bw = harness.memory_bandwidth(mib=256, repeats=5, threads=n, timer=time.process_time)
    return {"read_GBps": bw[f"read_{n}t"] / 1e9, "memcpy_GBps": bw[f"copy_{n}t"] / 2 / 1e9}


def _timed(fn) -> float:
    """CPU seconds of this process for one call: the machine is shared, and wall time counts the time other
    processes hold our core (all ops run on one thread here, see --threads)."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def bench(fn, min_time: float = 0.3, max_reps: int = 200) -> float:
    """Median CPU seconds per call (after two warm-up calls); calls are batched so a sample is >= 2 ms."""
    fn(), fn()
    t = time.process_time()
    fn()
    inner = max(1, int(2e-3 / max(time.process_time() - t, 1e-6)))
    times, start = [], time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_reps:
        times.append(_timed(lambda: [fn() for _ in range(inner)]) / inner)
    return statistics.median(times)


class Batch:
    """One batch in both layouts: DAR caches (window + far) of ``layer`` and a stock full-width cache; random
    contents, and random projections unless ``projections`` are given."""

    def __init__(self, reqs: list[tuple[int, int]], dtype: torch.dtype, layer: Layer = DEFAULT,
                 projections: LayerProjections | None = None, seed: int = 0, kv_cache_dtype: str = "auto"):
        g = torch.Generator().manual_seed(seed)
        self.reqs, self.dtype, self.layer = reqs, dtype, layer
        H, J, D, G, rk, rv = layer.H, layer.J, layer.D, layer.groups, layer.rk, layer.rv
        dg = J * D // G
        lp = projections or LayerProjections(
            q_proj=torch.randn(J, D, rk, generator=g) / 8, k_down=torch.randn(G, dg, rk, generator=g) / 8,
            v_down=torch.randn(G, dg, rv, generator=g) / 8, v_up=torch.randn(J, rv, D, generator=g) / 4)
        self.proj = PagedProjections.from_layer(lp, H)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)

        def paged(block: int, heads: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(cache [blocks, heads, block, width] with block 0 the null block, shuffled block table)"""
            nblk = [-(-s // block) for s, _ in reqs]
            perm = (torch.randperm(sum(nblk), generator=g) + 1).int()
            table = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
            at = 0
            for r, n in enumerate(nblk):
                table[r, :n], at = perm[at: at + n], at + n
            return rnd(sum(nblk) + 1, heads, block, width), table

        fp8 = kv_dtype.KV_CACHE_DTYPES[kv_cache_dtype]
        self.window_fp8, _ = kv_dtype.cache_dtypes(kv_cache_dtype)  # the window's too with VLLM_DAR_FP8_WINDOW=1
        self.itemsizes = kv_dtype.cache_itemsizes(kv_cache_dtype, dtype.itemsize)  # (window, far) as served
        self.window_cache, self.window_table = paged(WBLOCK, J, 2 * D)
        self.far_cache, self.far_table = paged(layer.far_block(*self.itemsizes), G, rk + rv)
        self.stock_cache, self.table = paged(BLOCK, J, 2 * D)
        self.kv_cache_dtype = self.stock_kv_cache_dtype = kv_cache_dtype
        if fp8 is not None:  # DAR's caches stored in FP8 as the plugin serves them (scales 1.0, vLLM's default)
            if self.window_fp8 is not None:
                self.window_cache = kv_dtype.quantize(self.window_cache, fp8)
            self.far_cache = kv_dtype.quantize(self.far_cache, fp8)
            if harness.fp8_kv_unsupported() is None:  # stock's too, as vLLM allocates it; else stock runs unquantized
                self.stock_cache = kv_dtype.quantize(self.stock_cache, fp8).view(torch.uint8)
            else:
                self.stock_kv_cache_dtype = "auto"
        t = sum(q for _, q in reqs)
        self.query, self.key, self.value = rnd(t, H, D), rnd(t, J, D), rnd(t, J, D)
        self.out = torch.empty(t, H, D, dtype=dtype)
        self.qsl = [0]
        for _, q in reqs:
            self.qsl.append(self.qsl[-1] + q)
        self.seq_lens = [s for s, _ in reqs]

    def dar_kwargs(self) -> dict:
        return {"window_cache": self.window_cache, "window_table": self.window_table, "far_cache": self.far_cache,
                "far_table": self.far_table, "query_start_loc": self.qsl, "seq_lens": self.seq_lens,
                "proj": self.proj, "window": self.layer.window, "sink_tokens": self.layer.sinks,
                "scale": self.layer.D ** -0.5}

    def fast(self):
        if not hasattr(self, "_fast"):  # int32 host offsets and tables, as the plugin's builder hands them
            kw = self.dar_kwargs()
            self._fast = {**kw, **{k: cpp._i32(kw[k])
                                   for k in ("query_start_loc", "seq_lens", "window_table", "far_table")}}
        cpp.dar_paged_attention_cpp(self.query, self.key, self.value, self.out, **self._fast)

    def loop(self):
        paged.dar_paged_attention(self.query, self.key, self.value, self.out, **self.dar_kwargs())

    def stock(self):
        """vLLM's C++ CPU attention, exactly as CPUAttentionBackendImpl.forward calls it."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        H, J, D = self.layer.H, self.layer.J, self.layer.D
        if not hasattr(self, "_stock"):
            isa = _get_attn_isa(self.dtype, BLOCK, D, self.stock_kv_cache_dtype)
            qsl = torch.tensor(self.qsl, dtype=torch.int32)
            lens = torch.tensor(self.seq_lens, dtype=torch.int32)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(self.reqs), num_heads=H, num_kv_heads=J, head_dim=D, seq_lens=lens, dtype=self.dtype,
                query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
            n = self.stock_cache.shape[0]
            k_cache, v_cache = self.stock_cache.view(n, J, 2 * BLOCK, D).chunk(2, dim=2)
            self._stock = {"key_cache": k_cache, "value_cache": v_cache, "query_start_loc": qsl, "seq_lens": lens,
                               "scheduler_metadata": meta}
        ops.cpu_attention_with_kv_cache(query=self.query, output=self.out, scale=D ** -0.5, causal=True,
                                        alibi_slopes=None, sliding_window=-1, block_table=self.table, softcap=0,
                                        s_aux=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype=self.stock_kv_cache_dtype,
                                        **self._stock)

    def bytes_read(self) -> dict:
        """Cache bytes a decode step must read (``vllm_dar.config``'s byte model: no block rounding)."""
        stock_size, _ = kv_dtype.cache_itemsizes(self.stock_kv_cache_dtype, self.dtype.itemsize, dar=False)
        dar = [self.layer.config().decode_bytes(s, *self.itemsizes) for s, _ in self.reqs]
        stock = [self.layer.config().decode_bytes(s, stock_size) for s, _ in self.reqs]
        return {"dar": sum(b.dar for b in dar), "stock": sum(b.full for b in stock)}


def configs(quick: bool, only: str | None = None):
    """(name, [(seq_len, query_len) per request]); ``only``: comma-separated names to keep."""
    def all_configs():
        ctxs, batches = ((512, 2048), (1, 8)) if quick else ((512, 2048, 4096), (1, 8, 16, 32))
        for ctx in ctxs:
            for b in batches:
                yield f"decode_b{b}_ctx{ctx}", [(ctx, 1)] * b
        yield "prefill_512_ctx512", [(512, 512)]
        if not quick:
            yield "prefill_512_ctx4096", [(4096, 512)]
    keep = set(only.split(",")) if only else None
    for name, reqs in all_configs():
        if keep is None or name in keep:
            yield name, reqs


def run(args) -> dict:
    """Each config's op times summed over the layers: the fast model's layer alone, or every layer of
    ``--model`` (stock: its one layer shape, times the number of layers; ``loop`` only without ``--model``)."""
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if not cpp.load():
        raise SystemExit("the C++ ops did not build (see the warning above)")
    build_s = time.perf_counter() - t  # ~0 when ~/.cache/torch_extensions already holds it
    bw = read_bandwidth()
    layers, projections = model_layers(args.model) if args.model else ([DEFAULT], [None])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = []
    for dtype in dtypes:
        for name, reqs in configs(args.quick, args.configs):
            row = {"config": name, "dtype": str(dtype).removeprefix("torch."), "kv_cache_dtype": args.kv_cache_dtype,
                   "fast_us": 0.0, "per_layer_us": []}
            by = {"dar": 0, "stock": 0}
            for lay, proj in zip(layers, projections):
                b = Batch(reqs, dtype, lay, proj, kv_cache_dtype=args.kv_cache_dtype)
                us = bench(b.fast) * 1e6
                row["fast_us"] += us
                row["per_layer_us"].append(round(us, 1))
                if "stock_us" not in row:
                    row["stock_us"] = bench(b.stock) * 1e6 * len(layers)
                    row["stock_kv_cache_dtype"] = b.stock_kv_cache_dtype
                    if not args.model:
                        row["loop_us"] = bench(b.loop, min_time=0.1, max_reps=20) * 1e6
                by = {k: by[k] + v for k, v in b.bytes_read().items()}
                del b
            if name.startswith("decode"):
                row |= {"dar_bytes": by["dar"], "stock_bytes": by["stock"],
                        "dar_bound_us": by["dar"] / (bw["read_GBps"] * 1e3),
                        "stock_bound_us": by["stock"] / (bw["read_GBps"] * 1e3)}
            row["fast_over_stock"] = row["fast_us"] / row["stock_us"]
            if "loop_us" in row:
                row["fast_over_loop"] = row["fast_us"] / row["loop_us"]
            if not args.model:
                del row["per_layer_us"]
            rows.append(row)
            print(f"{row['dtype']:9s} {args.kv_cache_dtype:8s} {name:22s} fast {row['fast_us']:9.0f} us  "
                  + (f"loop {row['loop_us']:9.0f} us  " if "loop_us" in row else "")
                  + f"stock ({row['stock_kv_cache_dtype']}) {row['stock_us']:8.0f} us  "
                  + f"fast/stock {row['fast_over_stock']:.2f}"
                  + (f"  bound dar {row['dar_bound_us']:.0f} stock {row['stock_bound_us']:.0f} us"
                     if "dar_bound_us" in row else ""), file=sys.stderr, flush=True)
    return {"threads": args.threads, "simd": cpp.simd(), "stock_fp8_refusal": harness.fp8_kv_unsupported(),
            "fp8_window": kv_dtype.cache_dtypes(args.kv_cache_dtype)[0] is not None,
            "timing": "median process CPU time per call, summed over the layers",
            "kernel_load_s": build_s, "bandwidth": bw, "model": args.model,
            "layers": [vars(lay) | {"far_block": lay.far_block()} for lay in layers],
            "block": BLOCK, "window_block": WBLOCK, "rows": rows}


def profile(name: str, dtype: str, model: str | None) -> None:
    torch.set_num_threads(1)
    reqs = dict(configs(False))[name]
    layers, projections = model_layers(model) if model else ([DEFAULT], [None])
    batches = [Batch(reqs, getattr(torch, dtype), lay, p) for lay, p in zip(layers, projections)]
    for b in batches:
        b.fast()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            for b in batches:
                b.fast()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--quick", action="store_true", help="contexts 512/2K, batches 1/8 only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(harness.RESULTS, "attention_cpu.json"))
    ap.add_argument("--profile", metavar="CONFIG", help="torch.profiler table of the fast op on one config")
    ap.add_argument("--dtype", default="float32", help="with --profile")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to time")
    ap.add_argument("--model", help="a DAR checkpoint: time every layer's shape (summed) instead of the fast "
                    "model's one layer")
    ap.add_argument("--configs", help="comma-separated config names (default: all)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=sorted(kv_dtype.KV_CACHE_DTYPES),
                    help="the caches' storage as vLLM's --kv-cache-dtype serves it (FP8 scales 1.0): stock's whole "
                         "cache, DAR's far cache, and its window too with VLLM_DAR_FP8_WINDOW=1")
    args = ap.parse_args()
    if args.profile:
        return profile(args.profile, args.dtype, args.model)
    res = run(args)
    if not args.quick and not args.configs and args.kv_cache_dtype == "auto":
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
