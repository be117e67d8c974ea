"""Kernel tests run natively on a CUDA device when there is one, else in Triton's interpreter on the CPU.

Which one: ``layout.kernel_device`` (CUDA unless ``TRITON_INTERPRET=1`` is set). Without CUDA, ``triton.jit``
binds every kernel (triton's own library functions included) to the interpreter when its module is imported with
TRITON_INTERPRET=1, so this sets it before the test modules import triton; if an earlier test module already
imported triton without it, the kernels cannot be interpreted and collection stops with that message. After
collection the variable is restored, and set again only around each kernel test (triton reads it while running
interpreted kernels): other tests and their vLLM subprocesses see the environment they had. On CUDA nothing is
set: the kernels compile for the device, and the same tests and tolerances apply.
Each test module skips itself, with the reason, when triton is not installed.
"""
from __future__ import annotations

import os
import sys

import pytest

from .layout import kernel_device

NATIVE = kernel_device().type == "cuda"
_BEFORE = os.environ.get("TRITON_INTERPRET")
if not NATIVE:
    if "triton" in sys.modules and _BEFORE != "1":
        raise RuntimeError("tests/kernels: triton was imported (by an earlier test module) before "
                           "TRITON_INTERPRET=1 was set, so its kernels cannot run in the interpreter; run pytest with "
                           "TRITON_INTERPRET=1 in the environment or collect tests/kernels first")
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if NATIVE:
        return
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


def pytest_report_header(config):
    where = f"natively on {kernel_device()}" if NATIVE else "in Triton's interpreter (no CUDA device)"
    return f"tests/kernels: kernels run {where}"


@pytest.fixture(autouse=True)
def _interpreter_on_one_thread(monkeypatch):
    """Without CUDA: TRITON_INTERPRET=1 while the test runs, on one thread (the machine is shared)."""
    if NATIVE:
        yield
        return
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
