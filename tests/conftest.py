"""Shared fixtures: the real default model (built once from the embedded GGUF), tiny random Llamas, DAR-converted
models (built once per session) and real documentation tokens."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from vllm_dar import envs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_F32 = envs.VLLM_DAR_TEST_MODEL or os.path.join(REPO, "models", "smollm2-135m-f32")


@pytest.fixture(scope="session")
def default_model() -> str:
    """fp32 SmolLM2-135M-Instruct checkpoint (scripts/setup.sh builds it; built here if missing)."""
    if not os.path.isfile(os.path.join(DEFAULT_F32, "config.json")):
        from vllm_dar.models import prepare_model

        prepare_model("smollm2-135m", DEFAULT_F32, dtype="float32")
    return DEFAULT_F32


def make_tiny_llama(path: str, tokenizer_src: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    head_dim: int = 16, arch: str = "LlamaForCausalLM") -> str:
    """A random Llama-family checkpoint with the default model's tokenizer (for fast, shape-level tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch]
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=heads * head_dim, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=True)
    cfg.architectures = [arch]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_src, name), os.path.join(path, name))
    return path


@pytest.fixture(scope="session")
def tiny_llama(default_model, tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), default_model)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> list[str]:
    """Two real documentation files (held apart from the evaluation split by vllm_dar.data)."""
    from vllm_dar.data import split_files

    return split_files()[0][:2]


def _convert(default_model, tmp_path_factory, name, **kw) -> str:
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp(name) / "model")
    convert(default_model, out, calib_tokens=2048, progress=False, **kw)
    return out


@pytest.fixture(scope="session")
def dar_smol(default_model, tmp_path_factory) -> str:
    """SmolLM2-135M converted with window 64, ranks 16/16 per head in every layer, 4 sinks
    (VLLM_DAR_TEST_DAR_MODEL: reuse one)."""
    reuse = envs.VLLM_DAR_TEST_DAR_MODEL
    if reuse:
        return reuse
    return _convert(default_model, tmp_path_factory, "dar_smol", window=64, key_rank=16, value_rank=16,
                    sink_tokens=4, schedule="uniform", head_sharing="per_head")


@pytest.fixture(scope="session")
def tiny_dar(tiny_llama, tmp_path_factory) -> str:
    """The tiny random Llama (2 layers, 4 heads, 2 KV heads, head_dim 16) with window 8, ranks 8/8, 2 sinks."""
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp("tiny_dar") / "model")
    convert(tiny_llama, out, window=8, key_rank=8, value_rank=8, sink_tokens=2, schedule="uniform",
            head_sharing="per_head", calib_tokens=512, progress=False)
    return out


@pytest.fixture(scope="session")
def dar_smol_pyramid(default_model, tmp_path_factory) -> str:
    """Per-layer ranks (pyramid schedule) and windows (32/64/96, set after conversion: the fit does not depend
    on the window), joint head sharing: several window and far cache groups."""
    reuse = envs.VLLM_DAR_TEST_PYRAMID_MODEL
    if reuse:
        return reuse
    out = _convert(default_model, tmp_path_factory, "dar_pyr", window=48, key_rank=24, value_rank=16,
                   sink_tokens=4, schedule="pyramid", head_sharing="joint")
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["dar"]["window"] = [(32, 64, 96)[i % 3] for i in range(len(cfg["dar"]["window"]))]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out


@pytest.fixture(scope="session")
def doc_tokens(default_model) -> list[int]:
    """~2K tokens of held-out documentation text (real text: greedy continuations are not degenerate)."""
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files, token_windows

    tok = AutoTokenizer.from_pretrained(default_model)
    windows = token_windows(tok, split_files()[1][:20], context=1024, max_windows=2)
    return windows[0] + windows[1]
