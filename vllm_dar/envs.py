"""Every ``VLLM_DAR_*`` environment variable: defined, typed and documented here, read from here.

Modelled on ``vllm/envs.py``: ``vllm_dar.envs.VLLM_DAR_OPS`` reads the environment at each access (tests and
subprocesses may change it), parses it and refuses a bad value with an error that names the variable. Other
modules never call ``os.environ`` for these names; they read ``vllm_dar.envs.NAME`` (the shell scripts read
``VLLM_DAR_VENV`` themselves, documented below).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# The implementations of the DAR cache write and attention (``vllm_dar.ops.select_ops``): ``cpp``, the C++ CPU
# kernel (one call per layer for the whole batch); ``reference``, the per-request PyTorch loop over the paged
# caches (the plain form of the math, and the fallback when the C++ kernel cannot be built); ``triton``, the
# Triton kernels (the GPU path; on a CPU only under ``TRITON_INTERPRET=1``).
OPS_KINDS = ("cpp", "reference", "triton")
# Which backend serves vLLM's CPU_ATTN slot: ``dar``, the CPU backend (stock for models without ``dar``);
# ``cuda``, the CUDA backend under the CPU name, to run its builder, impl and Triton kernels on a CPU.
CPU_BACKENDS = ("dar", "cuda")

if TYPE_CHECKING:
    VLLM_DAR_OPS: str = "cpp"
    VLLM_DAR_CPU_BACKEND: str = "dar"
    VLLM_DAR_BLOCK_SIZE: int = 16
    VLLM_DAR_FP8_WINDOW: bool = False
    VLLM_DAR_SKIP_VERSION_CHECK: bool = False
    VLLM_DAR_MODEL: str | None = None
    VLLM_DAR_TEST_MODEL: str | None = None
    VLLM_DAR_TEST_DAR_MODEL: str | None = None
    VLLM_DAR_TEST_PYRAMID_MODEL: str | None = None
    VLLM_DAR_TEST_KILL_AT: str | None = None
    VLLM_DAR_VENV: str = ".venv"

# Names that no longer mean anything: set, they would be ignored silently, so reading any variable refuses them.
_RENAMED = {
    "VLLM_DAR_KERNELS": "VLLM_DAR_OPS (values cpp, reference, triton; `torch` is now `cpp`)",
    "VLLM_DAR_CPU_KERNEL": "VLLM_DAR_OPS=reference (the PyTorch path without the C++ kernel)",
}


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"vllm-dar: {name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _positive_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"vllm-dar: {name}={value!r}: expected a positive integer")
    return int(value)


def _kill_point(name: str) -> str | None:
    value = os.environ.get(name) or None
    point, at, n = (value or "").partition("@")
    if value is not None and (":" not in point or (at and (not n.isdigit() or int(n) < 1))):
        raise ValueError(f"vllm-dar: {name}={value!r}: expected COMMAND:POINT or COMMAND:POINT@N (N >= 1)")
    return value


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"vllm-dar: {name}={value!r}: expected 0 or 1")
    return value == "1"


environment_variables: dict[str, Callable[[], Any]] = {
    # Serving (read in every vLLM process: main, engine core, workers).
    # Which ops the plugin runs (OPS_KINDS above). Default cpp; when the C++ kernel cannot be built (no
    # compiler) the plugin logs a warning and runs `reference`, and says so in its start-up summary.
    "VLLM_DAR_OPS": lambda: _choice("VLLM_DAR_OPS", "cpp", OPS_KINDS),
    # Which backend serves vLLM's CPU_ATTN slot (CPU_BACKENDS above).
    "VLLM_DAR_CPU_BACKEND": lambda: _choice("VLLM_DAR_CPU_BACKEND", "dar", CPU_BACKENDS),
    # Tokens per window-cache block of a DAR model when --block-size is not given (the CPU platform's default of
    # 128 would hold up to 3 x 128 full-width slots per request). The far cache's block size follows from it.
    "VLLM_DAR_BLOCK_SIZE": lambda: _positive_int("VLLM_DAR_BLOCK_SIZE", 16),
    # 1: with --kv-cache-dtype fp8*, store the window cache (full-width K/V) in FP8 too, not only the far cache
    # (vllm_dar.kv_dtype.cache_dtypes: more capacity, about +1.5% perplexity instead of +0.1%).
    "VLLM_DAR_FP8_WINDOW": lambda: _flag("VLLM_DAR_FP8_WINDOW"),
    # 1: serve with a vLLM outside the supported range (vllm_dar.versions.SUPPORTED_VLLM) without refusing.
    "VLLM_DAR_SKIP_VERSION_CHECK": lambda: _flag("VLLM_DAR_SKIP_VERSION_CHECK"),
    # Benchmarks: the source (full-attention) checkpoint, when --model is not given; unset: the embedded default
    # model that scripts/setup.sh builds under the repository's models/.
    "VLLM_DAR_MODEL": lambda: os.environ.get("VLLM_DAR_MODEL") or None,
    # Tests: reuse these checkpoints instead of building them in the session (the fp32 default model, its DAR
    # conversion at w=64 r=16/16 4 sinks, and its pyramid conversion; see tests/conftest.py).
    "VLLM_DAR_TEST_MODEL": lambda: os.environ.get("VLLM_DAR_TEST_MODEL") or None,
    "VLLM_DAR_TEST_DAR_MODEL": lambda: os.environ.get("VLLM_DAR_TEST_DAR_MODEL") or None,
    "VLLM_DAR_TEST_PYRAMID_MODEL": lambda: os.environ.get("VLLM_DAR_TEST_PYRAMID_MODEL") or None,
    # Test-only: SIGKILL the process the N-th time (default the first) it reaches a named point, as
    # `COMMAND:POINT[@N]` (vllm_dar._fs.kill_point; tests/test_kill.py). Points: `convert:`, `prepare:`, `heal:`
    # (the final output) or `heal-state:` (the first run state, which creates OUT) followed by `staged` (built,
    # not published), `aside` (old OUT moved aside, where the atomic swap is unsupported) or `published` (at OUT,
    # the old one not yet deleted); `heal:saved` (after a run-state save), `heal:state-written` (a run state
    # written to its .tmp file, not yet renamed over the previous one). Never set it outside tests.
    "VLLM_DAR_TEST_KILL_AT": lambda: _kill_point("VLLM_DAR_TEST_KILL_AT"),
    # scripts/setup.sh and scripts/main.sh: the virtual environment to create and use (read by the scripts).
    "VLLM_DAR_VENV": lambda: os.environ.get("VLLM_DAR_VENV", ".venv"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        for old, new in _RENAMED.items():
            if old in os.environ:
                raise ValueError(f"vllm-dar: {old} is no longer read; use {new}")
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
