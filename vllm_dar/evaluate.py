"""Quality evaluation on the Hugging Face engine: perplexity and greedy generation, stock or DAR-converted.

The DAR model runs through ``vllm_dar.reference`` (via ``vllm_dar.hf``); the stock model through transformers'
own attention. ``kv_bytes_per_token`` counts what a cache holds for one sequence of ``context`` tokens, divided
by ``context`` (``vllm_dar.config``'s byte model: reduced K/V for every token, full-width window and sinks).
"""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm import tqdm

from .checkpoint import load_dar
from .config import DarConfig, ModelShape
from .hf import dar_attention_enabled, load_model


def kv_report(cfg: DarConfig | None, model_config, context: int, dtype: torch.dtype) -> dict:
    """KV bytes per token of one ``context``-token sequence in caches of ``dtype`` (``vllm_dar.config``'s byte
    model), and their fraction of full attention's."""
    shape = cfg.shape if cfg is not None else ModelShape.from_hf_config(model_config, require_supported=False)
    full = float(shape.kv_bytes_per_token(dtype.itemsize))
    if cfg is None:
        return {"kv_bytes_per_token": full, "kv_fraction": 1.0, "full_kv_bytes_per_token": full}
    return {"kv_bytes_per_token": round(cfg.kv_bytes_per_token(context, dtype.itemsize), 2),
            "kv_fraction": round(cfg.kv_fraction(context), 5), "full_kv_bytes_per_token": full}


def _dar_context(model, cfg, projections, kv_dtype=None, far_only=False, prompt_len=None):
    if cfg is None and kv_dtype is None:
        return contextlib.nullcontext()
    return dar_attention_enabled(model, cfg, projections, kv_dtype, far_only, prompt_len)


@torch.no_grad()
def perplexity(model, windows: list[list[int]], *, cfg: DarConfig | None = None, projections=None,
               reference_argmax: list[torch.Tensor] | None = None, progress: bool = True,
               kv_dtype: torch.dtype | None = None, far_only: bool = False, prefix: int | None = None) -> dict:
    """Token-level perplexity of ``model`` over ``windows`` (each scored from its first token; with ``prefix``
    ``P``, each window is a ``P``-token prompt and its continuation, and only the continuation's tokens are
    scored: what a request prefilled with the prompt then decoding the continuation gets, teacher-forced. A
    ``cfg`` with token budgets needs ``prefix``: it evicts at the prompt's end, and a window scored from its first
    token would hide that).

    The result's ``argmax`` holds the greedy next-token choice at every scored position; given another model's
    (``reference_argmax``), ``top1_agreement`` is the fraction of positions where both choose the same token
    (teacher-forced greedy agreement). When every window has the same length, ``position_nll`` [T-1] is the mean
    NLL of the prediction at each position (position t predicts token t+1). ``kv_dtype``: K/V as an FP8 KV cache
    of that dtype holds them (``vllm_dar.reference.dar_attention_sdpa``; with ``cfg=None``, the full model's;
    ``far_only``: only the reduced K/V).
    """
    if cfg is not None and cfg.budget is not None and prefix is None:
        raise ValueError("token budgets evict at the end of a prompt: score a continuation (--prefix P)")
    first = 0 if prefix is None else prefix - 1  # the first scored prediction: position P - 1 predicts token P
    if prefix is not None and any(not 1 <= prefix < len(w) for w in windows):
        raise ValueError(f"--prefix {prefix}: every window must be longer than the prefix (got lengths "
                         f"{sorted({len(w) for w in windows})})")
    nll, count, same = 0.0, 0, 0
    argmax, by_position = [], []
    with _dar_context(model, cfg, projections, kv_dtype, far_only, prefix):
        for i, ids in enumerate(tqdm(windows, desc="scoring", unit="window", disable=not progress)):
            x = torch.tensor([ids])
            logits = model(x, use_cache=False).logits[0, first:-1].float()  # [T-1-first, V]
            by_position.append(torch.nn.functional.cross_entropy(logits, x[0, first + 1:], reduction="none"))
            nll += float(by_position[-1].sum())
            count += len(ids) - 1 - first
            argmax.append(logits.argmax(-1))
            if reference_argmax is not None:
                same += int((argmax[-1] == reference_argmax[i]).sum())
    result = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "argmax": argmax}
    if len({len(w) for w in windows}) == 1:  # windows of one length: the mean NLL at each position
        result["position_nll"] = torch.stack(by_position).mean(0)
    if reference_argmax is not None:
        result["top1_agreement"] = same / count
    return result


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_tokens: int, *, cfg: DarConfig | None = None, projections=None,
           eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation with a KV cache (the DAR reference reduces the cached full-width K/V on the fly,
    which is the same math as caching reduced K/V)."""
    from transformers import DynamicCache

    out: list[int] = []
    with _dar_context(model, cfg, projections):
        cache = DynamicCache(config=model.config)
        x = torch.tensor([prompt_ids])
        for _ in range(max_tokens):
            logits = model(x, past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(logits.float().argmax())
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            x = torch.tensor([[tok]])
    return out


def load_for_eval(model_dir: str, dtype: str | None):
    model, tokenizer = load_model(model_dir, dtype=dtype)
    cfg, projections = load_dar(model_dir)
    return model, tokenizer, cfg, projections
