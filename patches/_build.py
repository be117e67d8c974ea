"""Build step (not used at run time): ship ``vllm_dar_patches.pth`` at the top of site-packages.

Python runs the ``import`` line of every ``.pth`` file in site-packages at start-up, before any console
script such as ``vllm`` runs: the only hook early enough for ``vllm_cpu_dist_alias``. setuptools has no option
to put a file at the top of a wheel, so ``pyproject.toml`` names this class in ``[tool.setuptools.cmdclass]``.
A regular wheel is packed from ``build_lib``; an editable (PEP 660) wheel from the directory that
``editable_wheel`` sets as ``install_lib``, so in editable mode the file goes there.
"""

from pathlib import Path

from setuptools.command.build_py import build_py

PTH_NAME = "vllm_dar_patches.pth"
# Sorts after setuptools' `__editable__.*.pth`, so in an editable install `vllm_dar` is importable by then.
PTH_LINE = "import vllm_dar.patches.vllm_cpu_dist_alias as _alias; _alias.install()\n"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        Path(target, PTH_NAME).write_text(PTH_LINE)
