"""Select the DAR attention backend (vLLM's CUSTOM slot) on CUDA for checkpoints with a ``dar`` section.

Target
    vLLM 0.32.0: ``vllm/model_executor/models/config.py:MODELS_CONFIG_MAP``, the per-architecture config hooks
    that ``vllm/config/vllm.py:VllmConfig.try_verify_and_update_config`` (from ``VllmConfig.__post_init__``)
    runs before any model is built; entries for the architectures DAR converts
    (``vllm_dar.config.SUPPORTED_ARCHITECTURES``: Llama, Mistral, Qwen2; none has an entry in 0.32.0).
Why
    On CUDA vLLM takes the attention backend from ``attention_config.backend`` (``--attention-backend``) or
    picks one of its own by priority (``vllm/platforms/cuda.py:CudaPlatform.get_attn_backend_cls``); a general
    plugin has no public seam to choose a backend per model. Without this, a DAR checkpoint served without the
    flag would run FLASH_ATTN over its unchanged weights: full attention, no compression, and no error.
How
    ``install()`` (called by ``vllm_dar.register``, which vLLM runs from ``EngineArgs.__post_init__``, before
    the engine config is built) puts a hook class in the map for each architecture. It runs the entry it
    replaced, if any, then ``vllm_dar.plugin.model.select_cuda_backend``: on CUDA, for a model with a ``dar``
    section, an unset backend becomes CUSTOM (logged), CUSTOM stays, and any other choice is refused at
    start-up, naming ``--attention-backend CUSTOM``. Models without ``dar`` and other platforms are untouched
    (on CPU the ``CPU_ATTN`` override serves DAR). The same hook turns chunked prefill and prefix caching off
    for a model with token budgets (``vllm_dar.plugin.model.configure_budgets``, logged; every platform): the
    engine-level config has no other per-model seam either. Installing imports only that light vLLM module.
Remove when
    vLLM gives plugins a per-model backend choice (a config callback for general plugins, or a backend named
    by the model's config), or the map and its caller change shape: ``test_backend_selection_target_unchanged``
    in ``tests/patches/test_patches.py`` fails then.
"""

_MARK = "_vllm_dar_backend_selection"  # set on our hook classes: install() never wraps its own hook


def _hook(previous: type | None) -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class DarBackendSelection(VerifyAndUpdateConfig):
        replaced = previous

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            if previous is not None:
                previous.verify_and_update_model_config(model_config)

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if previous is not None:
                previous.verify_and_update_config(vllm_config)
            from vllm.platforms import current_platform

            from vllm_dar.plugin.model import configure_budgets, select_cuda_backend

            select_cuda_backend(vllm_config, on_cuda=current_platform.is_cuda())
            configure_budgets(vllm_config)

    setattr(DarBackendSelection, _MARK, True)
    return DarBackendSelection


def install() -> None:
    """Hook the DAR architectures' entries of ``MODELS_CONFIG_MAP`` (idempotent)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dar.config import SUPPORTED_ARCHITECTURES

    for arch in SUPPORTED_ARCHITECTURES:
        previous = MODELS_CONFIG_MAP.get(arch)
        if not getattr(previous, _MARK, False):
            MODELS_CONFIG_MAP[arch] = _hook(previous)


def installed() -> bool:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dar.config import SUPPORTED_ARCHITECTURES

    return all(getattr(MODELS_CONFIG_MAP.get(a), _MARK, False) for a in SUPPORTED_ARCHITECTURES)
