"""Test set-up shared by every file: device, backends, the Triton interpreter on CPU.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 before triton is first imported (torch._dynamo imports it), so it is
set here, before any test module loads.
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton_compat import patch_interpreter_index

    patch_interpreter_index()

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _triton_problem() -> str:
    from fastbn.backend import triton_problem

    return triton_problem()


@pytest.fixture
def device() -> torch.device:
    """Where the tests run: CUDA when present, else the CPU."""
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Each backend in turn, inside fastbn.use_backend; triton is skipped when it cannot run."""
    import fastbn

    if request.param == "triton" and _triton_problem():
        pytest.skip(_triton_problem())
    with fastbn.use_backend(request.param):
        yield request.param
