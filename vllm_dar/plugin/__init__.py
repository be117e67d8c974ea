"""vLLM plugin glue: the attention backends of DAR layers and their KV cache layout.

``common``   what both platforms share: metadata and its builder, backend roles, the DAR impl mixin
``cpu``      the CPU platform: ``CPU_ATTN`` override (stock for models without ``dar``), builder, impl
``cuda``     the CUDA platform: vLLM's ``CUSTOM`` slot with the Triton kernels, builder, impl
``spec``     KV cache specs (window + sinks, far) and the window manager that keeps the sinks
``model``    projections loaded once per process, start-up checks, the summary log line

Nothing here is imported by ``vllm_dar.register``: vLLM resolves the backends by their paths when it first needs
one.
"""
import logging

from vllm_dar import envs

BACKEND = "vllm_dar.plugin.cpu.DarCpuBackend"
CUDA_BACKEND = "vllm_dar.plugin.cuda.DarCudaBackend"
# vllm_dar.envs.VLLM_DAR_CPU_BACKEND: which backend serves vLLM's CPU_ATTN slot.
CPU_BACKENDS = {"dar": BACKEND, "cuda": "vllm_dar.plugin.cuda.DarCudaBackendOnCpu"}


def cpu_backend() -> str:
    """``dar`` (default): the CPU backend (stock for models without ``dar``); ``cuda``: the CUDA backend under
    the CPU name, to run its builder, impl and Triton kernels (with ``TRITON_INTERPRET=1``) on a CPU."""
    return CPU_BACKENDS[envs.VLLM_DAR_CPU_BACKEND]


def register_backend_override() -> None:
    """Point vLLM's ``CPU_ATTN`` and ``CUSTOM`` slots at our backends (by import path; idempotent).

    ``CUSTOM`` is left alone, with a warning, if another plugin registered it first."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, cpu_backend())
    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != CUDA_BACKEND:
        logging.getLogger("vllm.vllm_dar").warning(
            "vllm-dar: vLLM's CUSTOM attention backend is already %s; the DAR CUDA backend is not registered",
            custom.get_path())
        return
    register_backend(custom, CUDA_BACKEND)
