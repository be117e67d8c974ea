"""Kernel tests run Triton's interpreter on the CPU.

``triton.jit`` binds every kernel (triton's own library functions included) to the interpreter when its module is
imported with TRITON_INTERPRET=1, so this sets it before the test modules import triton; if an earlier test module
already imported triton without it, the kernels cannot be interpreted and collection stops with that message.
After collection the variable is restored, and set again only around each kernel test (triton reads it while
running interpreted kernels): other tests and their vLLM subprocesses see the environment they had.
Each test module skips itself, with the reason, when triton is not installed.
"""
from __future__ import annotations

import os
import sys

import pytest

_BEFORE = os.environ.get("TRITON_INTERPRET")
if "triton" in sys.modules and _BEFORE != "1":
    raise RuntimeError("tests/kernels: triton was imported (by an earlier test module) before TRITON_INTERPRET=1 "
                       "was set, so its kernels cannot run in the interpreter; run pytest with TRITON_INTERPRET=1 "
                       "in the environment or collect tests/kernels first")
os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


@pytest.fixture(autouse=True)
def _interpreter_on_one_thread(monkeypatch):
    """TRITON_INTERPRET=1 while the test runs; one thread (the machine is shared)."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
