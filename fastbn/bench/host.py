"""``python -m fastbn.bench --suite host``: what one fastbn call costs the host, against
torch's own BatchNorm on the same small tensor, as ratios.

Cases: module training forward, eval forward, training forward + backward
(torch.autograd.grad of x, weight and bias), and the fused forms relu(BN(x)) and
relu(BN(x) + z) (torch: BatchNorm2d then F.relu, or + z then F.relu).

Without CUDA, fastbn's Triton path runs on CPU tensors with only the final kernel launch
(``kernel[grid](...)``: Triton's argument binding, cache key and launcher) replaced by a
no-op, so its time is the host work around the launches; torch's CPU call includes its CPU
kernel (on one thread). fastbn's backend check is told the CPU tensors are fine: no
interpreter is involved, since no kernel runs (nor fastbn.direct_launch, which needs a
compiled kernel: the CPU numbers are those of the ordinary launch path minus Triton's
own cost). With CUDA both run for real: ``calls`` back-to-back calls of the shape, one
synchronisation, time per call (the host-bound regime itself), and fastbn once more with
direct launches off (``fastbn_ordinary_us``: every launch through Triton's
JITFunction.run).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fastbn
from fastbn import backend, direct_launch

# (shape, dtype): tiny layers, and on a GPU ResNet-50's last layer at batch 32 in bf16.
HOST_POINTS = (((2, 2048, 1, 1), torch.float32), ((4, 64, 8, 8), torch.float32),
               ((32, 2048, 7, 7), torch.bfloat16))
CPU_POINTS = HOST_POINTS[:2]  # the large one only where kernels run on a GPU
CASES = ("train-forward", "eval-forward", "train-forward-backward", "relu-forward",
         "add_relu-forward")
NO_OP_NOTE = (
    "NO CUDA GPU: fastbn runs its Triton path on CPU tensors with only the final kernel "
    "launch (kernel[grid](...)) replaced by a no-op; torch's CPU BatchNorm2d includes its "
    "CPU kernel, on one thread. Host cost only: no statement about GPU time."
)


class _NoOpKernel:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` does nothing (and
    fastbn.direct_launch, which serves JITFunctions only, leaves it alone)."""

    def __getitem__(self, grid):
        return _no_op


def _no_op(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def no_op_launches() -> Iterator[None]:
    """Every fastbn kernel's launch is a no-op inside (the kernels' modules patched), and
    the triton backend takes CPU tensors (its check for the interpreter answers yes)."""
    from fastbn.kernels import backward, forward  # here: importing them needs triton

    patched = [(backend, "runs_in_interpreter", backend.runs_in_interpreter)]
    backend.runs_in_interpreter = lambda: True
    for module in (forward, backward):
        for name in dir(module):
            if name.endswith("_kernel"):
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, _NoOpKernel())
    try:
        yield
    finally:
        for module, name, kernel in patched:
            setattr(module, name, kernel)


def _calls(case: str, provider: str, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device):
    """A function making one call of ``case``, and what it needs, for a provider."""
    channels = shape[1]
    x = torch.randn(shape, device=device).to(dtype)
    z = torch.randn(shape, device=device).to(dtype)
    if provider == "fastbn":
        activation = "relu" if case.startswith(("relu", "add_relu")) else None
        bn = fastbn.BatchNorm2d(channels, activation=activation).to(device)
    else:
        bn = torch.nn.BatchNorm2d(channels).to(device)
    bn.train(case != "eval-forward")
    leaf = x.clone().requires_grad_(case == "train-forward-backward")
    grad = torch.randn_like(x)

    def forward():
        if provider == "fastbn":
            return bn(leaf, residual=z) if case == "add_relu-forward" else bn(leaf)
        y = bn(leaf)
        if case == "add_relu-forward":
            y = y + z
        return F.relu(y) if case.startswith(("relu", "add_relu")) else y

    if case == "eval-forward":
        def call():
            with torch.no_grad():
                forward()
    elif case == "train-forward-backward":
        def call():
            torch.autograd.grad(forward(), [leaf, bn.weight, bn.bias], grad)
    else:
        call = forward
    return call


def times_per_call(calls_by_name: dict, device: torch.device, calls: int,
                   repeats: int) -> dict[str, float]:
    """Median over ``repeats`` samples of the time of ``calls`` back-to-back calls (one
    synchronisation on CUDA), per call, in microseconds, for each (call, setting) by name:
    the samples of the providers interleaved, so a busy neighbour slows them alike. A
    setting is a context manager factory entered around each sample (outside its time)."""
    for call, setting in calls_by_name.values():
        with setting():
            for _ in range(3):
                call()
    samples: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(repeats):
        for name, (call, setting) in calls_by_name.items():
            with setting():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def _direct_launches_off() -> Iterator[None]:
    previous = direct_launch.enable(False)
    try:
        yield
    finally:
        direct_launch.enable(previous)


HOST_CALLS = 200  # back-to-back calls per sample
HOST_REPEATS = 7  # samples; the median is reported


def host_rows(device: torch.device, calls: int | None = None,
              repeats: int | None = None) -> list[dict]:
    """One row per shape and case: fastbn's and torch's microseconds per call, the ratio
    (``calls`` and ``repeats`` default to HOST_CALLS and HOST_REPEATS)."""
    calls = HOST_CALLS if calls is None else calls
    repeats = HOST_REPEATS if repeats is None else repeats
    points = HOST_POINTS if device.type == "cuda" else CPU_POINTS
    if device.type != "cuda":
        # One thread: torch's CPU kernel on a tiny tensor gains nothing from more, and on
        # a shared machine waiting for a pool of them measures the neighbours.
        torch.set_num_threads(1)
    launches = contextlib.nullcontext() if device.type == "cuda" else no_op_launches()
    rows = []
    with launches, fastbn.use_backend("triton"):
        for shape, dtype in points:
            for case in CASES:
                providers = {provider: (_calls(case, provider, shape, dtype, device),
                                        contextlib.nullcontext)
                             for provider in ("fastbn", "torch")}
                if device.type == "cuda":  # the same calls, every launch through Triton's run
                    providers["ordinary"] = (_calls(case, "fastbn", shape, dtype, device),
                                             _direct_launches_off)
                times = times_per_call(providers, device, calls, repeats)
                row = {
                    "shape": list(shape), "case": case, "dtype": str(dtype).split(".")[-1],
                    "fastbn_us": round(times["fastbn"], 2), "torch_us": round(times["torch"], 2),
                    "ratio": round(times["fastbn"] / times["torch"], 3),
                }
                if "ordinary" in times:
                    row["fastbn_ordinary_us"] = round(times["ordinary"], 2)
                    row["ordinary_ratio"] = round(times["ordinary"] / times["torch"], 3)
                rows.append(row)
    return rows


def format_host(rows: list[dict]) -> str:
    """The table; on CUDA with the direct-launches-off column (every launch through
    Triton's JITFunction.run)."""
    ordinary = any("fastbn_ordinary_us" in row for row in rows)
    extra = f" {'no-direct us':>12s} {'no-direct/torch':>15s}" if ordinary else ""
    lines = [f"{'shape':16s} {'dtype':9s} {'case':24s} {'fastbn us':>10s} {'torch us':>10s} "
             f"{'fastbn/torch':>12s}{extra}"]
    for row in rows:
        shape = "x".join(str(v) for v in row["shape"])
        line = (f"{shape:16s} {row['dtype']:9s} {row['case']:24s} {row['fastbn_us']:>10.1f} "
                f"{row['torch_us']:>10.1f} {row['ratio']:>12.2f}")
        if ordinary:
            line += f" {row['fastbn_ordinary_us']:>12.1f} {row['ordinary_ratio']:>15.2f}"
        lines.append(line)
    return "\n".join(lines)
