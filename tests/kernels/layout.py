"""Paged test batches for the kernel tests: dense random sequences, their paged caches, and the dense reference.

Blocks come from a shuffled shared pool, block 0 is the null block, and every slot the contract does not promise
(unused blocks, the null block, the chunk's own window slots, window slots older than the first query's window)
holds NaN: a kernel reading anything it must not turns the output NaN.

Where the kernels run (``kernel_device``): natively on the CUDA device when there is one, else on the CPU in
Triton's interpreter. Batches put what the kernels read on that device; the dense reference stays on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_dar.ops.paged import PagedProjections, reduce_tokens, write_slots
from vllm_dar.reference import LayerProjections, dar_attention


def kernel_device() -> torch.device:
    """The CUDA device when there is one (kernels compiled for it), else the CPU (Triton's interpreter).
    ``TRITON_INTERPRET=1`` in the environment asks for the interpreter on a GPU machine too."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    key_rank: int
    value_rank: int
    joint: bool = False

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def groups(self) -> int:
        return 1 if self.joint else self.kv_heads


@dataclass(frozen=True)
class Batch:
    query: Tensor  # [T, H, D]
    key: Tensor  # [T, J, D] fresh K of the scheduled tokens
    value: Tensor  # [T, J, D]
    window_cache: Tensor  # [nbw, J, Bw, 2D]
    window_table: Tensor  # [R, mbw]
    far_cache: Tensor  # [nbf, G, Bf, rk + rv]
    far_table: Tensor  # [R, mbf]
    query_start_loc: list[int]
    seq_lens: list[int]
    proj: PagedProjections
    reference: Tensor  # [T, H, D] dense DAR attention, query dtype, on the CPU

    def kwargs(self, *, window: int, sink_tokens: int, scale: float) -> dict:
        return {"window_cache": self.window_cache, "window_table": self.window_table, "far_cache": self.far_cache,
                "far_table": self.far_table, "query_start_loc": self.query_start_loc, "seq_lens": self.seq_lens,
                "proj": self.proj, "window": window, "sink_tokens": sink_tokens, "scale": scale}


def random_projections(s: Shape, gen: torch.Generator) -> LayerProjections:
    g, d = s.groups, s.head_dim
    dg = d * s.kv_heads // g

    def rnd(*shape, fan):
        return torch.randn(*shape, generator=gen) / fan ** 0.5

    return LayerProjections(q_proj=rnd(s.kv_heads, d, s.key_rank, fan=d), k_down=rnd(g, dg, s.key_rank, fan=dg),
                            v_down=rnd(g, dg, s.value_rank, fan=dg),
                            v_up=rnd(s.kv_heads, s.value_rank, d, fan=s.value_rank))


def nan_cache(num_blocks: int, heads: int, block: int, width: int, dtype, first_block: int = 0,
              device: torch.device | str = "cpu") -> Tensor:
    """[num_blocks, heads, block, width] NaN cache. With ``first_block`` (huge block ids): allocated without
    touching memory; blocks 0 and >= first_block are NaN, the untouched ones in between are never read."""
    if first_block == 0:
        return torch.full((num_blocks, heads, block, width), float("nan"), dtype=dtype, device=device)
    cache = torch.empty((num_blocks, heads, block, width), dtype=dtype, device=device)  # CPU: virtual memory only
    cache[0] = float("nan")
    cache[first_block:] = float("nan")
    return cache


def build_batch(reqs: list[tuple[int, int]], s: Shape, *, window: int, sinks: int, dtype=torch.float32,
                window_block: int = 8, far_block: int = 16, table_dtype=torch.int64, first_block: int = 0,
                scale: float = 0.3, seed: int = 0, device: torch.device | str = "cpu") -> Batch:
    """reqs: (seq_len, q_len) per request. ``first_block`` > 0 puts every block id at or above it. Caches, tables,
    activations and projections on ``device``; the reference on the CPU (the same values on any device)."""
    gen = torch.Generator().manual_seed(seed)
    h, j, d, g = s.heads, s.kv_heads, s.head_dim, s.groups
    rk, rv = s.key_rank, s.value_rank
    proj = random_projections(s, gen)
    n_w = sum(-(-n // window_block) for n, _ in reqs) + 3
    n_f = sum(-(-n // far_block) for n, _ in reqs) + 3
    base = max(1, first_block)  # block 0: the null block
    wcache = nan_cache(base + n_w, j, window_block, 2 * d, dtype, first_block, device)
    fcache = nan_cache(base + n_f, g, far_block, rk + rv, dtype, first_block, device)
    wfree = (torch.randperm(n_w, generator=gen) + base).tolist()
    ffree = (torch.randperm(n_f, generator=gen) + base).tolist()
    width_w = max(-(-n // window_block) for n, _ in reqs) + 2
    width_f = max(-(-n // far_block) for n, _ in reqs) + 2
    wtable = torch.zeros(len(reqs), width_w, dtype=table_dtype)  # unused entries: the null block
    ftable = torch.zeros(len(reqs), width_f, dtype=table_dtype)
    qs, ks, vs, refs, qsl = [], [], [], [], [0]
    for r, (seq_len, q_len) in enumerate(reqs):
        k = torch.randn(seq_len, j, d, generator=gen).to(dtype)  # [L, J, D]
        v = torch.randn(seq_len, j, d, generator=gen).to(dtype)
        q = torch.randn(q_len, h, d, generator=gen).to(dtype)  # [Tq, H, D]
        nw, nf = -(-seq_len // window_block), -(-seq_len // far_block)
        wrow, wfree[:] = torch.tensor(wfree[:nw], dtype=torch.int64), wfree[nw:]
        frow, ffree[:] = torch.tensor(ffree[:nf], dtype=torch.int64), ffree[nf:]
        wtable[r, :nw], ftable[r, :nf] = wrow.to(table_dtype), frow.to(table_dtype)
        pos = torch.arange(seq_len)
        c0 = seq_len - q_len
        kept = (pos < c0) & ((pos < sinks) | (pos >= max(0, c0 - max(window, 1) + 1)))  # window cache contract
        write_slots(wcache, torch.where(kept, wrow[pos // window_block] * window_block + pos % window_block,
                                        -1).to(device), k.to(device), v.to(device))
        write_slots(fcache, (frow[pos // far_block] * far_block + pos % far_block).to(device),
                    reduce_tokens(k, proj.k_down).to(device), reduce_tokens(v, proj.v_down).to(device))
        ref = dar_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], proj,
                            window=window, sink_tokens=sinks, scale=scale)  # [1, H, Tq, D]
        qs.append(q)
        ks.append(k[c0:])
        vs.append(v[c0:])
        refs.append(ref[0].transpose(0, 1))
        qsl.append(qsl[-1] + q_len)
    return Batch(query=torch.cat(qs).to(device), key=torch.cat(ks).to(device), value=torch.cat(vs).to(device),
                 window_cache=wcache, window_table=wtable.to(device), far_cache=fcache, far_table=ftable.to(device),
                 query_start_loc=qsl, seq_lens=[n for n, _ in reqs],
                 proj=PagedProjections.from_layer(proj, h).to(device), reference=torch.cat(refs))
