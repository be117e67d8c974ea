"""Kernel tests run Triton's interpreter on the CPU: TRITON_INTERPRET is set here, before any test module imports
triton (kernels are bound to the interpreter when their module is imported). Each test module skips itself, with
the reason, when triton is not installed."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: the interpreter's numpy and torch work stay on one core."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
