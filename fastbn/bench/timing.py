"""Timers (CUDA events with the L2 cache flushed, or the CPU clock) and the copy bandwidth."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20  # written before each timed CUDA call: more than any GPU's L2
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}  # the copy-bandwidth buffer: 1 GiB, 256 MiB on CPU


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20% and 80% quantiles over ``reps`` calls."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int


def summarize(times_ms: list[float]) -> Timing:
    """The median and the 20%/80% quantiles (linear interpolation) of per-call times."""
    q20, median, q80 = torch.tensor(times_ms, dtype=torch.float64).quantile(
        torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    ).tolist()
    return Timing(median, q20, q80, len(times_ms))


def time_cuda(step: Callable[[], object], warmup: int, reps: int) -> Timing:
    """GPU time per call of ``step``: a pair of CUDA events around each call, L2 flushed before.

    The events sit on the current stream, so a call's time includes any wait of the GPU for
    the host to issue its kernels, as in an eager training step.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)])


def time_eager_cuda(step: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls of ``step`` with one
    synchronisation at the end and no flush: the eager regime, where a short kernel's time
    is the host's time to issue it (compare with ``time_cuda``'s kernel time)."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def time_cpu(step: Callable[[], object], warmup: int, reps: int) -> Timing:
    """Wall-clock time per call of ``step`` by time.perf_counter (caches not flushed)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def time_interleaved(
    steps: dict[str, Callable[[], object]], warmup: int, reps: int
) -> dict[str, Timing]:
    """``time_cpu`` of several steps at once, their calls interleaved: ``warmup`` untimed
    calls of each, then ``reps`` rounds of one timed call of each in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: summarize(values) for name, values in times.items()}


def timer(device: torch.device) -> Callable[[Callable[[], object], int, int], Timing]:
    """The timer for ``device``: CUDA events on a GPU, the CPU clock elsewhere."""
    return time_cuda if device.type == "cuda" else time_cpu


def copy_bandwidth(device: torch.device, warmup: int = 3, reps: int = 10) -> tuple[float, int]:
    """Measured GB/s of ``dst.copy_(src)`` on ``device`` (2 x bytes / median time), and the bytes.

    The buffer (COPY_BYTES) is far larger than any cache, so this is the memory's practical
    limit for a kernel that reads one tensor and writes another.
    """
    size = COPY_BYTES[device.type]
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = timer(device)(lambda: dst.copy_(src), warmup, reps)
    return 2 * size / (timing.median_ms * 1e-3) / 1e9, size
