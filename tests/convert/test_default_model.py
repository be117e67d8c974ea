"""The real default model: prepare-model output, conversion, and DAR perplexity against the stock model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_dar.checkpoint import load_dar
from vllm_dar.config import DarConfig
from vllm_dar.convert import convert
from vllm_dar.data import split_files, token_windows
from vllm_dar.evaluate import perplexity
from vllm_dar.hf import load_model

pytestmark = pytest.mark.slow


def test_prepared_checkpoint_is_plain_llama(default_model):
    with open(os.path.join(default_model, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert os.path.isfile(os.path.join(default_model, "chat_template.jinja"))


@pytest.fixture(scope="module")
def real_dar(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "dar"
    convert(default_model, str(out), window=64, key_rank=48, value_rank=48, head_sharing="joint", sink_tokens=4,
            schedule="uniform", calib_tokens=1024, context=512, progress=False)
    return str(out)


def test_dar_perplexity_close_to_stock_and_window_limit_exact(default_model, real_dar):
    model, tok = load_model(default_model, dtype="float32")
    windows = token_windows(tok, split_files()[1], context=512, max_windows=2)
    full = perplexity(model, windows, progress=False)
    cfg, proj = load_dar(real_dar)
    dar = perplexity(model, windows, cfg=cfg, projections=proj, reference_argmax=full["argmax"], progress=False)
    # A converted model is worse than stock but not broken.
    assert full["perplexity"] < dar["perplexity"] < 1.5 * full["perplexity"]
    assert dar["top1_agreement"] > 0.75
    # Per position: the mean over positions is the perplexity's NLL, and every position within the first window
    # (64: its keys are all full width) scores as in the full model; beyond it, the reduced keys cost.
    assert float(full["position_nll"].mean()) == pytest.approx(full["nll"], rel=1e-5)
    torch.testing.assert_close(dar["position_nll"][:64], full["position_nll"][:64], rtol=1e-4, atol=1e-4)
    assert float(dar["position_nll"][64:].mean()) > float(full["position_nll"][64:].mean())
    # A window covering the whole context is standard attention: the same perplexity to fp32 rounding.
    wide = DarConfig(**{**cfg.__dict__, "window": (512,) * 30})
    same = perplexity(model, windows, cfg=wide, projections=proj, progress=False)
    assert same["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
    # Uniform reduction (w=0) at the same ranks is far worse (the paper's central ablation).
    uniform = DarConfig(**{**cfg.__dict__, "window": (0,) * 30})
    assert perplexity(model, windows, cfg=uniform, projections=proj, progress=False)["perplexity"] > \
        1.2 * dar["perplexity"]


def test_generate_reference_is_deterministic(real_dar):
    model, tok = load_model(real_dar, dtype="float32")
    cfg, proj = load_dar(real_dar)
    from vllm_dar.evaluate import greedy

    ids = tok("The os module provides", add_special_tokens=False)["input_ids"]
    a = greedy(model, ids, 8, cfg=cfg, projections=proj)
    b = greedy(model, ids, 8, cfg=cfg, projections=proj)
    assert a == b and len(a) == 8
    # With a KV cache the reference must equal a fresh full forward over prompt + generated tokens.
    with torch.no_grad():
        from vllm_dar.hf import dar_attention_enabled

        with dar_attention_enabled(model, cfg, proj):
            logits = model(torch.tensor([ids + a[:-1]])).logits[0, len(ids) - 1:]
    assert logits.argmax(-1).tolist() == a
