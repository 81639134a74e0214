"""Which implementation runs a call: the one place where the backend is chosen.

- ``"auto"``   (default): the Triton kernels for CUDA tensors when Triton works, else the
  PyTorch implementation;
- ``"triton"``: always the kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before
  triton is imported (the kernels then run in Triton's interpreter);
- ``"torch"``:  always the PyTorch implementation (``fastbn.reference``).

The default comes from the ``FASTBN_BACKEND`` environment variable; ``use_backend`` changes
it for a block of code.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "torch")

_chosen: str | None = None  # set by use_backend; None means "read FASTBN_BACKEND"
_triton_problem: str | None = None  # why the kernels cannot run, once known ("" = they can)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastbn backend {name!r} from {source}; expected one of {BACKENDS}"
        )
    return name


def current_backend() -> str:
    """The backend name in force: the innermost ``use_backend``, else FASTBN_BACKEND, else auto."""
    if _chosen is not None:
        return _chosen
    return _check_name(os.environ.get("FASTBN_BACKEND", "auto"), "FASTBN_BACKEND")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the calls inside the ``with`` block on backend ``name`` ("auto", "triton", "torch")."""
    global _chosen
    _check_name(name, "use_backend()")
    previous = _chosen
    _chosen = name
    try:
        yield
    finally:
        _chosen = previous


def triton_problem() -> str:
    """Why the Triton kernels cannot run here ("" when they can); probed once."""
    global _triton_problem
    if _triton_problem is None:
        try:
            importlib.import_module("fastbn.launch")
            _triton_problem = ""
        except ImportError as error:
            _triton_problem = f"the Triton kernels cannot be imported ({error})"
    return _triton_problem


def runs_in_interpreter() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from fastbn import launch

    return launch.interpreted()


def resolve_backend(x: torch.Tensor) -> str:
    """The implementation ("triton" or "torch") that runs a call on tensor x."""
    name = current_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if x.is_cuda and not triton_problem() else "torch"
    problem = triton_problem()
    if problem:
        raise RuntimeError(f"fastbn backend 'triton' was requested, but {problem}")
    if not x.is_cuda and not runs_in_interpreter():
        raise RuntimeError(
            f"fastbn backend 'triton' got a {x.device.type} tensor: the kernels run on CUDA "
            "tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
        )
    return "triton"
