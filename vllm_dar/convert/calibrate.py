"""Calibration: run the real model on real text and collect, per layer, the second moments of post-RoPE queries,
keys and values (what the fitting needs), plus one window of raw activations (what the schedule measures errors
on). The capture goes through ``vllm_dar.hf.capture``, whose context always removes itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from ..hf import attention_modules, capture


@dataclass
class LayerStats:
    """Uncentred second moments of one layer (fp64 sums) and a raw sample."""

    cq: Tensor   # [J, D, D]   sum over tokens and the query heads of each KV head of q q^T
    ckv: Tensor  # [2, J*D, J*D] keys and values of all KV heads concatenated: sum of x^T x
    tokens: int = 0
    sample: tuple[Tensor, Tensor, Tensor] | None = None  # q [H, T, D], k, v [J, T, D] of the first window
    wo_metric: Tensor | None = None  # [J, D, D]   sum over the KV head's query heads of W_o,h^T W_o,h
    wo: Tensor | None = None  # [hidden, H*D] the layer's o_proj weight (fp32)

    def key_cov(self, groups: int) -> Tensor:
        return _blocks(self.ckv[0] / self.tokens, groups)

    def value_cov(self, groups: int) -> Tensor:
        return _blocks(self.ckv[1] / self.tokens, groups)

    def query_cov(self) -> Tensor:
        return self.cq / self.tokens


def _blocks(c: Tensor, groups: int) -> Tensor:
    """Diagonal blocks [G, n/G, n/G] of a square matrix [n, n]."""
    n = c.shape[0] // groups
    return torch.stack([c[i * n:(i + 1) * n, i * n:(i + 1) * n] for i in range(groups)]).float()


def calibrate(model, windows: list[list[int]], *, sink_tokens: int, progress: bool = True) -> list[LayerStats]:
    """Second moments over ``windows`` (token id lists). Key/value moments skip the first ``sink_tokens``
    positions of each window: those are kept at full width and, as attention sinks, would dominate the fit.
    Runs on the model's device (sums there too); the returned statistics are on the CPU."""
    cfg = model.config
    device = next(model.parameters()).device
    h, j = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    stats = [LayerStats(cq=torch.zeros(j, d, d, dtype=torch.float64, device=device),
                        ckv=torch.zeros(2, j * d, j * d, dtype=torch.float64, device=device))
             for _ in attention_modules(model)]
    first = [True]

    def sink(i: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        st = stats[i]
        qf = q[0].double()  # [H, T, D]
        qg = qf.reshape(j, h // j, *qf.shape[1:]).flatten(1, 2)  # [J, (H/J)*T, D]
        st.cq += qg.mT @ qg
        kv = torch.stack([k[0], v[0]])[:, :, sink_tokens:].double()  # [2, J, T', D]
        kv = kv.permute(0, 2, 1, 3).flatten(2)  # [2, T', J*D]
        st.ckv += kv.mT @ kv
        st.tokens += kv.shape[1]
        if first[0]:
            st.sample = tuple(x[0].to("cpu", torch.float32, copy=True) for x in (q, k, v))

    with torch.no_grad(), capture(model, sink):
        for ids in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
            model(torch.tensor([ids], device=device), use_cache=False)
            first[0] = False
    for st, mod in zip(stats, attention_modules(model)):
        st.cq, st.ckv = st.cq.cpu(), st.ckv.cpu()
        wo = mod.o_proj.weight.detach().double().cpu()  # [hidden, H*D]
        per_head = wo.reshape(wo.shape[0], h, d).permute(1, 2, 0)  # [H, D, hidden]
        m = per_head @ per_head.mT  # [H, D, D]
        st.wo_metric = m.reshape(j, h // j, d, d).sum(1).float()
        st.wo = wo.float()
    return stats

