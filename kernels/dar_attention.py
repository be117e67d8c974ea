"""Triton DAR paged attention: one code path for decode, prefill and extend chunks, in three launches.

1. ``dar_query_project_kernel``: ``q Q_h`` once per (token, head), softmax scale and log2(e) folded in.
2. ``dar_far_kernel``: split-K (flash-decoding) over the reduced-width history of each query tile, all query heads
   of a projection group in one program (the group's reduced K/V are read once for all of them); writes partial
   (max, sum, reduced-width accumulator) per split.
3. ``dar_full_kernel``: the full-width part (sinks + window from the window cache, the chunk's own K/V from the
   fresh tensors), all query heads of a KV head in one program; merges the far partials by log-sum-exp into one
   softmax, projects the reduced accumulator up (``v_up``) once per head and writes the output.

A "row" of a program is one (query token, query head) pair: ``ROWS = BLOCK_M * HEADS_PAD``, token-major. Scores
live in the log2 domain (``exp2``), the running max starts at a finite ``-1e30`` so fully masked rows stay NaN-free.
Launchers, grids and block sizes: ``vllm_dar.ops.triton_ops``. Semantics: ``vllm_dar.reference.dar_attention``.
"""
import triton
import triton.language as tl

# Start of running maxima: exp2(NEG_BIG - real score) == 0 and exp2(NEG_BIG - NEG_BIG) == 1 (no inf - inf).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32, operands in their (cache) dtype: tensor cores for bf16/fp16, IEEE fp32 otherwise.
    UPCAST runs the same products in fp32 (16-bit x 16-bit products are exact in fp32): Triton's interpreter
    multiplies the raw bits of bf16 operands in ``tl.dot`` (triton-lang/triton#11584, "not supported yet"), so the
    launcher sets it when interpreting."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_M: tl.constexpr):
    """The request owning query tile ``tile``. Request r's tiles start at ``qsl[r] // BLOCK_M + r`` (a request
    wastes at most one partial tile, so ``T // BLOCK_M + R`` tiles cover any batch): binary search for the last
    request whose first tile is <= ``tile``. (The tile numbering is the idea of vLLM's unified Triton attention.)"""
    lo: tl.int32 = 0
    hi = num_reqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def tile_rows(query_start_loc_ptr, seq_lens_ptr, num_reqs, tile, first_head,
              HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Geometry of a query tile: its request, token range and, per row, token, head, position and validity."""
    req = find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_M)
    q_begin = tl.load(query_start_loc_ptr + req)
    q_end = tl.load(query_start_loc_ptr + req + 1)
    q_start = q_begin + (tile - (q_begin // BLOCK_M + req)) * BLOCK_M  # first token of this tile
    c0 = tl.load(seq_lens_ptr + req) - (q_end - q_begin)  # position of the request's first query
    rows = tl.arange(0, BLOCK_M * HEADS_PAD)
    tok = q_start + rows // HEADS_PAD  # [ROWS]
    hh = rows % HEADS_PAD
    row_ok = (tok < q_end) & (hh < HEADS)
    pos = c0 + tok - q_begin  # [ROWS] query positions
    t_first = c0 + q_start - q_begin
    t_last = c0 + tl.minimum(q_start + BLOCK_M, q_end) - 1 - q_begin
    return req.to(tl.int64), q_begin, q_start >= q_end, c0, tok.to(tl.int64), first_head + hh, row_ok, pos, \
        t_first, t_last


@triton.jit
def dar_query_project_kernel(
    query_ptr,  # [T, H, D]
    q_proj_ptr,  # [H, D, RK] fp32, contiguous
    q_red_ptr,  # [T, H, RK_PAD] fp32 out: (q Q_h) * scale * log2(e)
    num_tokens, qk_scale,
    stride_qt, stride_qh,
    stride_rt, stride_rh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, KEY_RANK: tl.constexpr, RK_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per (token tile, head): Q_h is read once per BLOCK_T tokens; one [BLOCK_T, D] x [D, RK] dot.
    head = tl.program_id(1)
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = tok < num_tokens
    d = tl.arange(0, D_PAD)
    rk = tl.arange(0, RK_PAD)
    q = tl.load(query_ptr + tok[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=t_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, D_PAD]
    qp = tl.load(q_proj_ptr + head * HEAD_DIM * KEY_RANK + d[:, None] * KEY_RANK + rk[None, :],
                 mask=(d < HEAD_DIM)[:, None] & (rk < KEY_RANK)[None, :], other=0.0)  # [D_PAD, RK_PAD]
    q_red = tl.dot(q, qp, input_precision="ieee") * qk_scale  # [BLOCK_T, RK_PAD]
    tl.store(q_red_ptr + tok[:, None] * stride_rt + head * stride_rh + rk[None, :], q_red, mask=t_ok[:, None])


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "window", "sink_tokens"])
def dar_far_kernel(
    q_red_ptr,  # [T, H, RK_PAD] fp32 from dar_query_project_kernel
    far_cache_ptr,  # [NBf, G, Bf, RK + RV]
    far_table_ptr,  # [R, max_blocks_f] block ids (int32 or int64)
    part_max_ptr,  # [S, T, H] fp32 out: running max per split (log2 domain)
    part_sum_ptr,  # [S, T, H] fp32 out: sum of exp2(score - max)
    part_acc_ptr,  # [S, T, H, RV_PAD] fp32 out: un-normalised reduced-width values
    query_start_loc_ptr,  # [R + 1] int32
    seq_lens_ptr,  # [R] int32
    num_reqs, num_splits, window, sink_tokens,
    stride_rt, stride_rh,
    stride_fb, stride_fg, stride_fs,
    stride_ftr,
    stride_ps, stride_pt,  # part_max / part_sum (split, token); heads contiguous
    stride_as, stride_at, stride_ah,  # part_acc (split, token, head); features contiguous
    KEY_RANK: tl.constexpr, VALUE_RANK: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per projection group (H / G)
    HEADS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, FAR_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,  # far positions per inner step
    DOT_UPCAST: tl.constexpr,  # see mma
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    req, _q_begin, dead, _c0, tok, head, row_ok, pos, _t_first, t_last = tile_rows(
        query_start_loc_ptr, seq_lens_ptr, num_reqs, tile, group * HEADS, HEADS, HEADS_PAD, BLOCK_M)
    if dead:
        return
    rk = tl.arange(0, RK_PAD)
    rv = tl.arange(0, RV_PAD)
    q_red = tl.load(q_red_ptr + tok[:, None] * stride_rt + head[:, None] * stride_rh + rk[None, :],
                    mask=row_ok[:, None], other=0.0)  # [ROWS, RK_PAD]

    # Reduced positions of the tile: [sink_tokens, t_last - window]; this split's slice of them.
    n_far = tl.maximum(t_last - window + 1 - sink_tokens, 0)
    chunk = tl.cdiv(tl.cdiv(n_far, num_splits), BLOCK_N) * BLOCK_N
    start = sink_tokens + split * chunk
    stop = tl.minimum(start + chunk, sink_tokens + n_far)

    m_i = tl.zeros([BLOCK_M * HEADS_PAD], tl.float32) + NEG_BIG
    l_i = tl.zeros([BLOCK_M * HEADS_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * HEADS_PAD, RV_PAD], tl.float32)
    for s0 in range(start, stop, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        s_ok = s < stop
        blk = tl.load(far_table_ptr + req * stride_ftr + s // FAR_BLOCK, mask=s_ok, other=0).to(tl.int64)
        slot = blk * stride_fb + group * stride_fg + (s % FAR_BLOCK) * stride_fs  # [BLOCK_N] int64
        k = tl.load(far_cache_ptr + slot[:, None] + rk[None, :],
                    mask=s_ok[:, None] & (rk < KEY_RANK)[None, :], other=0.0)  # [BLOCK_N, RK_PAD]
        scores = mma(q_red.to(k.dtype), tl.trans(k), DOT_UPCAST)  # S: [ROWS, BLOCK_N] fp32
        ok = row_ok[:, None] & s_ok[None, :] & (s[None, :] <= pos[:, None] - window)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # [ROWS, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(far_cache_ptr + slot[:, None] + KEY_RANK + rv[None, :],
                    mask=s_ok[:, None] & (rv < VALUE_RANK)[None, :], other=0.0)  # [BLOCK_N, RV_PAD]
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_UPCAST)  # stays at reduced width
        m_i = m_new

    tl.store(part_max_ptr + split * stride_ps + tok * stride_pt + head, m_i, mask=row_ok)
    tl.store(part_sum_ptr + split * stride_ps + tok * stride_pt + head, l_i, mask=row_ok)
    tl.store(part_acc_ptr + split * stride_as + tok[:, None] * stride_at + head[:, None] * stride_ah + rv[None, :],
             acc, mask=row_ok[:, None])


@triton.jit
def full_width_step(q, m_i, l_i, acc, s0, stop, req, q_begin, c0, pos, row_ok, window, sink_tokens, kv_head,
                    qk_scale,
                    key_ptr, value_ptr, window_cache_ptr, window_table_ptr,
                    stride_kt, stride_kj, stride_vt, stride_vj, stride_wb, stride_wj, stride_ws, stride_wtr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, WINDOW_BLOCK: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step over key positions [s0, min(s0 + BLOCK_N, stop)) at full width: positions before
    the chunk (c0) come from the window cache, the chunk's own from the fresh key/value tensors."""
    s = s0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    s_ok = s < stop
    cached = s_ok & (s < c0)
    fresh = s_ok & (s >= c0)
    d = tl.arange(0, D_PAD)
    d_ok = (d < HEAD_DIM)[None, :]
    blk = tl.load(window_table_ptr + req * stride_wtr + s // WINDOW_BLOCK, mask=cached, other=0).to(tl.int64)
    slot = (blk * stride_wb + kv_head * stride_wj + (s % WINDOW_BLOCK) * stride_ws)[:, None] + d[None, :]
    tok = (q_begin + s - c0).to(tl.int64)[:, None]  # fresh token index (masked where cached)
    kv_dtype = window_cache_ptr.dtype.element_ty
    k = tl.load(window_cache_ptr + slot, mask=cached[:, None] & d_ok, other=0.0) \
        + tl.load(key_ptr + tok * stride_kt + kv_head * stride_kj + d[None, :],
                  mask=fresh[:, None] & d_ok, other=0.0).to(kv_dtype)  # [BLOCK_N, D_PAD]
    scores = mma(q, tl.trans(k), DOT_UPCAST) * qk_scale  # S: [ROWS, BLOCK_N] fp32
    dist = pos[:, None] - s[None, :]
    ok = row_ok[:, None] & s_ok[None, :] & (dist >= 0) & ((dist < window) | (s[None, :] < sink_tokens))
    scores = tl.where(ok, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(window_cache_ptr + slot + HEAD_DIM, mask=cached[:, None] & d_ok, other=0.0) \
        + tl.load(value_ptr + tok * stride_vt + kv_head * stride_vj + d[None, :],
                  mask=fresh[:, None] & d_ok, other=0.0).to(kv_dtype)  # [BLOCK_N, D_PAD]
    acc = acc * alpha[:, None] + mma(p.to(kv_dtype), v, DOT_UPCAST)
    return m_new, l_i, acc


@triton.jit
def merge_far_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, num_splits, tok, head, row_ok,
                     stride_ps, stride_pt, stride_as, stride_at, stride_ah, ROWS: tl.constexpr, RV_PAD: tl.constexpr):
    """Log-sum-exp merge of the far splits of each row (token, head): (max, sum, accumulator at reduced width)."""
    rv = tl.arange(0, RV_PAD)
    m_r = tl.zeros([ROWS], tl.float32) + NEG_BIG
    l_r = tl.zeros([ROWS], tl.float32)
    acc_r = tl.zeros([ROWS, RV_PAD], tl.float32)
    for sp in range(num_splits):
        m_s = tl.load(part_max_ptr + sp * stride_ps + tok * stride_pt + head, mask=row_ok, other=NEG_BIG)
        l_s = tl.load(part_sum_ptr + sp * stride_ps + tok * stride_pt + head, mask=row_ok, other=0.0)
        a_s = tl.load(part_acc_ptr + sp * stride_as + tok[:, None] * stride_at + head[:, None] * stride_ah
                      + rv[None, :], mask=row_ok[:, None], other=0.0)  # [ROWS, RV_PAD]
        m_new = tl.maximum(m_r, m_s)
        f_old = tl.exp2(m_r - m_new)
        f_s = tl.exp2(m_s - m_new)
        l_r = l_r * f_old + l_s * f_s
        acc_r = acc_r * f_old[:, None] + a_s * f_s[:, None]
        m_r = m_new
    return m_r, l_r, acc_r


@triton.jit
def project_up(acc_r, v_up_ptr, head, kv_head, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               VALUE_RANK: tl.constexpr, RV_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """acc_r [ROWS, RV_PAD] -> [ROWS, D_PAD]: each row times v_up of its head, once per (token, head). One
    [ROWS, RV] x [RV, D] dot per query head of this KV head, the other heads' rows zeroed (v_up: [H, RV, D]).
    ``PRECISION``: ``tl.dot``'s input precision. The launcher passes ``tf32`` for 16-bit caches (both operands, the
    fp32 value sums and v_up, rounded to a 10-bit mantissa: fp16's, finer than bf16's) and ``ieee`` for fp32 ones:
    the ieee dot runs on the FMA units and, at 64 rows x D=128, made ptxas spill (sm_90; tf32: none)."""
    rv = tl.arange(0, RV_PAD)
    d = tl.arange(0, D_PAD)
    hh = head - kv_head * HEADS  # [ROWS] head within this KV head
    up = tl.zeros([acc_r.shape[0], D_PAD], tl.float32)
    for i in tl.static_range(HEADS):
        u = tl.load(v_up_ptr + (kv_head * HEADS + i) * (VALUE_RANK * HEAD_DIM) + rv[:, None] * HEAD_DIM + d[None, :],
                    mask=(rv < VALUE_RANK)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [RV_PAD, D_PAD]
        up += tl.dot(tl.where((hh == i)[:, None], acc_r, 0.0), u, input_precision=PRECISION)
    return up


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "window", "sink_tokens"])
def dar_full_kernel(
    query_ptr,  # [T, H, D]
    key_ptr,  # [T, J, D] fresh post-RoPE keys of the scheduled tokens
    value_ptr,  # [T, J, D]
    output_ptr,  # [T, H, D] out
    window_cache_ptr,  # [NBw, J, Bw, 2D]
    window_table_ptr,  # [R, max_blocks_w]
    v_up_ptr,  # [H, RV, D] fp32, contiguous
    part_max_ptr, part_sum_ptr, part_acc_ptr,  # far partials from dar_far_kernel
    query_start_loc_ptr, seq_lens_ptr,
    num_reqs, num_splits, window, sink_tokens, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kt, stride_kj, stride_vt, stride_vj,
    stride_wb, stride_wj, stride_ws, stride_wtr,
    stride_ps, stride_pt, stride_as, stride_at, stride_ah,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, VALUE_RANK: tl.constexpr, RV_PAD: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per KV head (H / J)
    HEADS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, WINDOW_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # see mma
    UP_PRECISION: tl.constexpr,  # see project_up
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req, q_begin, dead, c0, tok, head, row_ok, pos, t_first, t_last = tile_rows(
        query_start_loc_ptr, seq_lens_ptr, num_reqs, tile, kv_head * HEADS, HEADS, HEADS_PAD, BLOCK_M)
    if dead:
        return
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(query_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(window_cache_ptr.dtype.element_ty)  # [ROWS, D_PAD] in the cache dtype: tensor-core dots

    # The far partials, merged and projected up to full width, are the online softmax's starting state (the merge
    # is order-free), so no second [ROWS, D_PAD] accumulator lives through the full-width loop.
    m_i, l_i, acc_r = merge_far_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, num_splits, tok, head, row_ok,
                                       stride_ps, stride_pt, stride_as, stride_at, stride_ah,
                                       BLOCK_M * HEADS_PAD, RV_PAD)
    acc = project_up(acc_r, v_up_ptr, head, kv_head, HEADS, HEAD_DIM, D_PAD, VALUE_RANK, RV_PAD,
                     UP_PRECISION)  # [ROWS, D_PAD]
    # Full-width keys of the tile: the sinks [0, min(sinks, lo)) and the band [lo, t_last] (window 0: no band).
    lo = tl.where(window > 0, tl.maximum(t_first - window + 1, 0), t_last + 1)
    sink_end = tl.minimum(sink_tokens, lo)
    for s0 in range(0, sink_end, BLOCK_N):
        m_i, l_i, acc = full_width_step(
            q, m_i, l_i, acc, s0, sink_end, req, q_begin, c0, pos, row_ok, window, sink_tokens, kv_head,
            qk_scale, key_ptr, value_ptr, window_cache_ptr, window_table_ptr, stride_kt, stride_kj, stride_vt,
            stride_vj, stride_wb, stride_wj, stride_ws, stride_wtr, HEAD_DIM, D_PAD, WINDOW_BLOCK, BLOCK_N,
            DOT_UPCAST)
    for s0 in range(lo, t_last + 1, BLOCK_N):
        m_i, l_i, acc = full_width_step(
            q, m_i, l_i, acc, s0, t_last + 1, req, q_begin, c0, pos, row_ok, window, sink_tokens, kv_head,
            qk_scale, key_ptr, value_ptr, window_cache_ptr, window_table_ptr, stride_kt, stride_kj, stride_vt,
            stride_vj, stride_wb, stride_wj, stride_ws, stride_wtr, HEAD_DIM, D_PAD, WINDOW_BLOCK, BLOCK_N,
            DOT_UPCAST)

    denom = tl.where(row_ok, l_i, 1.0)
    out = acc / denom[:, None]  # [ROWS, D_PAD]
    tl.store(output_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(output_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
