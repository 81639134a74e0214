"""Direct launches (fastbn.direct_launch): which path runs on this triton, and that the
direct path hands the driver's launcher exactly what Triton's JITFunction.run hands it.

The comparison runs tests/direct_launch_check.py in a subprocess without TRITON_INTERPRET:
real sm_90 compiles behind a fake CUDA driver whose launcher records its calls. CI runs
this file on triton 3.6 and on the newest triton.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

import fastbn
from fastbn import direct_launch

pytestmark = pytest.mark.skipif(
    bool(fastbn.backend.triton_problem()), reason="the Triton kernels cannot run here"
)

SCRIPT = Path(__file__).with_name("direct_launch_check.py")
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
LAUNCH_METADATA = 6  # index of launch_metadata among the launcher's arguments


def _run_script(env: dict) -> dict:
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@functools.cache
def check_report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("FASTBN_DIRECT_LAUNCH", None)
    return _run_script(env)


def test_direct_launches_run_on_triton_3_6_and_3_9():
    """The versions this was written against take the direct path; any other takes the
    ordinary one, saying why."""
    report = check_report()
    if TRITON_VERSION in ((3, 6), (3, 9)):
        assert direct_launch.PROBLEM == ""
        assert report["status"] == "direct"
    else:
        assert direct_launch.PROBLEM and report["status"] == direct_launch.PROBLEM


def test_interpreter_takes_the_ordinary_path():
    from fastbn import launch

    kernel = launch.KERNEL_MODULES["forward"].normalize_kernel
    if launch.interpreted():
        assert direct_launch.status(kernel) != "direct"
    else:
        assert direct_launch.status(kernel) in ("direct", direct_launch.PROBLEM)


@pytest.mark.parametrize("case", ["stats", "normalize", "backward_one_launch",
                                  "train_forward_one_launch", "backward_sums",
                                  "backward_grad_input", "misaligned"])
def test_direct_launch_passes_what_jit_function_run_passes(case):
    """The second launch of a plan goes to the same compiled kernel's launcher with the
    same arguments as Triton's own path (grid, stream, function, metadata, hooks, every
    kernel argument), without JITFunction.run; only the launch_metadata that nothing reads
    without a hook is None instead of Triton's object."""
    if TRITON_VERSION not in direct_launch.VERSIONS:
        pytest.skip(direct_launch.PROBLEM)
    result = check_report()["cases"][case]
    (ordinary,) = result["ordinary"]
    first, second = result["first_then_direct"]
    assert result["ordinary_runs"] == 1 and result["runs"] == 1  # the second call: direct
    assert first["launcher"] == second["launcher"] == ordinary["launcher"]
    assert second["args"][LAUNCH_METADATA] is None
    expected = ordinary["args"][:LAUNCH_METADATA] + ordinary["args"][LAUNCH_METADATA + 1:]
    for call in (first, second):
        assert call["args"][:LAUNCH_METADATA] + call["args"][LAUNCH_METADATA + 1:] == expected


def test_misaligned_pointer_takes_its_own_compiled_kernel():
    """x 4 bytes past a 16-byte boundary under the aligned call's plan: the ordinary path
    first (counted above), and a compiled kernel other than the aligned one's."""
    if TRITON_VERSION not in direct_launch.VERSIONS:
        pytest.skip(direct_launch.PROBLEM)
    cases = check_report()["cases"]
    aligned = cases["normalize"]["ordinary"][0]
    misaligned = cases["misaligned"]["ordinary"][0]
    assert aligned["launcher"] != misaligned["launcher"]


def test_module_training_step_launches_directly_after_the_first():
    if TRITON_VERSION not in direct_launch.VERSIONS:
        pytest.skip(direct_launch.PROBLEM)
    first, second = check_report()["module_steps"]
    assert first["launches"] == second["launches"] == 2  # the slice fits: 1 each way
    assert second["runs"] == 0


def test_launch_hook_sends_every_launch_through_triton():
    hooked = check_report()["hooked"]
    assert hooked == {"runs": 2, "hook_calls": 2}


def test_environment_turns_direct_launches_off():
    code = "from fastbn import direct_launch; print(direct_launch.enabled())"
    env = dict(os.environ, FASTBN_DIRECT_LAUNCH="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_enable_returns_the_previous_setting():
    previous = direct_launch.enable(False)
    try:
        assert not direct_launch.enabled()
        assert direct_launch.status(None).startswith("off") or direct_launch.PROBLEM
        assert direct_launch.enable(True) is False
        assert direct_launch.enabled() == (not direct_launch.PROBLEM)
    finally:
        direct_launch.enable(previous)


def _noop(x_ptr):  # a kernel body for a JITFunction built by hand (never compiled)
    pass


def test_every_knob_jit_function_run_reads_per_call_is_in_the_key(monkeypatch):
    """A knob JITFunction.run passes to its binder changes the compiled kernel, so changing
    it after a direct launch must give another key (the ordinary path), as in Triton."""
    if direct_launch.PROBLEM:
        pytest.skip(direct_launch.PROBLEM)
    from triton import knobs
    from triton.runtime.jit import JITFunction

    class FakeActive:
        def get_current_device(self):
            return 0

    monkeypatch.setattr(direct_launch, "driver", type("FakeDriver", (), {"active": FakeActive()}))
    kernel = JITFunction(_noop)
    read_per_call = ["instrumentation_mode"]
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        read_per_call.append("fpsan_homomorphic_casts")
    for name in read_per_call:
        before = direct_launch._key(kernel, (None,), ())
        with knobs.compilation.scope():
            value = getattr(knobs.compilation, name)
            setattr(knobs.compilation, name, "fpsan" if isinstance(value, str) else not value)
            assert direct_launch._key(kernel, (None,), ()) != before, name
