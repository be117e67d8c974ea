"""``vllm-dar convert`` and ``vllm-dar heal`` with ``--device``: on the CPU (named explicitly) here, on CUDA where
there is a device (skipped otherwise). Self-contained, as on the GPU machine (no vLLM, no default model, no
python3.11-doc): a random tiny Llama with a byte-level tokenizer built here, and generated calibration text.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from vllm_dar.checkpoint import load_dar
from vllm_dar.cli import main

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CONTEXT = 128


def byte_tokenizer(path: str):
    """A byte-level BPE tokenizer with no merges (one token per byte) and an end-of-text token: 257 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Llama (4 heads, 2 KV heads, head_dim 16) with the byte tokenizer, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("tiny") / "llama")
    cfg = AutoConfig.for_model("llama", vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=1024, tie_word_embeddings=True)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    """About 12K bytes of generated words (the tokenizer makes one token of each byte)."""
    rng = random.Random(0)
    words = ["cache", "window", "token", "rank", "query", "value", "key", "layer", "block", "far", "the", "of"]
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(2000)))
    return str(path)


def run_cli(capsys, *argv) -> dict:
    assert main([*argv, "--json", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def convert_and_heal(tiny_model: str, text: str, tmp_path, capsys, device: str) -> dict:
    dar, healed = str(tmp_path / "dar"), str(tmp_path / "healed")
    run_cli(capsys, "convert", tiny_model, dar, "--window", "8", "--key-rank", "4", "--value-rank", "4",
            "--sink-tokens", "2", "--calib", text, "--calib-tokens", str(8 * CONTEXT), "--context", str(CONTEXT),
            "--schedule", "uniform", "--head-sharing", "per_head", "--device", device)
    cfg, proj = load_dar(dar)
    assert cfg is not None and cfg.window == (8, 8) and all(torch.isfinite(p.q_proj).all() for p in proj)
    summary = run_cli(capsys, "heal", dar, healed, "--max-tokens", str(3 * CONTEXT), "--context", str(CONTEXT),
                      "--weights", "qk", "--calib", text, "--device", device)
    assert summary["finished"] and summary["steps"] == 3
    cfg, proj = load_dar(healed)
    record = cfg.extra["heal"]
    assert record["device"] == device and cfg.method == "pca+heal"
    assert all(torch.isfinite(t).all() for p in proj for t in (p.q_proj, p.k_down, p.v_down, p.v_up))
    return record


def test_convert_and_heal_on_cpu(tiny_model, text, tmp_path, capsys):
    convert_and_heal(tiny_model, text, tmp_path, capsys, "cpu")


def test_device_flag_refuses_what_it_cannot_use(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "src", "out", "--device", "tpu"])
    assert "--device" in capsys.readouterr().err


@CUDA
def test_convert_and_heal_on_cuda(tiny_model, text, tmp_path, capsys):
    """On CUDA heal's ``--precision auto`` picks bf16 autocast where the GPU has native bf16 (compute capability
    8.0+), and the healed checkpoint is written from the GPU's tensors."""
    record = convert_and_heal(tiny_model, text, tmp_path, capsys, "cuda")
    assert record["bf16_steps"] == (torch.cuda.get_device_capability()[0] >= 8)


@CUDA
def test_calibration_on_cuda_matches_cpu(tiny_model, text):
    """The statistics the converter fits come out of the CUDA forward passes as from the CPU's (fp32 both; the
    sums are fp64 on either device), and on the CPU."""
    from vllm_dar.convert import calibrate_model

    kw = {"calib_files": [text], "calib_tokens": 4 * CONTEXT, "context": CONTEXT, "sink_tokens": 2,
          "progress": False}
    _, cpu, _ = calibrate_model(tiny_model, device="cpu", **kw)
    _, gpu, _ = calibrate_model(tiny_model, device="cuda", **kw)
    for a, b in zip(cpu, gpu):
        assert b.ckv.device.type == "cpu" and b.sample[0].device.type == "cpu"
        for x, y in ((a.cq, b.cq), (a.ckv, b.ckv), (a.wo_metric, b.wo_metric)):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
