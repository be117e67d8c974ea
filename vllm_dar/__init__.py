"""vllm-dar: dual-dimension (DAR) KV-cache compression for vLLM.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process (main, engine core,
workers); it must stay cheap and idempotent and import nothing heavy. This module is also imported at
interpreter start-up by ``vllm_dar_patches.pth`` (see ``vllm_dar.patches``): keep its import free of work.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_dar.patches import vllm_cpu_dist_alias
    from vllm_dar.versions import check_vllm_version

    check_vllm_version()
    # Already done by the .pth at start-up; repeated (idempotent) for interpreters that skip .pth files.
    vllm_cpu_dist_alias.install()
    # CPU_ATTN -> vllm_dar.plugin.cpu.DarCpuBackend, by path: stock behaviour for models without `dar`;
    # CUSTOM -> vllm_dar.plugin.cuda.DarCudaBackend (the DAR backend on CUDA).
    from vllm_dar.plugin import register_backend_override

    register_backend_override()
    # On CUDA, a model with a `dar` section selects CUSTOM (see the patch's docstring). Imports vLLM's model
    # registry, which vLLM imports anyway when it builds the ModelConfig right after loading plugins.
    from vllm_dar.patches import dar_backend_selection

    dar_backend_selection.install()
    # On CPU, `--distributed-executor-backend ray` (see the patch's docstring); Ray itself is imported only by
    # an engine that uses it.
    from vllm_dar.patches import cpu_ray_executor

    cpu_ray_executor.install()
    _registered = True
