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
from contextlib import contextmanager, suppress

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
# How many use_backend blocks are open, in all threads together: while none is, no thread
# has a choice, and current_backend skips the thread-local read (an eager call's every
# attribute read costs, after a large kernel has evicted the interpreter's data from the
# caches). Changed under the lock: use_backend is rare, the read is not.
_open_choices = 0
_open_choices_lock = threading.Lock()
# FASTBN_BACKEND as last read (raw, as _raw_environment gives it; _UNREAD before the first
# read) and the name it gives: the environment is read again only in eager code, and only
# re-parsed when its text changed; traced code reads the cache.
_UNREAD = object()
_environment: tuple[object, str] = (_UNREAD, "auto")
_triton_problem: str | None = None  # why the kernels cannot run, once known ("" = they can)

# CPython's os.environ keeps the environment, encoded, in a dict (os._Environ._data, every
# change through os.environ or monkeypatch going there too): one dict lookup reads
# FASTBN_BACKEND, where os.environ.get runs three Python functions and, for an unset
# variable (the common case), raises and catches a KeyError on every call.
_ENVIRON = os.environ
_ENVIRON_DATA = getattr(_ENVIRON, "_data", None)
_ENVIRON_KEY = _ENVIRON.encodekey("FASTBN_BACKEND") if hasattr(_ENVIRON, "encodekey") else None


def _raw_environment() -> object:
    """FASTBN_BACKEND as stored (None when unset): compared with the last read to see a
    change, not parsed. The plain os.environ.get where os.environ is not the mapping this
    module found at import (replaced) or is not CPython's."""
    if os.environ is _ENVIRON and isinstance(_ENVIRON_DATA, dict):
        return _ENVIRON_DATA.get(_ENVIRON_KEY)
    return os.environ.get("FASTBN_BACKEND")


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastbn backend {name!r} from {source}; expected one of {BACKENDS}"
        )
    return name


def current_backend(compiling: bool | None = None) -> str:
    """The backend name in force in this thread: the innermost ``use_backend``, else
    FASTBN_BACKEND, else auto. ``compiling``: whether torch.compile is tracing, where the
    caller already asked (None: asked here)."""
    if _open_choices:
        chosen = _thread.chosen
        if chosen is not None:
            return chosen
    return environment_default(compiling)


def environment_default(compiling: bool | None = None) -> str:
    """The backend FASTBN_BACKEND names ("auto" when unset or empty).

    Under torch.compile tracing this is the value cached by the last eager read (the first
    is at import: ``_read_environment_at_import``), so tracing neither reads the environment
    nor bakes a read of it into the graph. ``compiling``: as current_backend's.
    """
    global _environment
    cached, name = _environment
    if cached is not _UNREAD and (
        torch.compiler.is_compiling() if compiling is None else compiling
    ):
        return name
    raw = _raw_environment()
    if cached is _UNREAD or raw != cached:  # (`is` first: dynamo cannot compare an object())
        text = os.environ.get("FASTBN_BACKEND", "")
        name = _check_name(text, "FASTBN_BACKEND") if text else "auto"
        _environment = (raw, name)
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run this thread's calls inside the ``with`` block on backend ``name`` ("auto",
    "triton", "torch"); other threads keep their own choice."""
    global _open_choices
    _check_name(name, "use_backend()")
    previous = _thread.chosen
    with _open_choices_lock:
        _open_choices += 1
    _thread.chosen = name
    try:
        yield
    finally:
        _thread.chosen = previous
        with _open_choices_lock:
            _open_choices -= 1


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


def recorded_backend(resolved: str, compiling: bool) -> str:
    """The backend name a traced call records in its ops, for ``resolved`` (resolve_backend's
    answer while tracing): "auto" in a program made by torch.export or torch.jit.trace, which
    may run on another device or machine than the one it was made on (each op then picks its
    implementation when it runs, by ``backend_at_run_time``, as an eager call would), the
    resolved name in torch.compile's graphs (made and run in one process, guarded on the
    choice, and recompiled for another device). ``compiling``: whether torch.compile (or
    export) is tracing, which never runs under torch.jit.trace (and cannot ask it)."""
    if torch.compiler.is_exporting() or (not compiling and torch._C._is_tracing()):
        return "auto"
    return resolved


def backend_at_run_time(name: str, x: torch.Tensor) -> str:
    """The implementation ("triton" or "torch") for an op's ``backend`` argument ``name`` on
    x: a resolved name as it is, "auto" (``recorded_backend``'s) resolved for x now."""
    return resolve_backend(x, False) if name == "auto" else name


def resolve_backend(x: torch.Tensor, compiling: bool | None = None) -> str:
    """The implementation ("triton" or "torch") that runs a call on tensor x.
    ``compiling``: as current_backend's."""
    name = current_backend(compiling)
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


def _read_environment_at_import() -> None:
    """Read FASTBN_BACKEND once now, so that a call traced by torch.compile before any eager
    call (torch.compile(model, fullgraph=True) as a process's first fastbn call) finds it
    cached instead of tracing the read, which dynamo cannot (it graph-breaks on the
    comparison with the unread marker). An invalid value is left for the first call to
    raise, naming it."""
    with suppress(ValueError):
        environment_default(compiling=False)


_read_environment_at_import()
