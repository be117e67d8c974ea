"""Per-layer schedules of (window, key rank, value rank).

* ``uniform``: the same setting in every layer.
* ``pyramid``: PyramidKV's shape (arXiv 2406.02069: lower layers need more cache) applied to ranks: a linear ramp
  from ``(1 + slope) r`` at the bottom to ``(1 - slope) r`` at the top, same total bytes as uniform.
* ``calibrated``: choose each layer's (window, rk, rv) to minimise the summed, measured error of the layers'
  attention outputs (after ``o_proj``) under a KV byte budget (convert prices windows as vLLM reserves them:
  ``DarConfig.reserved_fraction``, at the caches' element sizes as served; ranks from ``rank_grid``,
  kernel-friendly). A multiple-choice knapsack solved
  by its Lagrangian: for a price ``lam`` per byte each layer picks ``argmin err + lam * bytes`` and ``lam`` is
  bisected to the budget.
  Key and value errors are measured separately (the other side at full width) and added, which keeps the search
  to ``windows x ranks x 2`` attention evaluations per layer; the key and value ranks are chosen as a pair, since
  the far cache's paged bytes depend on their sum (``reserved_far_elems``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import RESERVED_TAILS, DarConfig, ModelShape, reserved_far_elems, window_cache_blocks
from ..reference import dar_masks, reconstruct_kv
from .fit import LayerFit

SCHEDULES = ("uniform", "pyramid", "calibrated")
WINDOWS = (32, 64, 128, 256, 512)
RANK_TILE = 16  # the C++ kernel's rank tile (AVX-512 lanes): ranks that fill whole tiles waste no work
QUERY_SAMPLES = 128


@dataclass(frozen=True)
class Setting:
    window: int
    key_rank: int
    value_rank: int


def rank_grid(group_dim: int) -> list[int]:
    """The ranks the calibrated search tries for a projection input width ``group_dim`` (ascending): multiples
    of ``RANK_TILE`` up to half the width (joint SmolLM2, 192 wide: 16, 32, ..., 96), so every rank fills the
    kernel's tiles and far pages (``rk + rv`` a multiple of 16) fit a window page with little padding; half
    tiles where that half is below ``3 * RANK_TILE`` (per-head 64-wide groups: 8, 16, 24, 32)."""
    step = RANK_TILE if group_dim // 2 >= 3 * RANK_TILE else RANK_TILE // 2
    return list(range(step, group_dim // 2 + 1, step)) or [max(1, group_dim // 2)]


def cheapest(shape: ModelShape, *, sink_tokens: int, head_sharing: str) -> DarConfig:
    """The smallest setting the calibrated search can reach: its narrowest window and lowest ranks in every layer.
    Its ``reserved_fraction`` (at the prices used, the model dtype's for ``convert``) is the lowest budget the
    search accepts."""
    width = DarConfig.uniform(shape, window=0, key_rank=1, value_rank=1, head_sharing=head_sharing).group_dim
    r = rank_grid(width)[0]
    return DarConfig.uniform(shape, window=min(WINDOWS), key_rank=r, value_rank=r, sink_tokens=sink_tokens,
                             head_sharing=head_sharing)


def pyramid(num_layers: int, *, window: int, key_rank: int, value_rank: int, max_rank: int,
            slope: float = 0.5) -> list[Setting]:
    """Linear rank ramp, bottom layers widest; the rounded total equals the uniform one."""
    def ramp(r: int) -> list[int]:
        target = r * num_layers
        raw = [r * (1 + slope * (1 - 2 * i / max(1, num_layers - 1))) for i in range(num_layers)]
        out = [min(max_rank, max(1, round(x))) for x in raw]
        i = 0
        while sum(out) != target:  # fix rounding drift, walking the layers
            step = 1 if sum(out) < target else -1
            k = i % num_layers if step > 0 else num_layers - 1 - i % num_layers
            if 1 <= out[k] + step <= max_rank:
                out[k] += step
            i += 1
        return out
    return [Setting(window, k, v) for k, v in zip(ramp(key_rank), ramp(value_rank))]


def layer_errors(sample: tuple[Tensor, Tensor, Tensor], wo: Tensor, fit: LayerFit, *, windows, ranks,
                 sink_tokens: int) -> tuple[Tensor, Tensor]:
    """Measured output errors of one layer: (key errors [W, R], value errors [W, R]).

    ``err = mean over sampled queries of ||(o_dar - o_full) W_o^T||^2``; key errors reduce keys only (values at
    full width), value errors values only (then the softmax is the full one for every window and rank).
    Reduced scores and values go through ``reconstruct_kv`` (same math as ``dar_attention``, which the tests
    check), so each (window, rank) costs one softmax. sample: q [H, T, D], k, v [J, T, D].
    """
    q, k, v = (x.unsqueeze(0) for x in sample)  # [1, H|J, T, D]
    h, j, t, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    rep = h // j
    pos = torch.linspace(min(t - 1, 16), t - 1, min(QUERY_SAMPLES, t)).long().unique()  # [Tq]
    qs = q[:, :, pos] * d ** -0.5  # [1, H, Tq, D], scale folded in
    s_full = qs @ k.repeat_interleave(rep, 1).mT  # [1, H, Tq, T]
    vf = v.repeat_interleave(rep, 1)  # [1, H, T, D]
    causal = dar_masks(len(pos), t, window=1 << 62, sink_tokens=0, q_offset=pos)[0]
    p_full = torch.softmax(s_full.masked_fill(~causal, float("-inf")), -1)  # [1, H, Tq, T]
    full_out = p_full @ vf
    dk, dv = fit.key_k.shape[1], fit.val_down.shape[1]

    def err(out: Tensor) -> float:
        diff = (out - full_out).transpose(1, 2).flatten(2) @ wo.T  # [1, Tq, hidden]
        return float(diff.pow(2).sum(-1).mean())

    ek = torch.zeros(len(windows), len(ranks))
    ev = torch.zeros(len(windows), len(ranks))
    recon = [reconstruct_kv(k, v, fit.at(min(r, dk), min(r, dv))) for r in ranks]  # per rank: k~, v~ [1,J,T,D]
    s_red = [qs @ kr.repeat_interleave(rep, 1).mT for kr, _ in recon]  # [1, H, Tq, T] each
    for a, w in enumerate(windows):
        full, red = dar_masks(len(pos), t, window=w, sink_tokens=sink_tokens, q_offset=pos)
        p_win = p_full.masked_fill(~full, 0.0)
        p_red = p_full.masked_fill(~red, 0.0)
        for b, (sr, (_, vr)) in enumerate(zip(s_red, recon)):
            scores = torch.where(full, s_full, torch.where(red, sr, float("-inf")))
            ek[a, b] = err(torch.softmax(scores, -1) @ vf)
            ev[a, b] = err(p_win @ vf + p_red @ vr.repeat_interleave(rep, 1))
    return ek, ev


def calibrated(errors: list[tuple[Tensor, Tensor]], *, windows, ranks, groups: int, full_per_token: int,
               context: int, sink_tokens: int, budget: float, block_size: int | None = None,
               itemsizes: tuple[int, int] = (1, 1)) -> list[Setting]:
    """Lagrangian allocation under ``budget`` (fraction of the full KV bytes at ``context``, full attention's
    cache in the window cache's dtype).

    Bytes are counted as the caches hold them (``kv_fraction``: reduced K/V for every token, full-width window
    and sinks) or, with ``block_size``, as they reserve them at that window block size (``reserved_fraction``):
    each window block-rounded with two tails, each layer's far cache in whole pages of a window page's bytes, so a
    rank pair whose ``groups * (rk + rv)`` pads its pages costs the padding. ``itemsizes``: bytes per element of
    (the window cache, the far cache) as served (``vllm_dar.convert.priced_itemsizes``; (1, 1): the model dtype
    for both): an FP8 far cache beside a 16-bit window makes a far element cost half a window element (held or
    reserved), so the search buys rank where it would buy window.
    """
    r = torch.tensor(ranks, dtype=torch.int64)
    w_size, f_size = itemsizes
    if block_size is None:
        slots = [min(context, w + sink_tokens) for w in windows]
        pair_cost = (groups * (r[:, None] + r[None, :])).double() * f_size / w_size  # [R, R] elems per token
    else:
        slots = [min(context, block_size * window_cache_blocks(w, sink_tokens, block_size, RESERVED_TAILS))
                 for w in windows]
        pair_cost = torch.tensor([[reserved_far_elems(context, block_size, full_per_token, groups * (a + b),
                                                      w_size, f_size) / context
                                   for b in ranks] for a in ranks], dtype=torch.float64)
    win_cost = torch.tensor(slots, dtype=torch.float64) * full_per_token / context  # [W] per-token elems
    num_ranks = len(ranks)

    def pick(lam: float) -> tuple[list[Setting], float]:
        out, cost = [], 0.0
        for ek, ev in errors:
            pairs = ek.double()[:, :, None] + ev.double()[:, None, :] + lam * pair_cost  # [W, R, R]
            best, flat = pairs.flatten(1).min(1)  # [W]
            a = int((best + lam * win_cost).argmin())
            ki, vi = divmod(int(flat[a]), num_ranks)
            out.append(Setting(int(windows[a]), int(ranks[ki]), int(ranks[vi])))
            cost += float(win_cost[a] + pair_cost[ki, vi])
        return out, cost / (len(errors) * full_per_token)

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget:  # raise the price until the cheapest choices fit
        hi *= 4
        if hi > 1e30:
            raise ValueError(f"--kv-budget {budget} is below the smallest setting this search can reach")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pick(mid)[1] <= budget else (mid, hi)
    return pick(hi)[0]


def measure_all(stats, fits: list[LayerFit], *, windows, ranks, sink_tokens: int,
                progress: bool = True) -> list[tuple[Tensor, Tensor]]:
    out = []
    for st, fit in tqdm(list(zip(stats, fits)), desc="measuring layer errors", unit="layer",
                        disable=not progress):
        with torch.no_grad():
            out.append(layer_errors(st.sample, st.wo, fit, windows=windows, ranks=ranks,
                                    sink_tokens=sink_tokens))
    return out
