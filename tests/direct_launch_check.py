"""fastbn's direct launches against Triton's own ``JITFunction.run``, without a GPU.

    python tests/direct_launch_check.py      (without TRITON_INTERPRET; prints one JSON object)

A fake CUDA driver (``triton.runtime.driver.set_active``) answers for device 0 of an sm_90
GPU: the kernels compile for real (PTX and cubin, as tests/test_kernel_compile.py does),
and the driver's launcher records what it is called with instead of launching. Launches
are planned on CPU tensors by the real fastbn launchers (``launch.recording()``), then
each plan is launched with direct launches off (Triton's ``JITFunction.run`` all the way)
and on (the first call through Triton, the second direct), and both calls' launcher
arguments are reported, with how many times ``JITFunction.run`` ran. The test compares them.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

STREAM = 0x5EED  # the fake current stream


class FakeUtils:
    """driver.active.utils: loading a binary gives fake handles."""

    def load_binary(self, name, kernel, shared, device):
        return f"module:{name}", f"function:{name}", 32, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}


CALLS: list[tuple] = []  # every launcher call, in order


class FakeLauncher:
    """driver.active.launcher_cls: records its call (and calls the enter hook, as the C
    launcher does) instead of launching."""

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        CALLS.append((self, args))
        launch_metadata, enter = args[6], args[7]
        if enter is not None:
            enter(launch_metadata)


class FakeDriver:
    def __init__(self):
        self.utils = FakeUtils()
        self.launcher_cls = FakeLauncher
        self.device = 0

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

    def get_current_stream(self, device):
        return STREAM + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_capability(self, device):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def plans():
    """(name, KernelLaunch, tensors, floats) of a training forward and backward, then the
    normalize plan again with x 4 bytes past a 16-byte boundary (the same plan, another
    specialisation: it must not take the aligned call's direct launch)."""
    from fastbn import launch
    from fastbn.conventions import BackwardInputs

    x = torch.randn(4, 8, 5, 5)
    w, b = torch.randn(8), torch.randn(8)
    rm, rv, nbt = torch.zeros(8), torch.ones(8), torch.zeros((), dtype=torch.int64)
    with launch.recording() as records:
        mean, var = launch.batch_stats_(x, rm, rv, nbt, 0.1)
        launch.normalize(x, mean, var, w, b, None, 1e-5, "relu", 0.01, False)
        launch.normalize_backward(
            BackwardInputs(torch.randn_like(x), x, mean, var, w, b, None, None, 1e-5, "relu", 0.01),
            True, [True, True, True, False])
        launch.batch_norm_train_(x, rm, rv, nbt, None, w, b, None, 1e-5, "relu", 0.01,
                                 False)  # the slice fits one program: the one-launch forward
        # A slice too large for one program: the backward's sums, then d input.
        large = torch.randn(4, 8, 48, 48)
        launch.normalize_backward(
            BackwardInputs(torch.randn_like(large), large, mean, var, w, b, None, None, 1e-5,
                           "relu", 0.01),
            True, [True, True, True, False])
    names = ("stats", "normalize", "backward_one_launch", "train_forward_one_launch",
             "backward_sums", "backward_grad_input")
    cases = [(name, *record) for name, record in zip(names, records, strict=True)]
    _, plan, tensors, floats = cases[1]
    misaligned = torch.randn(x.numel() + 1)[1:].view(x.shape)
    return [*cases, ("misaligned", plan, (misaligned, *tensors[1:]), floats)]


def describe(args) -> list:
    """A launcher call's arguments as JSON: tensors by identity (data pointer, dtype)."""
    out = []
    for value in args:
        if isinstance(value, torch.Tensor):
            out.append(["tensor", value.data_ptr(), str(value.dtype)])
        elif value is None or isinstance(value, (bool, int, float, str)):
            out.append(value)
        else:
            out.append(["object", type(value).__name__, id(value)])
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles real GPU code")
    driver.set_active(FakeDriver())
    from triton import knobs

    from fastbn import direct_launch, launch

    runs = {"count": 0}

    def counted(kernel):
        original = kernel.run

        def run(*args, **kwargs):
            runs["count"] += 1
            return original(*args, **kwargs)

        kernel.run = run

    for module in launch.KERNEL_MODULES.values():
        for name in ("partial_stats_kernel", "normalize_kernel", "slice_backward_kernel",
                     "slice_forward_kernel", "partial_grad_sums_kernel", "grad_input_kernel"):
            if hasattr(module, name):
                counted(getattr(module, name))

    report = {"status": direct_launch.status(launch.KERNEL_MODULES["forward"].normalize_kernel),
              "cases": {}}

    def launches(plan, tensors, floats, calls):
        """The launcher calls and JITFunction.run count of ``calls`` launches of the plan."""
        CALLS.clear()
        runs["count"] = 0
        for _ in range(calls):
            plan(tensors, floats)
        return [{"launcher": id(launcher), "args": describe(args)}
                for launcher, args in CALLS], runs["count"]

    for name, plan, tensors, floats in plans():
        previous = direct_launch.enable(False)
        ordinary, ordinary_runs = launches(plan, tensors, floats, 1)
        direct_launch.enable(previous)
        both, direct_runs = launches(plan, tensors, floats, 2)
        report["cases"][name] = {"ordinary": ordinary, "ordinary_runs": ordinary_runs,
                                 "first_then_direct": both, "runs": direct_runs}

    # A module's second training step: two launches (one forward, one backward: the slice
    # fits one program), all direct.
    import fastbn
    from fastbn import backend

    backend.runs_in_interpreter = lambda: True  # the triton backend takes CPU tensors
    bn = fastbn.BatchNorm2d(8)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    steps = []
    with fastbn.use_backend("triton"):
        for _ in range(2):
            CALLS.clear()
            runs["count"] = 0
            torch.autograd.grad(bn(x), [x, bn.weight, bn.bias], torch.randn_like(x))
            steps.append({"launches": len(CALLS), "runs": runs["count"]})
    report["module_steps"] = steps

    # With a launch hook set, every launch goes through Triton, which calls it.
    name, plan, tensors, floats = plans()[1]
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        calls, hooked_runs = launches(plan, tensors, floats, 2)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    report["hooked"] = {"runs": hooked_runs, "hook_calls": len(seen)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
