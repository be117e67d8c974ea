"""Plain PyTorch DAR attention on dense tensors: the ground truth every kernel and backend is tested against.

DAR (Dual Dimensionality, arXiv 2606.18587), as vllm-dar defines it for converted models. For a query at absolute
position ``t`` and a key/value at position ``s <= t``:

* **full width** when ``t - s < window`` (the window, the current token included) or ``s < sink_tokens``:
  score ``q . k``, value ``v``;
* **reduced width** otherwise: score ``(q Q_j) . (k_g K_g)``, value ``(v_g V_g) U_j``, where ``j`` is the query
  head's KV head and ``g`` its projection group (``k_g``: the concatenated keys of the group's KV heads).

One softmax runs over both sets, with the model's usual scale. ``window = 0`` reduces every position (the paper's
"uniform" ablation) except the sinks. Projections act on post-RoPE queries and keys.

**Token budgets** (``vllm_dar.config.BudgetConfig``): at the end of a ``P``-token prompt each layer keeps only
``kept`` of its candidate distant positions per projection group (``select_kept``); queries after the prompt
(positions ``>= P``) then see the other candidates nowhere (``evicted``). Queries inside the prompt see every
position: the prompt is prefilled before selection. This is exactly prefill-then-decode, so teacher-forced
scoring of a continuation in one pass measures what a served request gets.

Shapes: ``B`` batch, ``H`` query heads, ``J`` KV heads, ``G`` projection groups (``J`` per-head, 1 joint),
``D`` head_dim, ``Dg = D * J / G``, ``rk``/``rv`` key/value ranks, ``Tq`` queries, ``Tk`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_dtype import round_trip


@dataclass(frozen=True)
class LayerProjections:
    """One layer's DAR projections (fp32 on disk; cast to the compute dtype at use)."""

    q_proj: Tensor  # [J, D, rk]   query of a head in KV head j -> reduced key space of j's group
    k_down: Tensor  # [G, Dg, rk]  group keys -> reduced keys
    v_down: Tensor  # [G, Dg, rv]  group values -> reduced values
    v_up: Tensor    # [J, rv, D]   reduced values of j's group -> values of KV head j

    @property
    def groups(self) -> int:
        return self.k_down.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.q_proj.shape[0]

    def to(self, **kw) -> LayerProjections:
        return LayerProjections(*(t.to(**kw) for t in (self.q_proj, self.k_down, self.v_down, self.v_up)))

    @classmethod
    def identity(cls, num_kv_heads: int, head_dim: int, *, joint: bool = False) -> LayerProjections:
        """Full-rank projections: DAR with these equals standard attention."""
        g = 1 if joint else num_kv_heads
        dg = head_dim * num_kv_heads // g
        eye = torch.eye(dg).expand(g, dg, dg).contiguous()  # [G, Dg, Dg]
        # KV head j reads its own D-slice of its group's latent.
        sel = eye.reshape(g, num_kv_heads // g, head_dim, dg).reshape(num_kv_heads, head_dim, dg)  # [J, D, Dg]
        return cls(q_proj=sel.clone(), k_down=eye.clone(), v_down=eye.clone(), v_up=sel.transpose(1, 2).clone())


def _group_concat(x: Tensor, groups: int) -> Tensor:
    """[B, J, T, D] -> [B, G, T, Dg]: concatenate the KV heads of each projection group along the feature axis."""
    b, j, t, d = x.shape
    return x.reshape(b, groups, j // groups, t, d).permute(0, 1, 3, 2, 4).reshape(b, groups, t, (j // groups) * d)


def reduce_kv(x: Tensor, down: Tensor) -> Tensor:
    """Project keys or values to reduced width. x: [B, J, T, D], down: [G, Dg, r] -> [B, G, T, r]."""
    return torch.matmul(_group_concat(x, down.shape[0]), down.to(x.dtype).unsqueeze(0))


def reduce_queries(q: Tensor, q_proj: Tensor) -> Tensor:
    """q: [B, H, T, D], q_proj: [J, D, rk] -> [B, H, T, rk] (head h uses the map of its KV head)."""
    per_head = q_proj.repeat_interleave(q.shape[1] // q_proj.shape[0], dim=0)  # [H, D, rk]
    return torch.matmul(q, per_head.to(q.dtype).unsqueeze(0))


def dar_masks(tq: int, tk: int, *, window: int, sink_tokens: int, q_offset: int | Tensor, device=None):
    """Boolean masks [Tq, Tk]: (full-width pairs, reduced-width pairs).

    Query i sits at position ``q_offset + i``, or at ``q_offset[i]`` when ``q_offset`` is a tensor of positions.
    """
    if isinstance(q_offset, Tensor):
        t = q_offset.to(device).unsqueeze(1)  # [Tq, 1]
    else:
        t = torch.arange(q_offset, q_offset + tq, device=device).unsqueeze(1)  # [Tq, 1]
    s = torch.arange(tk, device=device).unsqueeze(0)  # [1, Tk]
    causal = s <= t
    full = causal & ((t - s < window) | (s < sink_tokens))
    return full, causal & ~full


def select_kept(q: Tensor, k: Tensor, proj: LayerProjections, budget, layer: int, *, window: int,
                sink_tokens: int, prompt_len: int, scale: float | None = None, far_block: int = 1) -> Tensor:
    """SnapKV selection at reduced width: which candidate positions layer ``layer``'s far cache forgets.

    q: [B, H, >= P, D], k: [B, J, >= P, D] (post-RoPE; only the first ``P = prompt_len`` positions are read).
    Returns ``evicted`` [B, G, P] bool: True at the candidates (``budget.candidates``: ``[S, P - T)``) that group
    ``g`` does not keep; False everywhere else.

    Score of candidate ``s`` for group ``g``: the softmax over the candidates of each observation query's reduced
    score ``(q Q_j) . (k_s K_g) * scale`` (the last ``min(W, P)`` prompt queries, every query head of the group),
    summed over those queries and heads, then pooled along positions (``budget.pooling`` over
    ``budget.pool_kernel`` neighbours, edges not padded into the mean or max). The group keeps the ``c - s0``
    candidates of highest pooled score (ties to the lower position), ``budget.kept_span`` at far blocks of
    ``far_block`` tokens (1: exactly ``budget.kept(layer, n)``; the served far cache's block: what the engine
    keeps).
    Normalising over the candidates alone, not over every key a query sees as SnapKV does, makes a score depend
    only on the far cache and the queries, so the engine computes it from what it holds.
    """
    b, _, _, d = q.shape
    g = proj.groups
    n = budget.candidates(prompt_len, window, sink_tokens)
    evicted = torch.zeros(b, g, prompt_len, dtype=torch.bool, device=q.device)
    s0, c = budget.kept_span(layer, prompt_len, window, sink_tokens, far_block)
    if s0 == 0:
        return evicted
    keep = c - s0
    scale = d ** -0.5 if scale is None else scale
    p = proj.to(dtype=torch.float32, device=q.device)
    w_obs = min(budget.observation_window, prompt_len)
    qr = reduce_queries(q[:, :, prompt_len - w_obs:prompt_len].float(), p.q_proj)  # [B, H, W, rk]
    kr = reduce_kv(k[:, :, sink_tokens:sink_tokens + n].float(), p.k_down)  # [B, G, n, rk]
    order = kept_order(snap_scores(qr, kr, scale, budget.pooling, budget.pool_kernel), keep)  # [B, G, keep]
    kept = torch.zeros(b, g, n, dtype=torch.bool, device=q.device).scatter_(-1, order, True)
    evicted[..., sink_tokens:sink_tokens + n] = ~kept
    return evicted


def snap_scores(qr: Tensor, kr: Tensor, scale: float, pooling: str, kernel: int) -> Tensor:
    """Pooled SnapKV scores of ``select_kept``: reduced observation queries qr [B, H, W, rk] against reduced
    candidate keys kr [B, G, n, rk] (head h reads group ``h // (H / G)``) -> [B, G, n] fp32."""
    b, h, _, _ = qr.shape
    g, n = kr.shape[1], kr.shape[2]
    kr = kr.float().repeat_interleave(h // g, dim=1)  # [B, H, n, rk]
    probs = torch.softmax(torch.matmul(qr.float(), kr.transpose(-1, -2)) * scale, dim=-1)  # [B, H, W, n]
    return pool_scores(probs.sum(2).reshape(b, g, h // g, n).sum(2), pooling, kernel)


def kept_order(score: Tensor, keep: int) -> Tensor:
    """Indices [..., keep] of the ``keep`` highest scores along the last axis, ascending (positions in order);
    ties go to the lower index (a stable sort), in the reference and the engine alike."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def pool_scores(score: Tensor, pooling: str, kernel: int) -> Tensor:
    """1-D pooling of [..., n] scores along the last axis, stride 1, same length: ``max`` or ``avg`` over the
    ``kernel`` neighbours inside ``[0, n)`` (the average divides by how many are inside)."""
    if kernel == 1:
        return score
    shape, x = score.shape, score.reshape(-1, 1, score.shape[-1])
    pad = kernel // 2
    if pooling == "max":
        out = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=pad)
    else:
        out = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    return out.reshape(shape)


def evicted_pairs(evicted: Tensor, heads: int, q_pos: Tensor, prompt_len: int, k0: int, k1: int) -> Tensor:
    """[B, H, Tq, k1 - k0] bool: the pairs of queries at ``q_pos`` [Tq] and keys at ``[k0, k1)`` that an
    ``evicted`` [B, G, P] selection hides: evicted keys, for queries at ``>= prompt_len`` (a group's heads share
    its selection)."""
    b, g, p = evicted.shape
    ev = torch.zeros(b, g, k1 - k0, dtype=torch.bool, device=evicted.device)
    if k0 < p:
        ev[..., :min(k1, p) - k0] = evicted[..., k0:min(k1, p)]
    ev = ev.repeat_interleave(heads // g, dim=1)  # [B, H, k1 - k0]
    after = (q_pos >= prompt_len).to(evicted.device)  # [Tq]
    return ev.unsqueeze(2) & after.view(1, 1, -1, 1)


def dar_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj: LayerProjections | None,
    *,
    window: int,
    sink_tokens: int = 0,
    scale: float | None = None,
    q_offset: int | Tensor | None = None,
    return_lse: bool = False,
    evicted: Tensor | None = None,
    prompt_len: int = 0,
):
    """DAR attention. q: [B, H, Tq, D]; k, v: [B, J, Tk, D] (full-width, post-RoPE) -> [B, H, Tq, D].

    ``q_offset`` is the position of the first query (default ``Tk - Tq``: the queries are the last tokens), or a
    [Tq] tensor with each query's position. ``evicted`` [B, G, P] (``select_kept``): reduced pairs on those
    positions are hidden from queries at positions ``>= prompt_len`` (token budgets).
    ``proj=None`` means standard causal attention. Computes in fp32 and returns the input dtype; with
    ``return_lse`` also the natural-log sum of exponentiated scores, [B, H, Tq] fp32.
    """
    _, h, tq, d = q.shape
    j, tk = k.shape[1], k.shape[2]
    rep = h // j
    scale = d ** -0.5 if scale is None else scale
    q_offset = tk - tq if q_offset is None else q_offset
    if proj is None:
        window, sink_tokens = 1 << 62, 0  # every causal pair at full width
    full, red = dar_masks(tq, tk, window=window, sink_tokens=sink_tokens, q_offset=q_offset, device=q.device)
    if evicted is not None and proj is not None:
        q_pos = q_offset if isinstance(q_offset, Tensor) else torch.arange(q_offset, q_offset + tq)
        red = red & ~evicted_pairs(evicted, h, q_pos, prompt_len, 0, tk)  # [B, H, Tq, Tk]

    qf, kf, vf = q.float(), k.float(), v.float()
    s_full = torch.matmul(qf, kf.repeat_interleave(rep, dim=1).transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    scores = s_full.masked_fill(~full, float("-inf"))
    if proj is not None and bool(red.any()):
        p = proj.to(dtype=torch.float32, device=q.device)
        heads_per_group = h // p.groups
        qr = reduce_queries(qf, p.q_proj)  # [B, H, Tq, rk]
        kr = reduce_kv(kf, p.k_down).repeat_interleave(heads_per_group, dim=1)  # [B, H, Tk, rk]
        s_red = torch.matmul(qr, kr.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
        scores = torch.where(red, s_red, scores)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tq]
    probs = torch.exp(scores - lse.unsqueeze(-1))  # [B, H, Tq, Tk]
    out = torch.matmul(probs.masked_fill(~full, 0.0), vf.repeat_interleave(rep, dim=1))  # [B, H, Tq, D]
    if proj is not None and bool(red.any()):
        vr = reduce_kv(vf, p.v_down).repeat_interleave(heads_per_group, dim=1)  # [B, H, Tk, rv]
        acc = torch.matmul(probs.masked_fill(~red, 0.0), vr)  # [B, H, Tq, rv]: accumulate at reduced width
        up = p.v_up.repeat_interleave(rep, dim=0)  # [H, rv, D]
        out = out + torch.matmul(acc, up.unsqueeze(0))  # project up once per head
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def reconstruct_kv(k: Tensor, v: Tensor, proj: LayerProjections,
                   kv_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-KV-head keys and values that reproduce the reduced scores and values at full width.

    ``(q Q_j) . (k_g K_g) = q . (k_g K_g Q_j^T)`` and ``(v_g V_g) U_j`` are linear, so reduced attention equals
    standard attention over ``k~_j = k_g K_g Q_j^T`` and ``v~_j = v_g V_g U_j``. k, v: [B, J, T, D] -> same shapes.
    Used by the fast Hugging Face path (one fused SDPA over [k; k~]); tests compare it with ``dar_attention``.
    ``kv_dtype``: the reduced K/V as an FP8 far cache stores them (``vllm_dar.kv_dtype.round_trip``, scale 1).
    """
    jg = k.shape[1] // proj.groups
    kr = round_trip(reduce_kv(k, proj.k_down), kv_dtype).repeat_interleave(jg, dim=1)  # [B, J, T, rk]: per group
    vr = round_trip(reduce_kv(v, proj.v_down), kv_dtype).repeat_interleave(jg, dim=1)  # [B, J, T, rv]
    k_rec = torch.matmul(kr, proj.q_proj.to(k.dtype).mT.unsqueeze(0))  # [B, J, T, D]
    v_rec = torch.matmul(vr, proj.v_up.to(v.dtype).unsqueeze(0))  # [B, J, T, D]
    return k_rec, v_rec


def dar_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, proj: LayerProjections | None, *, window: int,
                       sink_tokens: int = 0, scale: float | None = None, chunk: int = 128,
                       kv_dtype: torch.dtype | None = None, far_only: bool = False,
                       evicted: Tensor | None = None, prompt_len: int = 0) -> Tensor:
    """Same result as ``dar_attention`` (queries are the last Tq positions), through fused SDPA calls over
    the concatenated keys ``[k; k~]`` with a mask that picks, per pair, the full or the reduced copy.
    q: [B, H, Tq, D], k, v: [B, J, Tk, D] -> [B, H, Tq, D] in q's dtype (computed in fp32, unless an autocast
    context, as the healing fine-tune's bf16 steps, lowers its matmuls and SDPA).

    Queries run in blocks of ``chunk``; each block reads only the keys it can see: the sinks and its band of
    full-width keys (the block plus ``window - 1`` before it; none when ``window`` is 0), and the reduced keys
    up to ``window`` before its last query.
    One call over all of ``[k; k~]`` would spend three quarters of its work on masked pairs at long contexts
    (half of ``[k; k~]`` is masked for every query, and half of the rest is in the future); blocks of 128 cut
    a 1024-token sequence's work (forward and backward, which the healing fine-tune runs) by about 2.9x.

    ``kv_dtype`` (an FP8 dtype or None): every key and value, full width and reduced, read back as an FP8 cache
    of that dtype stores it (scale 1, vLLM's default), the query's own position included, as the served ops
    do (they round the chunk's own K/V as the window cache stores them). ``far_only``:
    only the reduced K/V (a far cache in FP8, the window cache in the model dtype). ``evicted``, ``prompt_len``:
    token budgets, as ``dar_attention``."""
    tq, tk = q.shape[2], k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    if proj is not None:  # from the unrounded K/V: the far cache stores reduced K/V of the layer's own K/V
        k_rec, v_rec = reconstruct_kv(kf, vf, proj.to(dtype=torch.float32, device=q.device), kv_dtype)
    if not far_only:
        kf, vf = round_trip(kf, kv_dtype), round_trip(vf, kv_dtype)
    if proj is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, is_causal=tq == tk, scale=scale, enable_gqa=True)
        return out.to(q.dtype)
    if tq == 0:
        return q.clone()
    full, red = dar_masks(tq, tk, window=window, sink_tokens=sink_tokens, q_offset=tk - tq, device=q.device)
    outs = []
    for a in range(0, tq, chunk):
        b = min(tq, a + chunk)
        first, last = tk - tq + a, tk - tq + b - 1  # positions of the block's first and last query
        sinks = min(sink_tokens, last + 1)
        band = max(sinks, first - window + 1) if window > 0 else last + 1  # full-width: [0, sinks), [band, last]
        red_end = max(sinks, last - window + 1)  # reduced keys: [sinks, red_end), overlapping the band's positions
        full_idx = [slice(0, sinks), slice(band, last + 1)] if band > sinks else [slice(0, last + 1)]
        keys = torch.cat([kf[:, :, s] for s in full_idx] + [k_rec[:, :, sinks:red_end]], dim=2)
        values = torch.cat([vf[:, :, s] for s in full_idx] + [v_rec[:, :, sinks:red_end]], dim=2)
        mask = torch.cat([full[a:b, s] for s in full_idx] + [red[a:b, sinks:red_end]], dim=1)
        if evicted is not None and last >= prompt_len:
            hide = evicted_pairs(evicted, q.shape[1], torch.arange(first, last + 1), prompt_len, sinks, red_end)
            mask = mask.expand(q.shape[0], q.shape[1], -1, -1).clone()
            mask[..., mask.shape[-1] - (red_end - sinks):] &= ~hide
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qf[:, :, a:b], keys, values, attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(outs, dim=2).to(q.dtype)
