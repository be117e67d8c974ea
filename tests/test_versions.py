"""The start-up check of the installed vLLM version (``vllm_dar.versions``)."""

import os
import subprocess
import sys

import pytest

from vllm_dar.versions import SUPPORTED_VLLM, check_vllm_version, installed_vllm_version

SKIP_ENV = "VLLM_DAR_SKIP_VERSION_CHECK"  # defined in vllm_dar.envs


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.4", "0.32.5.dev3+g1a2b.cpu"])
def test_accepts_supported(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0+cpu", "0.32.0rc1", "not-a-version"])
def test_rejects_unsupported_naming_it_and_the_range(version, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(RuntimeError) as err:
        check_vllm_version(version)
    assert repr(version) in str(err.value)
    assert SUPPORTED_VLLM in str(err.value)
    assert SKIP_ENV in str(err.value)


def test_skip_env(monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    check_vllm_version("0.1.0")


def test_installed_vllm_is_supported():
    assert installed_vllm_version().startswith("0.32.")
    check_vllm_version()


def test_register_refuses_an_unsupported_vllm(tmp_path):
    """A `vllm` 0.99.0 distribution first on the path (a fake dist-info only): register() must refuse it."""
    info = tmp_path / "vllm-0.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.99.0\n")
    env = {k: v for k, v in os.environ.items() if k != SKIP_ENV}

    def register(**extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import vllm_dar; vllm_dar.register()"], check=False,
                              capture_output=True, text=True, timeout=120,
                              env={**env, "PYTHONPATH": str(tmp_path), **extra_env})

    out = register()
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "'0.99.0'" in out.stderr

    out = register(**{SKIP_ENV: "1"})
    assert out.returncode == 0, out.stderr


def test_register_is_idempotent():
    import vllm_dar

    vllm_dar.register()
    vllm_dar.register()
