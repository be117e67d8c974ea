"""The three implementations of the DAR ops behind the real vLLM engine agree (``VLLM_DAR_KERNELS``).

A tiny random Llama (2 layers, 4 heads, 2 KV heads, head_dim 16) converted with window 8, ranks 8/8 and 2 sinks,
served through the plugin with the per-request reference loop, the batched CPU path and the Triton kernels (in
Triton's interpreter: the GPU code path end to end on this CPU, glue, metadata and kernels together). Prompts
shorter than and several blocks longer than the window, prefilled in 32-token chunks beside decodes.

Greedy tokens of a random model rarely flip, so log-probabilities of the generated tokens are compared too
(fp32; only summation order differs): 1e-4.
"""
from __future__ import annotations

import pytest

from .helpers import run_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dar(tiny_llama, tmp_path_factory) -> str:
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp("tiny_dar") / "model")
    convert(tiny_llama, out, window=8, key_rank=8, value_rank=8, sink_tokens=2, calib_tokens=512, progress=False)
    return out


PROMPTS = [list(range(1000, 1045)), [7, 8, 9], list(range(2000, 2090))]


def generate(tmp_path, model: str, kernels: str) -> list[dict]:
    env = {"VLLM_DAR_KERNELS": kernels}
    if kernels == "triton":
        env["TRITON_INTERPRET"] = "1"
    return run_engine(tmp_path, model, [PROMPTS], max_tokens=12, logprobs=True, env=env,
                      engine={"max_num_batched_tokens": 32, "max_num_seqs": 3})[0]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_kernel_path_matches_reference_loop(tiny_dar, tmp_path, kernels):
    want = generate(tmp_path, tiny_dar, "reference")
    got = generate(tmp_path, tiny_dar, kernels)
    for g, w in zip(got, want):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


def test_unknown_kernels_refused(tiny_dar, tmp_path):
    from .helpers import EngineFailed

    with pytest.raises(EngineFailed, match="VLLM_DAR_KERNELS='cuda': expected one of torch, reference, triton"):
        generate(tmp_path, tiny_dar, "cuda")
