"""Projection fitting: pure tensor functions from calibration statistics to ordered bases.

Each basis is full rank and ordered by importance, so the rank-``r`` projection is its first ``r`` columns; a
schedule can try many ranks without refitting.

Keys (score ``q . k`` approximated by ``(q A_j) . (k_g B)``):
* ``pca``: ``A = B = E``, the top eigenvectors of the uncentred key covariance ``C_k`` (Thin Keys' SVD, on
  post-RoPE keys because RoPE forbids folding the map into ``W_K``).
* ``qk``: minimise the expected score error ``E (q^T (I - A B^T) k)^2 = ||S_q (I - A B^T) S_k||_F^2`` with
  ``S = C^{1/2}``: SVD ``S_q S_k = U Sigma V^T``, ``A = S_q^{-1} U Sigma^{1/2}``, ``B = S_k^{-1} V Sigma^{1/2}``.
  ``S_q`` is block-diagonal over the group's KV heads (a query only meets its own head's keys). A ridge
  ``reg * mean eigenvalue`` on both covariances keeps the inverse from amplifying rare directions; ``reg -> inf``
  gives back PCA.

Values (``v ~ (v_g Down) Up``):
* ``pca``: ``Down = E``, ``Up = E^T`` for the top eigenvectors of ``C_v``.
* ``qk`` (output-aware): minimise the error after ``o_proj``, ``E ||(v - v Down Up) L||^2`` with ``L L^T =
  M = sum_h W_o,h^T W_o,h`` over the query heads reading the KV head (block-diagonal over the group): PCA of
  ``v L`` (eigenvectors ``E`` of ``L^T C_v L``), ``Down = L E``, ``Up = E^T L^{-1}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference import LayerProjections

METHODS = ("pca", "qk", "fit")  # fit: pca, then layer-wise output fitting (refine_layer)


def _sym_pow(c: Tensor, power: float, ridge: float = 0.0) -> Tensor:
    """C^power for symmetric PSD matrices [..., n, n], with ``ridge * mean eigenvalue`` added first."""
    evals, evecs = torch.linalg.eigh(c.double())
    evals = evals.clamp_min(0)
    evals = evals + ridge * evals.mean(-1, keepdim=True)
    evals = evals.clamp_min(1e-12 * evals.amax(-1, keepdim=True))
    return ((evecs * evals.pow(power).unsqueeze(-2)) @ evecs.mT).to(c.dtype)


def _top_eig(c: Tensor) -> Tensor:
    """Eigenvectors of symmetric C [n, n] as columns, largest eigenvalue first."""
    _, evecs = torch.linalg.eigh(c.double())
    return evecs.flip(-1).to(c.dtype)


def _block_diag(blocks: Tensor) -> Tensor:
    """[n, d, d] -> [n*d, n*d]."""
    return torch.block_diag(*blocks.unbind(0))


def fit_layer(
    cq: Tensor, ck: Tensor, cv: Tensor, wo_metric: Tensor, *, head_dim: int, method: str, reg: float = 0.1
) -> LayerFit:
    """Fit one layer's ordered bases.

    cq: [J, D, D] query covariance per KV head (summed over its query heads); ck, cv: [G, Dg, Dg] group key and
    value covariances; wo_metric: [J, D, D] ``sum_h W_o,h^T W_o,h`` per KV head.
    """
    if method not in METHODS:
        raise ValueError(f"--method: {method!r} is not one of {METHODS}")
    method = "pca" if method == "fit" else method  # fit starts from PCA, refined per layer after scheduling
    g, dg, _ = ck.shape
    jg = dg // head_dim  # KV heads per group
    key_q, key_k, val_down, val_up = [], [], [], []
    for gi in range(g):
        heads = slice(gi * jg, (gi + 1) * jg)
        if method == "pca":
            e = _top_eig(ck[gi])
            key_q.append(e), key_k.append(e)
            ev = _top_eig(cv[gi])
            val_down.append(ev), val_up.append(ev.T)
            continue
        sq = _block_diag(_sym_pow(cq[heads], 0.5, reg))  # [Dg, Dg]
        sk = _sym_pow(ck[gi], 0.5, reg)
        u, sig, vh = torch.linalg.svd(sq.double() @ sk.double())
        root = sig.sqrt()
        key_q.append((torch.linalg.solve(sq.double(), u * root)).float())
        key_k.append((torch.linalg.solve(sk.double(), vh.T * root)).float())
        m = _block_diag(wo_metric[heads])  # [Dg, Dg]
        l_half = _sym_pow(m, 0.5, 1e-4)  # symmetric square root: ||x L||^2 = x M x^T
        e = _top_eig(l_half @ cv[gi] @ l_half)
        val_down.append((l_half @ e).float())
        val_up.append((e.T @ torch.linalg.inv(l_half.double()).float()).float())
    return LayerFit(torch.stack(key_q), torch.stack(key_k), torch.stack(val_down), torch.stack(val_up), head_dim)


@dataclass(frozen=True)
class LayerFit:
    """Full-rank ordered bases of one layer; ``at(rk, rv)`` cuts the rank-(rk, rv) projections."""

    key_q: Tensor     # [G, Dg, Dg] query-side map; rows are the group's KV heads' D-slices
    key_k: Tensor     # [G, Dg, Dg] key-side map
    val_down: Tensor  # [G, Dg, Dg]
    val_up: Tensor    # [G, Dg, Dg] rows: reduced dims; columns: the group's KV heads' D-slices
    head_dim: int

    def at(self, key_rank: int, value_rank: int) -> LayerProjections:
        g, dg, _ = self.key_k.shape
        d = self.head_dim
        j = g * dg // d
        q = self.key_q[:, :, :key_rank].reshape(j, d, key_rank)  # [J, D, rk]
        up = self.val_up[:, :value_rank, :].reshape(g, value_rank, dg // d, d)  # [G, rv, J/G, D]
        up = up.permute(0, 2, 1, 3).reshape(j, value_rank, d)  # [J, rv, D]
        return LayerProjections(q_proj=q.contiguous(), k_down=self.key_k[:, :, :key_rank].contiguous(),
                                v_down=self.val_down[:, :, :value_rank].contiguous(), v_up=up.contiguous())


def refine_layer(proj: LayerProjections, sample: tuple[Tensor, Tensor, Tensor], wo: Tensor, *, window: int,
                 sink_tokens: int, steps: int = 200, queries: int = 128, lr: float = 3e-3,
                 seed: int = 0) -> tuple[LayerProjections, float, float]:
    """Layer-wise fitting (``--method fit``): start from closed-form projections and minimise, with Adam, the
    error of this layer's DAR attention output after ``o_proj`` against its full attention output, on cached
    calibration activations (no backward pass through the model).

    sample: q [H, T, D], k, v [J, T, D] post-RoPE; wo: [hidden, H*D]. Each step draws ``queries`` positions
    past the window (where reduction acts). Returns (projections, first loss, last loss), losses relative to the
    mean squared norm of the full output.
    """
    from ..reference import dar_attention

    q, k, v = (x.unsqueeze(0) for x in sample)  # [1, H|J, T, D]
    t = q.shape[2]
    lo = min(t - 1, max(window, sink_tokens) + 1)
    gen = torch.Generator().manual_seed(seed)
    params = [p.detach().clone().requires_grad_(True) for p in (proj.q_proj, proj.k_down, proj.v_down, proj.v_up)]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        all_pos = torch.arange(lo, t)
        full_out = dar_attention(q[:, :, all_pos], k, v, None, window=0, q_offset=all_pos)  # [1, H, N, D]
        target = full_out.transpose(1, 2).flatten(2) @ wo.T  # [1, N, hidden]
        norm = float(target.pow(2).sum(-1).mean())
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randint(0, len(all_pos), (min(queries, len(all_pos)),), generator=gen)
        pos = all_pos[idx]
        out = dar_attention(q[:, :, pos], k, v, LayerProjections(*params), window=window,
                            sink_tokens=sink_tokens, q_offset=pos)  # [1, H, Nq, D]
        loss = ((out.transpose(1, 2).flatten(2) @ wo.T - target[:, idx]).pow(2).sum(-1).mean()) / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    return LayerProjections(*(p.detach() for p in params)), first, last
