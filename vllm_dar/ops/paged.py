"""The contract of the DAR ops over vLLM's paged caches, and its reference implementation
(``VLLM_DAR_OPS=reference``): a per-request loop in plain PyTorch, correctness first; also the fallback where
the C++ ops cannot be built.

Two caches per DAR layer, both in our own layout ``[num_blocks, heads, block_size, k_width + v_width]``
(key in the first ``k_width`` features of a slot, value after it):

* the **window cache** holds full-width K/V (``J`` heads, ``D + D``) of the sink tokens and of the window
  before the chunk (the chunk's own K/V come from the forward pass); its block table may list blocks the
  scheduler freed or never allocated (null), so only those positions are ever read;
* the **far cache** holds reduced K/V (``G`` projection groups, ``rk + rv``) of every token; under token budgets
  (``vllm_dar.config.BudgetConfig``) a request's far table starts with null blocks (block 0) below its kept
  span once its prompt is compacted (``compact_prompts``), and its far positions start at its first real block
  (``far_start``): the slots of ``[s0, c)`` then hold the kept candidates, whatever their positions were.

Each cache is in the model dtype or in an FP8 dtype (``--kv-cache-dtype fp8*``; the pairs served:
``vllm_dar.kv_dtype.cache_dtypes``): an FP8 cache stores keys and reduced keys as
``vllm_dar.kv_dtype.quantize(x, dtype, k_scale)``, values and reduced values with ``v_scale``, and reads them back
times the scale. The chunk's own K/V come from the forward pass, not the cache, rounded as the window cache would
store them.

A query at position ``t`` sees ``s <= t`` at full width when ``t - s < window`` or ``s < sink_tokens``, and at
reduced width otherwise; one softmax runs over both sets (``vllm_dar.reference.dar_attention``, which the
tests compare this with). Shapes: ``T`` tokens, ``H`` query heads, ``J`` KV heads, ``G`` groups, ``D`` head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from vllm_dar.kv_dtype import dequantize, quantize, round_trip
from vllm_dar.reference import LayerProjections, kept_order, snap_scores


@dataclass(frozen=True)
class PagedProjections:
    """One layer's projections, expanded per query head and cast to the compute dtype (fp32)."""

    q_proj: Tensor  # [H, D, rk]: query head h -> reduced key space of its group
    k_down: Tensor  # [G, Dg, rk]
    v_down: Tensor  # [G, Dg, rv]
    v_up: Tensor    # [H, rv, D]: reduced values of h's group -> values of h
    head_group: Tensor  # [H] long: projection group of each query head

    @classmethod
    def from_layer(cls, p: LayerProjections, num_heads: int) -> PagedProjections:
        j, g = p.num_kv_heads, p.groups
        rep = num_heads // j
        kv_head = torch.arange(num_heads) // rep  # [H]
        return cls(q_proj=p.q_proj.float()[kv_head].contiguous(), k_down=p.k_down.float().contiguous(),
                   v_down=p.v_down.float().contiguous(), v_up=p.v_up.float()[kv_head].contiguous(),
                   head_group=kv_head // (j // g))

    def to(self, device: torch.device | str) -> PagedProjections:
        """The same projections on ``device`` (the layer's: on a GPU the kernels read them there)."""
        return PagedProjections(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def reduce_tokens(x: Tensor, down: Tensor) -> Tensor:
    """x: [T, J, D], down: [G, Dg, r] -> [T, G, r] (the KV heads of a group concatenated, then projected)."""
    t = x.shape[0]
    g = down.shape[0]
    xg = x.reshape(t, g, -1)  # [T, G, Dg]: heads of one group are adjacent
    return torch.einsum("tgi,gir->tgr", xg.to(down.dtype), down)


def write_slots(cache: Tensor, slots: Tensor, k: Tensor, v: Tensor, k_scale: float = 1.0,
                v_scale: float = 1.0) -> None:
    """Store k [T, Hc, kw] and v [T, Hc, vw] at flat slots [T] (block * block_size + offset), quantized as the
    cache's dtype stores them (``quantize``). Slots < 0 and slots in block 0 (vLLM's null block: positions the
    window cache does not keep) are skipped.

    cache: [num_blocks, Hc, block_size, kw + vw].
    """
    keep = slots >= cache.shape[2]
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    block_size = cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size  # [T]
    kw = k.shape[-1]
    cache[blocks, :, offsets, :kw] = quantize(k, cache.dtype, k_scale)
    cache[blocks, :, offsets, kw:] = quantize(v, cache.dtype, v_scale)


def write_kv(key: Tensor, value: Tensor, *, window_cache: Tensor, window_slots: Tensor, far_cache: Tensor,
             far_slots: Tensor, proj: PagedProjections, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """One layer's cache write: key, value [T, J, D] full width into the window cache, their reduced forms
    ``reduce_tokens`` into the far cache, each through its own slot mapping (``write_slots``' skipping rules);
    ``k_scale`` / ``v_scale``: FP8 caches' scales (module docstring)."""
    write_slots(window_cache, window_slots, key, value, k_scale, v_scale)
    write_slots(far_cache, far_slots, reduce_tokens(key, proj.k_down), reduce_tokens(value, proj.v_down), k_scale,
                v_scale)


def gather_positions(cache: Tensor, block_row: Tensor, positions: Tensor) -> Tensor:
    """Slots of ``positions`` [S] through one request's block table row -> [S, Hc, C]."""
    block_size = cache.shape[2]
    blocks = block_row[positions // block_size]  # [S]
    return cache[blocks, :, positions % block_size, :]


def far_start(far_row: Tensor, block_size: int, sink_tokens: int) -> int:
    """The first far position a request's cache holds: that of its first block that is not vLLM's null block
    (token budgets null the blocks below a compacted prompt's kept span), never below the sinks (read at full
    width from the window cache)."""
    real = torch.nonzero(far_row != 0)
    return max(sink_tokens, (int(real[0]) if real.numel() else 0) * block_size)


def compact_prompts(query: Tensor, *, far_cache: Tensor, far_table: Tensor, query_start_loc: list[int] | Tensor,
                    seq_lens: list[int] | Tensor, is_prefilling: list[bool] | Tensor, proj: PagedProjections, budget,
                    layer: int, window: int, sink_tokens: int, scale: float, k_scale: float = 1.0) -> dict[int, int]:
    """Token budgets, after one layer's attention of a step: each request whose prompt this step prefilled whole
    (a budget model's prompts are never chunked: ``vllm_dar.plugin.model.configure_budgets``) keeps its best
    candidates in the far cache at the slots of ``[s0, c)`` (``BudgetConfig.kept_span`` at this cache's block),
    each group its own, in position order. Returns ``{row: s0}`` for every request prefilled in this step (0:
    nothing evicted): from the next step on its reads must start at ``s0``, which ``far_start`` finds where the
    table's entries below ``s0`` are the null block (the scheduler frees those blocks once the step is processed:
    ``vllm_dar.plugin.spec.DarFarManager``; the worker's own table never learns it, so the plugin reads through a
    copy it nulls: ``vllm_dar.plugin.common.DarImplMixin._budget_far_table``).

    Scores are ``vllm_dar.reference.select_kept``'s: this step's last ``W`` queries (query [T, H, D], post-RoPE)
    reduced by ``proj``, against the reduced keys the far cache holds (read back as stored: FP8 times
    ``k_scale``); the entries move as stored, unchanged. Runs once per request, a loop over the requests that
    finish their prompt in this step."""
    if isinstance(query_start_loc, Tensor):
        query_start_loc, seq_lens, is_prefilling = (query_start_loc.tolist(), seq_lens.tolist(),
                                                    is_prefilling.tolist())
    block = far_cache.shape[2]
    raw = far_cache.view(torch.uint8) if far_cache.element_size() == 1 else far_cache  # FP8 moves as bytes
    rk = proj.k_down.shape[-1]
    starts = {}
    for r, prefilling in enumerate(is_prefilling[:len(seq_lens)]):
        a, b, p = query_start_loc[r], query_start_loc[r + 1], seq_lens[r]
        if not prefilling or b == a or int(far_table[r, 0]) == 0:  # a dummy row (warm-up) has only null blocks
            continue
        if b - a != p:
            raise RuntimeError(f"vllm-dar: token budgets: a prompt of {p} tokens was prefilled in a chunk of {b - a}; "
                               "budget models need each prompt in one step (chunked prefill and prefix caching "
                               "off: vllm_dar.plugin.model.configure_budgets)")
        s0, c = budget.kept_span(layer, p, window, sink_tokens, block)
        starts[r] = s0
        if s0 == 0:
            continue
        entries = gather_positions(raw, far_table[r], torch.arange(sink_tokens, c))  # [n, G, C] as stored
        keys = dequantize(entries[..., :rk].view(far_cache.dtype), k_scale).transpose(0, 1)  # [G, n, rk]
        w = min(budget.observation_window, p)
        qr = query[b - w:b].float().transpose(0, 1) @ proj.q_proj  # [H, W, rk]
        score = snap_scores(qr[None], keys[None], scale, budget.pooling, budget.pool_kernel)[0]  # [G, n]
        order = kept_order(score, c - s0)  # [G, c - s0] ascending
        kept = torch.gather(entries, 0, order.T.unsqueeze(-1).expand(-1, -1, entries.shape[-1]))  # [c - s0, G, C]
        dst = torch.arange(s0, c)
        raw[far_table[r][dst // block], :, dst % block, :] = kept
    return starts


def null_below(far_table: Tensor, starts: Tensor, block_size: int) -> Tensor:
    """A copy of ``far_table`` [R, max_blocks] whose row ``r`` lists the null block (0) for every block wholly
    below position ``starts[r]`` (a multiple of ``block_size``; 0: the row unchanged)."""
    below = torch.arange(far_table.shape[1], device=far_table.device)[None, :] < (starts // block_size)[:, None]
    return far_table.masked_fill(below, 0)


def cached_full_positions(first_query: int, window: int, sink_tokens: int) -> Tensor:
    """History positions (before the chunk's first query) any query of the chunk sees at full width: the sinks,
    then the first query's window. Sorted, distinct, exactly what the window cache retains."""
    lo = max(0, first_query - max(window, 1) + 1)
    return torch.cat([torch.arange(min(sink_tokens, lo)), torch.arange(lo, first_query)])


def request_attention(q: Tensor, k_new: Tensor, v_new: Tensor, window_cache: Tensor, window_row: Tensor,
                      far_cache: Tensor, far_row: Tensor, seq_len: int, proj: PagedProjections, *, window: int,
                      sink_tokens: int, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> Tensor:
    """DAR attention for one request's chunk. q: [Tq, H, D], k_new, v_new: [Tq, J, D] (the chunk's own K/V,
    full width) at positions seq_len - Tq ... seq_len - 1 -> [Tq, H, D] fp32."""
    tq, h, d = q.shape
    first = seq_len - tq
    q_pos = torch.arange(first, seq_len)
    qf = q.float().transpose(0, 1)  # [H, Tq, D]
    t = q_pos.unsqueeze(1)  # [Tq, 1]

    hist = cached_full_positions(first, window, sink_tokens)  # [Sc]
    cached = gather_positions(window_cache, window_row, hist)  # [Sc, J, 2D]
    full_pos = torch.cat([hist, q_pos])  # [Sf]
    # The chunk's own K/V as an FP8 window cache rounds them, so a token's output does not depend on how its
    # prompt was chunked (the fresh tensors, not the cache: vllm_dar/plugin/spec.py never holds a whole chunk).
    k_new, v_new = round_trip(k_new, window_cache.dtype, k_scale), round_trip(v_new, window_cache.dtype, v_scale)
    k_full = torch.cat([dequantize(cached[..., :d], k_scale), k_new.float()])  # [Sf, J, D]
    v_full = torch.cat([dequantize(cached[..., d:], v_scale), v_new.float()])
    rep = h // k_full.shape[1]
    k_full = k_full.transpose(0, 1).repeat_interleave(rep, dim=0)  # [H, Sf, D]
    v_full = v_full.transpose(0, 1).repeat_interleave(rep, dim=0)  # [H, Sf, D]
    s = full_pos.unsqueeze(0)  # [1, Sf]
    full_ok = (s <= t) & ((t - s < window) | (s < sink_tokens))  # [Tq, Sf]
    scores_full = (qf @ k_full.transpose(1, 2) * scale).masked_fill(~full_ok, float("-inf"))  # [H, Tq, Sf]

    red_end = max(sink_tokens, seq_len - window)  # the last query reduces positions < seq_len - window
    red_pos = torch.arange(far_start(far_row, far_cache.shape[2], sink_tokens), red_end)  # [Sr]
    if red_pos.numel() == 0:
        probs = torch.softmax(scores_full, dim=-1)
        return (probs @ v_full).transpose(0, 1)  # [Tq, H, D]

    rk = proj.k_down.shape[-1]
    red = gather_positions(far_cache, far_row, red_pos)  # [Sr, G, rk + rv]
    k_red = dequantize(red[..., :rk], k_scale).transpose(0, 1)[proj.head_group]  # [H, Sr, rk]
    v_red = dequantize(red[..., rk:], v_scale).transpose(0, 1)[proj.head_group]  # [H, Sr, rv]
    q_red = qf @ proj.q_proj  # [H, Tq, rk]
    sr = red_pos.unsqueeze(0)  # [1, Sr]
    red_ok = (t - sr >= window) & (sr >= sink_tokens)  # [Tq, Sr]: causal is implied by t - s >= window >= 0
    scores_red = (q_red @ k_red.transpose(1, 2) * scale).masked_fill(~red_ok, float("-inf"))  # [H, Tq, Sr]

    probs = torch.softmax(torch.cat([scores_full, scores_red], dim=-1), dim=-1)  # [H, Tq, Sf + Sr]
    sf = full_pos.numel()
    out = probs[..., :sf] @ v_full  # [H, Tq, D]
    out = out + (probs[..., sf:] @ v_red) @ proj.v_up  # accumulate at reduced width, project up once
    return out.transpose(0, 1)  # [Tq, H, D]


def dar_paged_attention(query: Tensor, key: Tensor, value: Tensor, output: Tensor, *, window_cache: Tensor,
                        window_table: Tensor, far_cache: Tensor, far_table: Tensor,
                        query_start_loc: list[int] | Tensor, seq_lens: list[int] | Tensor,
                        proj: PagedProjections, window: int, sink_tokens: int, scale: float,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """DAR attention for a batch of requests (prefill chunks, decodes, or both), into ``output``.

    query: [T, H, D]; key, value: [T, J, D] (the scheduled tokens' own K/V); output: [T, H, D];
    window_table / far_table: [R, max_blocks] block ids; query_start_loc: R + 1 offsets into the T tokens;
    seq_lens: R (cached + new tokens per request); both host lists or host tensors. Each request's queries are
    its last ``q_len`` positions. The window cache is read only at ``cached_full_positions``; the far cache at
    every older position. ``k_scale`` / ``v_scale``: FP8 caches' scales (module docstring).
    """
    if isinstance(query_start_loc, Tensor):  # host tensors (the CPU plugin's metadata) index as lists here
        query_start_loc, seq_lens = query_start_loc.tolist(), seq_lens.tolist()
    for r in range(len(seq_lens)):
        a, b = query_start_loc[r], query_start_loc[r + 1]
        if b == a:
            continue
        out = request_attention(query[a:b], key[a:b], value[a:b], window_cache, window_table[r], far_cache,
                                far_table[r], seq_lens[r], proj, window=window, sink_tokens=sink_tokens,
                                scale=scale, k_scale=k_scale, v_scale=v_scale)
        output[a:b] = out.to(output.dtype)
