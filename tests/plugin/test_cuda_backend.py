"""The CUDA backend's glue, checked without a GPU and without an engine: registration, what vLLM's CUDA selector
asks of it, the refusal of models without ``dar``, and the automatic selection for models with one.

Real vLLM configs of real checkpoints (``tiny_llama``, ``tiny_dar``); the one stand-in is the ``on_cuda`` flag of
``select_cuda_backend``, which the installed hook takes from ``current_platform.is_cuda()``. Serving through this
backend's builder, impl and kernels is ``test_kernel_paths.py::test_cuda_backend_matches_default_cpu_path``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REGISTRATION = (
    "import sys, vllm_dar\n"
    "vllm_dar.register()\n"
    "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
    "from vllm_dar.patches import dar_backend_selection\n"
    "custom, cpu = E.CUSTOM.get_class(), E.CPU_ATTN.get_class()\n"
    "assert E[custom.get_name()] is E.CUSTOM and E[cpu.get_name()] is E.CPU_ATTN\n"
    "assert dar_backend_selection.installed()\n"
    "print(custom.__name__, cpu.__name__)\n"
)


def _register(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, **env})


@pytest.mark.parametrize(("switch", "cpu_backend"), [("dar", "DarCpuBackend"), ("cuda", "DarCudaBackendOnCpu")])
def test_custom_resolves_to_the_dar_cuda_backend(switch, cpu_backend):
    proc = _register(VLLM_DAR_CPU_BACKEND=switch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["DarCudaBackend", cpu_backend]


def test_unknown_cpu_backend_refused():
    proc = _register(VLLM_DAR_CPU_BACKEND="gpu")
    assert proc.returncode != 0
    assert "VLLM_DAR_CPU_BACKEND='gpu': expected one of dar, cuda" in proc.stderr


def _validate(**kw) -> list[str]:
    """What ``CudaPlatform.get_attn_backend_cls`` asks of the backend named by ``--attention-backend``."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_dar.plugin.cuda import DarCudaBackend

    args = {"head_size": 64, "dtype": torch.bfloat16, "kv_cache_dtype": "auto", "block_size": None,
            "use_mla": False, "has_sink": False, "use_sparse": False, "use_mm_prefix": False,
            "use_per_head_quant_scales": False, "attn_type": "decoder", "device_capability": DeviceCapability(8, 0)}
    return DarCudaBackend.validate_configuration(**{**args, **kw})


def test_cuda_selector_accepts_decoder_layers_on_sm80_and_up():
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_dar.plugin.cuda import DarCudaMetadataBuilder

    assert _validate() == [] and _validate(device_capability=DeviceCapability(9, 0), dtype=torch.float16) == []
    assert _validate(device_capability=DeviceCapability(7, 5)) == ["compute capability not supported"]
    assert _validate(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert DarCudaMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def _vllm_config(model: str, **attention):
    from vllm.config import AttentionConfig, ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=model, dtype="float32"),
                      attention_config=AttentionConfig(**attention))


def _cuda_impl(vllm_config):
    from vllm.config import set_current_vllm_config

    from vllm_dar.plugin.cuda import DarCudaImpl

    with set_current_vllm_config(vllm_config):  # as when vLLM builds the model's attention layers
        return DarCudaImpl(4, 16, 0.25, 2, None, None, "auto")


def test_cuda_impl_refuses_a_model_without_dar(tiny_llama):
    from vllm_dar.config import DarConfigError

    with pytest.raises(DarConfigError, match="has none. Serve it with a stock backend: drop --attention-backend"):
        _cuda_impl(_vllm_config(tiny_llama))


def test_cuda_impl_takes_a_dar_model(tiny_dar):
    impl = _cuda_impl(_vllm_config(tiny_dar))
    assert impl._dar_model is not None and impl.dar is None  # attached once weights are loaded
    assert impl.ops_kind == "triton"


@pytest.fixture
def dar_cuda_backend_registered():
    """CUSTOM -> our CUDA backend in this process, as ``vllm_dar.register`` does; restored afterwards."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm.v1.attention.backends.registry import register_backend

    from vllm_dar.plugin import CUDA_BACKEND

    before = {e: e.get_path() for e in (E.CUSTOM, E.CPU_ATTN) if e.is_overridden()}
    register_backend(E.CUSTOM, CUDA_BACKEND)
    yield
    for e in (E.CUSTOM, E.CPU_ATTN):
        e.clear_override()
        if e in before:
            register_backend(e, before[e])


def test_dar_model_selects_custom_on_cuda(tiny_dar, dar_cuda_backend_registered):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    from vllm_dar.plugin.model import select_cuda_backend

    vc = _vllm_config(tiny_dar)
    select_cuda_backend(vc, on_cuda=False)
    assert vc.attention_config.backend is None  # CPU: the CPU_ATTN override serves DAR, nothing to choose
    select_cuda_backend(vc, on_cuda=True)
    assert vc.attention_config.backend is E.CUSTOM
    select_cuda_backend(vc, on_cuda=True)  # asked for explicitly: kept
    assert vc.attention_config.backend is E.CUSTOM


def test_dar_model_refuses_another_backend_on_cuda(tiny_dar, dar_cuda_backend_registered):
    from vllm_dar.config import DarConfigError
    from vllm_dar.plugin.model import select_cuda_backend

    vc = _vllm_config(tiny_dar, backend="FLASH_ATTN")
    with pytest.raises(DarConfigError, match="--attention-backend FLASH_ATTN would serve it with full attention "
                                             r"\(uncompressed\); pass --attention-backend CUSTOM"):
        select_cuda_backend(vc, on_cuda=True)


def test_stock_model_untouched_on_cuda(tiny_llama, dar_cuda_backend_registered):
    from vllm_dar.plugin.model import select_cuda_backend

    vc = _vllm_config(tiny_llama, backend="FLASH_ATTN")
    select_cuda_backend(vc, on_cuda=True)
    assert vc.attention_config.backend.name == "FLASH_ATTN"
