"""Which implementation runs a call: the one place where the backend is chosen.

- ``"auto"``   (default): the Triton kernels for CUDA tensors when Triton works, else the
  PyTorch implementation;
- ``"triton"``: always the kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before
  triton is imported (the kernels then run in Triton's interpreter);
- ``"torch"``:  always the PyTorch implementation (``fastbn.reference``).

The default comes from the ``FASTBN_BACKEND`` environment variable (unset or empty: "auto");
``use_backend`` changes it for a block of code in the calling thread only, like
``torch.autocast``: each thread keeps its own stack of choices, and a new thread starts from
the default.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "torch")


class _ThreadChoice(threading.local):
    """The calling thread's innermost use_backend name; None means the default. (A
    threading.local, not a ContextVar: torch.compile traces attribute reads of a
    threading.local, guarding on the value, but graph-breaks on ContextVar.get.)"""

    def __init__(self) -> None:
        # Set per thread, not as a class attribute: torch 2.11's dynamo reads a class-level
        # default instead of the thread's value.
        self.chosen: str | None = None


_thread = _ThreadChoice()
# FASTBN_BACKEND as last read, and the name it gives: the environment is read again only
# in eager code, and only re-parsed when its text changed; traced code reads the cache.
_environment: tuple[str | None, str] = (None, "auto")
_triton_problem: str | None = None  # why the kernels cannot run, once known ("" = they can)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastbn backend {name!r} from {source}; expected one of {BACKENDS}"
        )
    return name


def current_backend() -> str:
    """The backend name in force in this thread: the innermost ``use_backend``, else
    FASTBN_BACKEND, else auto."""
    chosen = _thread.chosen
    if chosen is not None:
        return chosen
    return environment_default()


def environment_default() -> str:
    """The backend FASTBN_BACKEND names ("auto" when unset or empty).

    Under torch.compile tracing this is the value cached by the last eager read (or the
    environment read once, at the first call), so tracing neither reads the environment
    nor bakes a read of it into the graph.
    """
    global _environment
    raw, name = _environment
    if torch.compiler.is_compiling() and raw is not None:
        return name
    text = os.environ.get("FASTBN_BACKEND", "")
    if text != raw:
        name = _check_name(text, "FASTBN_BACKEND") if text else "auto"
        _environment = (text, name)
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run this thread's calls inside the ``with`` block on backend ``name`` ("auto",
    "triton", "torch"); other threads keep their own choice."""
    _check_name(name, "use_backend()")
    previous = _thread.chosen
    _thread.chosen = name
    try:
        yield
    finally:
        _thread.chosen = previous


@torch.compiler.assume_constant_result
def triton_problem() -> str:
    """Why the Triton kernels cannot run here ("" when they can); probed once. (torch.compile
    calls it while tracing and keeps the answer: a first call inside a compiled region would
    otherwise ask dynamo to trace an import.)"""
    global _triton_problem
    if _triton_problem is None:
        try:
            importlib.import_module("fastbn.launch")
            _triton_problem = ""
        except ImportError as error:
            _triton_problem = f"the Triton kernels cannot be imported ({error})"
    return _triton_problem


@torch.compiler.assume_constant_result
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
    if not x.is_cuda and not x.is_meta and not runs_in_interpreter():
        raise RuntimeError(
            f"fastbn backend 'triton' got a {x.device.type} tensor: the kernels run on CUDA "
            "tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
        )
    return "triton"
