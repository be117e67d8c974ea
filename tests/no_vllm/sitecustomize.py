"""Simulates a machine without vLLM: with this folder on ``PYTHONPATH``, ``vllm`` and its submodules are not found
(``importlib.util.find_spec`` gives None, ``import vllm`` raises ``ModuleNotFoundError``), in the interpreter and
in every subprocess that inherits the variable.

What the GPU check (``benchmarks/gpu_check.sh``) runs has to work where vLLM is not installed (the GPU machine has
torch and Triton, no vLLM): ``PYTHONPATH=tests/no_vllm python -m pytest tests/kernels`` shows it on a machine that
has vLLM, and ``tests/kernels/test_no_vllm.py`` checks the kernel path under it. ``sys.path`` imports go through
``PathFinder``, so refusing the names there hides the installed package as if it were absent.
"""
from importlib.machinery import PathFinder

_find_spec = PathFinder.find_spec.__func__


def _find_spec_without_vllm(cls, fullname, path=None, target=None):
    if fullname == "vllm" or fullname.startswith("vllm."):  # not vllm_dar
        return None
    return _find_spec(cls, fullname, path, target)


PathFinder.find_spec = classmethod(_find_spec_without_vllm)
