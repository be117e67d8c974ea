"""vLLM plugin glue: the CPU attention backend override and the KV cache layout of DAR layers.

``backend``  backends (stock override, DAR window, DAR far) and their metadata builder
``impl``     the attention impl: stock for models without ``dar``, else attaches DAR state per layer
``spec``     KV cache specs (window + sinks, far) and the window manager that keeps the sinks
``model``    projections loaded once per process, start-up checks, the summary log line

Nothing here is imported by ``vllm_dar.register``: vLLM resolves ``BACKEND`` by its path when it first needs
the CPU attention backend.
"""

BACKEND = "vllm_dar.plugin.backend.DarCpuBackend"


def register_backend_override() -> None:
    """Point vLLM's ``CPU_ATTN`` at ``DarCpuBackend`` (by import path; idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
