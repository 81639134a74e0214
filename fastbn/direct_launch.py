"""Direct launches: a plan's later launches go straight to the compiled kernel's launcher.

Triton's ``kernel[grid](*args)`` (``JITFunction.run``) binds every argument, specialises
each one, builds a cache key and looks the compiled kernel up on every call: 5-25 µs of
host time per launch, more than a small BatchNorm's kernels take on a GPU. A launch plan
(``fastbn.launch.KernelLaunch``) already fixes almost everything that key depends on (the
integers, the constexprs, num_warps), so, as torch Inductor does, fastbn launches a plan's
first call of a specialisation the ordinary way, keeps the ``CompiledKernel`` that
``JITFunction.run`` returns, and sends later calls of the same specialisation straight to
its launcher (``CompiledKernel.run``) with the arguments ``JITFunction.run`` passes it.

What the plan does not fix is checked on every call, and a change takes the ordinary path
(which then remembers that specialisation too): the current device, each tensor's dtype,
16-byte alignment (Triton's pointer specialisation) and None-ness, that the float
arguments are Python floats, and the compilation knobs ``JITFunction.run`` reads per call
(``debug``, ``instrumentation_mode``, on 3.9 ``fpsan_homomorphic_casts``). Device and
stream are taken per call exactly as ``JITFunction.run`` takes them
(``driver.active.get_current_device()``, then its current stream), so
``torch.cuda.device``/``torch.cuda.stream`` blocks and CUDA graph capture see the same
launches as with Triton's own path.

The ordinary path runs instead, always, when:
- direct launches are off: ``FASTBN_DIRECT_LAUNCH=0`` in the environment at import, or
  ``enable(False)``;
- the Triton version is not one whose launch code this was written against (VERSIONS), or
  an internal this relies on is missing;
- the kernels run in Triton's interpreter (``kernel[grid]`` returns no CompiledKernel);
- a launch hook is set (``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``
  holding a hook, or not a HookChain), the kernel has ``pre_run_hooks``, or
  ``knobs.runtime.add_stages_inspection_hook`` is set: Triton then does more per launch,
  and does it.
Two differences remain: with no hook set, Triton builds a ``launch_metadata`` object that
only hooks read, and the direct path passes None (as Inductor does); and Triton's check
that the globals a kernel read have not changed since it was compiled runs on the
ordinary launches only (fastbn's kernels read module constants).

Not yet run on a GPU: the arguments are checked on CPU against ``JITFunction.run``'s, with
a fake CUDA driver and kernels compiled for sm_90 (tests/test_direct_launch.py), on
triton 3.6 and 3.9.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

VERSIONS = ((3, 6), (3, 9))  # triton versions whose JITFunction.run this mirrors

try:
    import triton
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.knobs import HookChain
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError as error:  # pragma: no cover (an older or newer triton)
    _IMPORT_PROBLEM = f"an internal of triton is missing ({error})"
else:
    _IMPORT_PROBLEM = ""


def _version_problem() -> str:
    if _IMPORT_PROBLEM:
        return _IMPORT_PROBLEM
    parts = triton.__version__.split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return f"triton {triton.__version__}: version not understood"
    if version not in VERSIONS:
        return (f"triton {triton.__version__} is not one of the versions direct launches "
                f"were written against ({', '.join(f'{a}.{b}' for a, b in VERSIONS)})")
    for owner, name in ((CompiledKernel, "run"), (CompiledKernel, "launch_metadata"),
                        (knobs.runtime, "launch_enter_hook"), (knobs.runtime, "launch_exit_hook"),
                        (knobs.runtime, "debug"), (knobs.compilation, "instrumentation_mode"),
                        (type(driver), "active")):
        if not hasattr(owner, name):
            owner_name = getattr(owner, "__name__", type(owner).__name__)
            return f"triton {triton.__version__} has no {owner_name}.{name}"
    return ""


PROBLEM = _version_problem()  # why direct launches cannot run ("" when they can)
_enabled = not PROBLEM and os.environ.get("FASTBN_DIRECT_LAUNCH", "1") != "0"


def enable(flag: bool) -> bool:
    """Turn direct launches on or off (off: every launch through ``kernel[grid]``); returns
    the previous setting. On has no effect where PROBLEM says they cannot run."""
    global _enabled
    previous = _enabled
    _enabled = bool(flag) and not PROBLEM
    return previous


def enabled() -> bool:
    return _enabled


def status(kernel: Any) -> str:
    """Which path a launch of ``kernel`` takes here: "direct" (after its first launch of a
    specialisation), or why it takes the ordinary one."""
    if PROBLEM:
        return PROBLEM
    if not _enabled:
        return "off (FASTBN_DIRECT_LAUNCH=0 or enable(False))"
    if not isinstance(kernel, JITFunction):
        return f"ordinary: the kernel is a {type(kernel).__name__} (Triton's interpreter?)"
    return "direct"


@dataclass(frozen=True)
class _Direct:
    """One remembered specialisation of a plan: the compiled kernel's launcher and what
    ``JITFunction.run`` passes it besides the call's own arguments."""

    kernel: Any  # the JITFunction it was compiled from
    run: Any  # CompiledKernel.run: the driver's launcher
    function: Any
    packed_metadata: Any
    grid: tuple[int, int, int]
    tail: tuple  # the bound values after the positional arguments (constexprs, defaults)


def _key(kernel: Any, tensors: tuple, floats: tuple) -> tuple | None:
    """What the call's specialisation depends on beyond its plan, or None when a hook or
    an argument type says: take the ordinary path (also for what is not a JITFunction:
    the interpreter's kernels, the host-cost suite's no-op stand-ins)."""
    if type(kernel) is not JITFunction:
        return None
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (enter is not None and (type(enter) is not HookChain or enter.calls)) or (
        leave is not None and (type(leave) is not HookChain or leave.calls)
    ) or runtime.add_stages_inspection_hook is not None or kernel.pre_run_hooks:
        return None
    for value in floats:
        if type(value) is not float:
            return None
    active = driver.active
    device = active.get_current_device()
    compilation = knobs.compilation
    # (fpsan_homomorphic_casts: read per call by triton 3.9's JITFunction.run, absent in 3.6)
    key = [device, runtime.debug, compilation.instrumentation_mode,
           getattr(compilation, "fpsan_homomorphic_casts", None)]
    for t in tensors:
        key.append(None if t is None else (t.dtype, t.data_ptr() % 16 == 0))
    return tuple(key)


def launch(plan: Any, kernel: Any, tensors: tuple, floats: tuple) -> None:
    """Launch ``plan`` (a fastbn.launch.KernelLaunch) of ``kernel`` on these tensors and
    floats: directly when this specialisation was launched before, else by
    ``kernel[grid](...)``, remembering the compiled kernel it returns."""
    key = _key(kernel, tensors, floats) if _enabled else None
    if key is not None:
        entry = plan.direct.get(key)
        if entry is not None and entry.kernel is kernel:
            active = driver.active
            stream = active.get_current_stream(key[0])
            runtime = knobs.runtime
            entry.run(*entry.grid, stream, entry.function, entry.packed_metadata, None,
                      runtime.launch_enter_hook, runtime.launch_exit_hook, *tensors,
                      *plan.ints, *floats, *entry.tail)
            return
    compiled = kernel[plan.grid](*tensors, *plan.ints, *floats, **plan.constexprs)
    if key is not None and isinstance(compiled, CompiledKernel):
        entry = _remember(kernel, compiled, plan, len(tensors) + len(plan.ints) + len(floats))
        if entry is not None:
            plan.direct[key] = entry


def _remember(kernel: Any, compiled: Any, plan: Any, positional: int) -> _Direct | None:
    """The direct launch of ``compiled`` for ``plan``'s calls, or None when the compiled
    kernel is not what this module understands."""
    if getattr(compiled.src, "fn", None) is not kernel or compiled.function is None:
        return None
    parameters = kernel.signature.parameters
    names = list(parameters)
    keywords = {name: value for name, value in plan.constexprs.items() if name in parameters}
    if any(names.index(name) < positional for name in keywords) or len(names) < positional:
        return None
    tail = []
    for name in names[positional:]:
        if name in keywords:
            tail.append(keywords[name])
        elif parameters[name].default is not parameters[name].empty:
            tail.append(parameters[name].default)
        else:
            return None  # an argument the plan does not give: Triton would refuse the call
    grid = plan.grid
    return _Direct(kernel, compiled.run, compiled.function, compiled.packed_metadata,
                   (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1),
                   tuple(tail))
