"""Shared fixtures: the real default model (built once from the embedded GGUF) and tiny random Llamas."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_F32 = os.environ.get("VLLM_DAR_TEST_MODEL", os.path.join(REPO, "models", "smollm2-135m-f32"))


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
