"""Fast CPU DAR attention over paged caches (same contract as ``vllm_dar.ops.paged.dar_paged_attention``, tested
equal to it and to ``vllm_dar.reference.dar_attention``): the whole batch goes to the C++ kernel in
``vllm_dar.ops.cpu_kernel`` (built on first use), else to the vectorised PyTorch path in this file.

Layout and semantics: see ``vllm_dar.ops.paged``. Shapes: ``R`` requests, ``H`` query heads, ``J`` KV heads,
``G`` projection groups, ``hpg = H / G`` query heads per group, ``rep = H / J``, ``D`` head_dim, ``rk``/``rv``
ranks, ``nb`` gathered blocks, ``B`` block size, ``S`` sink tokens, ``w`` window.

PyTorch path. Decode (one scheduled token per request) is one pass over the batch: the far blocks of all requests
in one ``index_select`` into a reused buffer (``[R, nb, G, B, rk + rv]``), scores at reduced width as one
broadcast matmul in that layout, values accumulated at width ``rv`` and projected up once per head, GQA through
a ``[G, hpg]`` view of the heads; the window part (sinks + ``w - 1`` history slots + the fresh token) at full
width; one softmax through a shared max. Prefill / extend chunks loop over requests, by query tiles of at most
``_TILE_ELEMS`` score elements (a 4K chunk never builds an ``[H, T, T]`` tensor).

Profile (torch.profiler, perf; SmolLM2 shapes H=9 J=3 D=64, r=16/16 per head, w=64, S=4, block 128, one
thread, process CPU time on the shared 2-core machine; ``benchmarks/attention_cpu.py``):

1. First version of the PyTorch decode, batch 8 at 2K, fp32: 8.6 ms per layer call, stock vLLM 2.4-4 ms.
   ``index_select`` of the far blocks was 30% (2.6-3.5 ms for 6 MB): a fresh multi-MB output page-faults on every
   call (0.16 ms into a reused buffer, hence ``_workspace``); then a masked copy of V (NaN guard) 1.3 ms and
   384 tiny [3 x 16] x [16 x 128] GEMMs 0.9 ms (MKL runs these far below bandwidth; a [G*R]-batched layout
   was no better once the permute copy is counted).
2. With reused buffers and only the stale tail of each request's last block zeroed: ~3-5 ms, and ~40 ATen ops
   per call, so batch 1 at 512 cost 0.6 ms against stock's 25 us: dispatch-bound. 30 layers x 0.6 ms would
   cost more than the whole stock decode step.
3. ``torch.compile`` (inductor, dynamic=True) of the same decode math: 0.55 ms at batch 1 / 512 and 11 ms at
   batch 8 / 2K (fused gather, but reductions not vectorised well), 35-65 s to compile per shape, and it
   recompiled on the batch size. Not used.
4. So the hot path is C++ (``cpu_kernel``): paged reads in place, one work item per (request, group, tile of
   queries), far blocks streamed and transposed once per item, scores vectorised over positions. perf showed,
   in turn: scalar transposes stalling on cache misses (stream rows first, then transpose in L1 with a
   non-power-of-2 stride), score accumulators bouncing through memory (loop order: positions outer, ranks
   unrolled via compile-time rk=rv=16, D=64), and scalar ``exp`` (GCC would not vectorise it: written with
   AVX-512 intrinsics). Each step roughly halved the time.
5. Engine level, batch 1 at 512 (``benchmarks/throughput.py``): DAR's decode step was 1.11x stock's although the
   attention op costs only ~0.6 ms more per step. The rest was the cache write: ~15 ATen ops per layer (four of
   them advanced-index stores) cost 90 us per layer, 2.7 ms per step. One C++ call (``cpu_kernel.write``) takes
   10 us; the step then measured 1.00x stock. Later perf of batch 16 at 4K: a third of the kernel's samples
   on the far cache stream (loads missing to DRAM), 12% on the reduced value sums (one FMA chain per row:
   now four chains) and 6% on a max the compiler left scalar (now AVX-512): 4.76 -> 4.43 ms per layer.

Result (median CPU time per layer call, one thread, loaded machine; ``benchmarks/results/attention_cpu.json``):
decode fp32 batch 8/16/32 at 2K: 1.43/3.07/7.88 ms vs stock 3.56/7.58/16.2 ms (0.40-0.49x); at 4K batch 16:
5.5 ms vs 13.3 ms (0.42x; bf16 5.9 vs 9.0, 0.65x); batch 1 at 512: 51 us vs 30 us (1.7x: ~20 us of Python
checks and index tensors plus the kernel's fixed cost); 512-token prefill from scratch 9.5 ms vs 4.1 ms (2.3x:
the band and the reduced triangle are row-wise work that the stock kernel does with tiled GEMMs; open), at 4K
context 55 ms vs 55 ms (bf16 54 vs 71). The bytes-moved bound (cache bytes / 15.6 GB/s measured read rate) for
batch 16 at 4K is 1.7 ms for DAR and 6.4 ms for stock: both kernels run 2-3x above their bound. The PyTorch
path stays 3-10x slower than the kernel and is the fallback where no C++ compiler is available (``VLLM_DAR_CPU_KERNEL=0`` forces it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vllm_dar.ops import cpu_kernel
from vllm_dar.ops.paged import PagedProjections, write_kv

USE_KERNEL = True  # the whole batch through the C++ kernel (vllm_dar.ops.cpu_kernel) when it builds
_TILE_ELEMS = 1 << 22  # score elements per prefill query tile (16 MB fp32)
_NEG_INF = float("-inf")


def _kernel_reads(window_cache: Tensor, far_cache: Tensor) -> bool:
    """Whether the C++ kernel serves this call: it is enabled and built, and both caches have dense blocks
    (padded pages of per-layer ranks are strided views of dense blocks, read through the block stride)."""
    return (USE_KERNEL and cpu_kernel.dense_blocks(window_cache) and cpu_kernel.dense_blocks(far_cache)
            and cpu_kernel.kernel() is not None)


def write_kv_batched(key: Tensor, value: Tensor, *, window_cache: Tensor, window_slots: Tensor, far_cache: Tensor,
                     far_slots: Tensor, proj: PagedProjections) -> None:
    """``vllm_dar.ops.paged.write_kv`` as one C++ call when the kernel serves the caches. The PyTorch form
    (~15 ATen ops, four of them advanced-index stores) cost ~0.1 ms per layer, ~3 ms per decode step of a
    30-layer model."""
    if _kernel_reads(window_cache, far_cache):
        cpu_kernel.write(key, value, window_cache=window_cache, window_slots=window_slots, far_cache=far_cache,
                         far_slots=far_slots, k_down=proj.k_down, v_down=proj.v_down)
        return
    write_kv(key, value, window_cache=window_cache, window_slots=window_slots, far_cache=far_cache,
             far_slots=far_slots, proj=proj)


def dar_paged_attention_batched(query: Tensor, key: Tensor, value: Tensor, output: Tensor, *, window_cache: Tensor,
                                window_table: Tensor, far_cache: Tensor, far_table: Tensor,
                                query_start_loc: list[int], seq_lens: list[int], proj: PagedProjections,
                                window: int, sink_tokens: int, scale: float) -> None:
    """DAR attention for a batch (decodes and prefill chunks in any order), into ``output``.

    query: [T, H, D]; key, value: [T, J, D] (fresh, post-RoPE, same token order); output: [T, H, D];
    window_cache [nbw, J, Bw, 2D] + window_table [R, *]; far_cache [nbf, G, Bf, rk + rv] + far_table [R, *];
    query_start_loc: R + 1 offsets; seq_lens: R. Computes in fp32, writes ``output.dtype``.
    """
    if _kernel_reads(window_cache, far_cache):
        cpu_kernel.attention(query, key, value, output, window_cache=window_cache, window_table=window_table,
                             far_cache=far_cache, far_table=far_table, query_start_loc=query_start_loc,
                             seq_lens=seq_lens, q_proj=proj.q_proj, v_up=proj.v_up, window=window,
                             sink_tokens=sink_tokens, scale=scale)
        return
    dec, pre = [], []
    for r in range(len(seq_lens)):
        n = query_start_loc[r + 1] - query_start_loc[r]
        if n == 1:
            dec.append(r)
        elif n > 1:
            pre.append(r)
    kw = {"proj": proj, "window": window, "sink_tokens": sink_tokens, "scale": scale}
    if dec:
        rows = torch.tensor(dec)
        tok = torch.tensor([query_start_loc[r] for r in dec])
        lens = [seq_lens[r] for r in dec]
        wt, ft = (window_table, far_table) if not pre else (window_table[rows], far_table[rows])
        out = decode_attention(query[tok], key[tok], value[tok], window_cache, wt, far_cache, ft, lens, **kw)
        output[tok] = out.to(output.dtype)
    for r in pre:
        a, b = query_start_loc[r], query_start_loc[r + 1]
        output[a:b] = chunk_attention(query[a:b], key[a:b], value[a:b], window_cache, window_table[r], far_cache,
                                      far_table[r], seq_lens[r], **kw).to(output.dtype)


_WORKSPACE: dict[str, Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A reused buffer: fresh multi-MB outputs cost a page fault per 4 KB on every call (measured: a 6 MB
    ``index_select`` took 3.5 ms into a fresh tensor, 0.16 ms into a reused one)."""
    n = 1
    for x in shape:
        n *= x
    buf = _WORKSPACE.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _WORKSPACE[name] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _gather_far_blocks(far_cache: Tensor, far_table: Tensor, lens: Tensor, n_red: Tensor, nb: int) -> Tensor:
    """Whole far blocks [R, nb, G, Bf, C] of every request, as fp32, in a reused buffer.

    Blocks a request does not need are read from its first block instead (the null block and freed blocks are
    never read) and zeroed; so are the slots at or past a request's length inside its last needed block (they
    may hold anything, NaN in the tests): a zero probability times NaN would leak. The caller masks scores.
    """
    bf = far_cache.shape[2]
    r_n = far_table.shape[0]
    table = far_table[:, :nb].long()  # [R, nb]
    used = torch.arange(nb).unsqueeze(0) * bf < n_red.unsqueeze(1)  # [R, nb]
    table = torch.where(used, table, table[:, :1])
    shape = (r_n, nb, *far_cache.shape[1:])
    kv = _workspace("far", shape, far_cache.dtype)
    torch.index_select(far_cache.view(far_cache.shape[0], -1), 0, table.reshape(-1), out=kv.view(r_n * nb, -1))
    if kv.dtype != torch.float32:
        kv = _workspace("far32", shape, torch.float32).copy_(kv)
    if not bool(used.all()):
        kv.view(r_n * nb, -1)[~used.view(-1)] = 0.0  # redirected copies (their tails may be stale too)
    last = ((n_red - 1) // bf).clamp(min=0)  # [R]: last block holding a reduced position
    rows = torch.arange(r_n)
    tail = kv[rows, last]  # [R, G, Bf, C]
    stale = torch.arange(bf).unsqueeze(0) >= (lens - last * bf).unsqueeze(1)  # [R, Bf]: past seq_len
    kv[rows, last] = tail.masked_fill_(stale.view(r_n, 1, bf, 1), 0.0)
    return kv


def _far_scores(q: Tensor, proj: PagedProjections, far_cache: Tensor, far_table: Tensor, lens: Tensor,
                window: int, sink_tokens: int, scale: float):
    """Reduced-width scores of decode queries q [R, H, D] over positions [S, len - w).

    Returns (scores [R, nb, G, hpg, Bf] masked with -inf, values [R, nb, G, Bf, rv]) or None when no request
    has a reduced position.
    """
    r_n, h, _ = q.shape
    g, bf = far_cache.shape[1], far_cache.shape[2]
    rk = proj.k_down.shape[-1]
    n_red = (lens - window).clamp(min=0)  # [R]: positions < n_red are reduced (if >= S)
    max_red = int(n_red.max())
    if max_red <= sink_tokens:
        return None
    nb = -(-max_red // bf)
    kv = _gather_far_blocks(far_cache, far_table, lens, n_red, nb)  # [R, nb, G, Bf, C] fp32
    pos = torch.arange(nb * bf).view(1, nb, 1, 1, bf)  # [1, nb, 1, 1, Bf]
    ok = (pos >= sink_tokens) & (pos < n_red.view(-1, 1, 1, 1, 1))  # [R, nb, 1, 1, Bf]
    vals = kv[..., rk:]  # [R, nb, G, Bf, rv]
    qr = torch.bmm(q.transpose(0, 1), proj.q_proj).transpose(0, 1)  # [R, H, rk]
    qr = (qr * scale).reshape(r_n, 1, g, h // g, rk)  # [R, 1, G, hpg, rk]
    scores = torch.matmul(qr, kv[..., :rk].transpose(-1, -2))  # [R, nb, G, hpg, Bf]
    return scores.masked_fill_(~ok, _NEG_INF), vals


def _window_slots(lens: Tensor, window: int, sink_tokens: int) -> tuple[Tensor, Tensor]:
    """History positions a decode query at t = len - 1 sees at full width from the window cache.

    Returns (positions [R, S + w - 1] clamped to >= 0, valid [R, S + w - 1]): sink slots p < min(S, t - w + 1),
    then window slots t - w + 1 + k (k < w - 1), valid when >= 0. The fresh token itself is not among them.
    """
    t = (lens - 1).unsqueeze(1)  # [R, 1]
    sinks = torch.arange(sink_tokens).unsqueeze(0)  # [1, S]
    hist = t - window + 1 + torch.arange(max(window - 1, 0)).unsqueeze(0)  # [R, w - 1]
    pos = torch.cat([sinks.expand(t.shape[0], -1), hist], dim=1)  # [R, P]
    valid = torch.cat([sinks < t - window + 1, hist >= 0], dim=1)
    valid[:, :sink_tokens] &= sinks < t  # sinks inside the current chunk are not in the cache
    return pos.clamp(min=0), valid


def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, window_cache: Tensor, window_table: Tensor,
                     far_cache: Tensor, far_table: Tensor, lens: list[int], *, proj: PagedProjections, window: int,
                     sink_tokens: int, scale: float) -> Tensor:
    """One query per request. q: [R, H, D]; k_new, v_new: [R, J, D]; tables [R, *]; lens: R -> [R, H, D] fp32."""
    r_n, h, d = q.shape
    j = k_new.shape[1]
    rep = h // j
    lens_t = torch.tensor(lens)
    qf = q.float()  # [R, H, D]

    # Full width: sinks + window history from the cache, then the fresh token.
    pos, valid = _window_slots(lens_t, window, sink_tokens)  # [R, P]
    bw = window_cache.shape[2]
    blocks = torch.gather(window_table.long(), 1, pos // bw)  # [R, P]
    kvw = window_cache[blocks, :, pos % bw, :].float()  # [R, P, J, 2D]
    kvw = kvw.masked_fill_(~valid.view(r_n, -1, 1, 1), 0.0)
    qj = qf.view(r_n, j, rep, d)  # [R, J, rep, D]
    s_win = torch.matmul(qj, kvw[..., :d].permute(0, 2, 3, 1)) * scale  # [R, J, rep, P]
    s_win = s_win.masked_fill_(~valid.view(r_n, 1, 1, -1), _NEG_INF)
    t = lens_t - 1
    cur_full = (t < sink_tokens) | (window >= 1)  # [R]: the token itself at full width
    s_cur = (qj * k_new.float().unsqueeze(2)).sum(-1) * scale  # [R, J, rep]
    s_cur = s_cur.masked_fill_(~cur_full.view(r_n, 1, 1), _NEG_INF)

    far = _far_scores(qf, proj, far_cache, far_table, lens_t, window, sink_tokens, scale)
    m = torch.maximum(s_win.amax(-1), s_cur) if s_win.shape[-1] else s_cur  # [R, J, rep]
    if far is not None:
        s_far, v_far = far
        m = torch.maximum(m, s_far.amax(dim=(1, 4)).view(r_n, j, rep))
    e_win = torch.exp(s_win - m.unsqueeze(-1))  # [R, J, rep, P]
    e_cur = torch.exp(s_cur - m)  # [R, J, rep]
    denom = e_win.sum(-1) + e_cur  # [R, J, rep]
    acc = torch.matmul(e_win, kvw[..., d:].transpose(1, 2)) + e_cur.unsqueeze(-1) * v_new.float().unsqueeze(2)
    if far is not None:
        g = s_far.shape[2]
        e_far = torch.exp(s_far - m.view(r_n, 1, g, h // g, 1))  # [R, nb, G, hpg, Bf]
        denom = denom + e_far.sum(dim=(1, 4)).view(r_n, j, rep)
        acc_r = torch.matmul(e_far, v_far).sum(1).view(r_n, h, -1)  # [R, H, rv]: reduced width
        up = torch.bmm(acc_r.transpose(0, 1), proj.v_up).transpose(0, 1)  # [R, H, D]: once per head
        acc = acc + up.view(r_n, j, rep, d)
    return (acc / denom.unsqueeze(-1)).view(r_n, h, d)


def _history(window_cache: Tensor, window_row: Tensor, far_cache: Tensor, far_row: Tensor, c0: int, n_red: int,
             window: int, sink_tokens: int, rk: int):
    """One request's history: full-width K/V [Ph, J, D] x2 at positions ``hist_pos`` [Ph] (sinks, then the window
    of the first query, all < c0), and reduced K/V [G, n_red - S, rk | rv] of positions [S, n_red)."""
    d = window_cache.shape[-1] // 2
    lo = max(0, c0 - max(window, 1) + 1)
    hist_pos = torch.cat([torch.arange(min(sink_tokens, lo)), torch.arange(lo, c0)])  # [Ph]
    bw = window_cache.shape[2]
    kvw = window_cache[window_row[hist_pos // bw].long(), :, hist_pos % bw, :].float()  # [Ph, J, 2D]
    k_red = v_red = None
    if n_red > sink_tokens:
        bf = far_cache.shape[2]
        nb = -(-n_red // bf)
        kv = far_cache.index_select(0, far_row[:nb].long())  # [nb, G, Bf, C]
        kv = kv.transpose(0, 1).reshape(kv.shape[1], nb * bf, -1)[:, sink_tokens:n_red].float()  # [G, Nr, C]
        k_red, v_red = kv[..., :rk], kv[..., rk:]
    return kvw[..., :d], kvw[..., d:], hist_pos, k_red, v_red


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, window_cache: Tensor, window_row: Tensor, far_cache: Tensor,
                    far_row: Tensor, seq_len: int, *, proj: PagedProjections, window: int, sink_tokens: int,
                    scale: float) -> Tensor:
    """One request's chunk of Tq > 1 queries at positions [seq_len - Tq, seq_len). q: [Tq, H, D];
    k, v: [Tq, J, D] -> [Tq, H, D] fp32, by query tiles."""
    tq, h, d = q.shape
    j = k.shape[1]
    rk = proj.k_down.shape[-1]
    c0 = seq_len - tq
    n_red = max(0, seq_len - window)
    k_h, v_h, hist_pos, k_red, v_red = _history(window_cache, window_row, far_cache, far_row, c0, n_red, window,
                                                sink_tokens, rk)
    k_full = torch.cat([k_h, k.float()]).transpose(0, 1)  # [J, Pf, D]: sinks, window history, chunk
    v_full = torch.cat([v_h, v.float()]).transpose(0, 1)  # [J, Pf, D]
    pos_full = torch.cat([hist_pos, torch.arange(c0, seq_len)])  # [Pf] ascending
    n_sink = int(torch.searchsorted(pos_full, sink_tokens))  # positions < S lead pos_full (history or chunk)
    qh = (q.float() * scale).transpose(0, 1)  # [H, Tq, D]
    qr = torch.bmm(qh, proj.q_proj) if k_red is not None else None  # [H, Tq, rk]
    g = proj.k_down.shape[0]
    out = torch.empty(tq, h, d)
    n_hist_red = k_red.shape[1] if k_red is not None else 0
    tile = max(16, min(tq, _TILE_ELEMS // (h * (n_hist_red + window + n_sink + min(tq, 256)))))
    for i0 in range(0, tq, tile):
        i1 = min(tq, i0 + tile)
        t = torch.arange(c0 + i0, c0 + i1).unsqueeze(1)  # [Qt, 1]
        # Full keys: the sinks plus the band [t0 - w + 1, t1 - 1] (indices into the ascending pos_full).
        b0 = int(torch.searchsorted(pos_full, c0 + i0 - window + 1))
        b1 = len(hist_pos) + i1
        sel = torch.cat([torch.arange(n_sink), torch.arange(max(b0, n_sink), b1)])  # [Pt]
        sp = pos_full[sel].unsqueeze(0)  # [1, Pt]
        ok_f = (sp <= t) & ((t - sp < window) | (sp < sink_tokens))  # [Qt, Pt]
        s_f = torch.matmul(qh[:, i0:i1].reshape(j, -1, d), k_full[:, sel].transpose(1, 2))  # [J, rep*Qt, Pt]
        s_f = s_f.view(h, i1 - i0, -1).masked_fill_(~ok_f, _NEG_INF)
        n_r = 0
        if k_red is not None:
            n_r = max(0, min(k_red.shape[1], c0 + i1 - window - sink_tokens))  # reduced keys the tile can see
        if n_r == 0:
            p = torch.softmax(s_f, dim=-1)
            o = torch.matmul(p.view(j, -1, p.shape[-1]), v_full[:, sel]).view(h, i1 - i0, d)
        else:
            sr = torch.arange(sink_tokens, sink_tokens + n_r).unsqueeze(0)  # [1, Nt]
            s_r = torch.matmul(qr[:, i0:i1].reshape(g, -1, rk), k_red[:, :n_r].transpose(1, 2))  # [G, hpg*Qt, Nt]
            s_r = s_r.view(h, i1 - i0, n_r).masked_fill_(t - sr < window, _NEG_INF)
            p = torch.softmax(torch.cat([s_f, s_r], dim=-1), dim=-1)  # [H, Qt, Pt + Nt]
            pf, pr = p[..., : s_f.shape[-1]], p[..., s_f.shape[-1]:]
            o = torch.matmul(pf.reshape(j, -1, pf.shape[-1]), v_full[:, sel]).view(h, i1 - i0, d)
            acc = torch.matmul(pr.reshape(g, -1, n_r), v_red[:, :n_r]).view(h, i1 - i0, -1)  # [H, Qt, rv]
            o = o + torch.bmm(acc, proj.v_up)
        out[i0:i1] = o.transpose(0, 1)
    return out
