"""The implementations of the DAR ops, and both DAR backends, agree behind the real vLLM engine.

A tiny random Llama (2 layers, 4 heads, 2 KV heads, head_dim 16) converted with window 8, ranks 8/8 and 2 sinks
(``tiny_dar``), served through the plugin with the per-request reference loop, the C++ CPU ops and the
Triton kernels (``VLLM_DAR_OPS``, in Triton's interpreter: the GPU code path end to end on this CPU, glue,
metadata and kernels together), and through the CUDA backend itself (``VLLM_DAR_CPU_BACKEND=cuda``: vLLM's
CUSTOM backend under the CPU name, with its device-metadata builder, impl and the Triton kernels). Prompts
shorter than and several blocks longer than the window, prefilled in 32-token chunks beside decodes.

Greedy tokens of a random model rarely flip, so log-probabilities of the generated tokens are compared too
(fp32; only summation order differs): 1e-4.
"""
from __future__ import annotations

import pytest

from .helpers import run_engine

pytestmark = pytest.mark.slow

PROMPTS = [list(range(1000, 1045)), [7, 8, 9], list(range(2000, 2090))]
INTERPRET = {"TRITON_INTERPRET": "1"}
SERVED = {  # how each path is asked for
    "reference": {"VLLM_DAR_OPS": "reference"},
    "cpp": {"VLLM_DAR_OPS": "cpp"},  # the default CPU path
    "triton": {"VLLM_DAR_OPS": "triton", **INTERPRET},
    "cuda-backend": {"VLLM_DAR_CPU_BACKEND": "cuda", **INTERPRET},
}


def generate(tmp_path, model: str, env: dict) -> list[dict]:
    return run_engine(tmp_path, model, [PROMPTS], max_tokens=12, logprobs=True, env=env,
                      engine={"max_num_batched_tokens": 32, "max_num_seqs": 3})[0]


@pytest.fixture(scope="module")
def served(tiny_dar, tmp_path_factory):
    """served(path) -> per-prompt tokens and log-probabilities; one engine run per path and module."""
    runs: dict[str, list[dict]] = {}

    def run(path: str) -> list[dict]:
        if path not in runs:
            runs[path] = generate(tmp_path_factory.mktemp(path), tiny_dar, SERVED[path])
        return runs[path]

    return run


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


@pytest.mark.parametrize("ops", ["cpp", "triton"])
def test_ops_match_reference_loop(served, ops):
    assert_same(served(ops), served("reference"))


def test_cuda_backend_matches_default_cpu_path(served):
    assert_same(served("cuda-backend"), served("cpp"))


def test_unknown_ops_refused(tiny_dar, tmp_path):
    from .helpers import EngineFailed

    with pytest.raises(EngineFailed, match="VLLM_DAR_OPS='cuda': expected one of cpp, reference, triton"):
        generate(tmp_path, tiny_dar, {"VLLM_DAR_OPS": "cuda"})


def test_cuda_backend_refuses_a_model_without_dar(tiny_llama, tmp_path):
    """The switch reaches the engine (the CUDA impl, not the CPU one, builds the layers), and a stock model is
    refused at start-up, naming what to use."""
    from .helpers import EngineFailed

    with pytest.raises(EngineFailed, match="has none. Serve it with a stock backend"):
        generate(tmp_path, tiny_llama, SERVED["cuda-backend"])
