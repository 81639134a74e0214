"""The benchmark loop: for each point, provider and mode, check against the truth, then time."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastbn.bench.modes import make_step
from fastbn.bench.problem import (
    TOLERANCE,
    TORCH_DTYPES,
    Inputs,
    Truth,
    make_inputs,
    relative_error,
    truth,
)
from fastbn.bench.providers import Provider
from fastbn.bench.shapes import Point
from fastbn.bench.timing import Timing, time_interleaved
from fastbn.bench.traffic import compulsory_bytes

Timer = Callable[[Callable[[], object], int, int], Timing]
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Settings:
    """How to measure: the device, its timer, calls per measurement, the copy bandwidth,
    and the eager timer (CUDA: ``reps`` back-to-back calls, one synchronisation, no flush;
    None: no eager time)."""

    device: torch.device
    time_step: Timer
    warmup: int
    reps: int
    copy_gbps: float
    time_eager: Callable[[Callable[[], object], int], float] | None = None


@dataclass
class Row:
    """One (point, mode, provider) result: the long format of the report and the JSON file.

    ``fusion`` is what follows the BatchNorm (shapes.FUSIONS). status: "ok" (checked, then
    timed), "wrong" (outside the tolerance of the float64 truth: not timed) or "error"
    (raised: not timed; ``message`` says what). ``error`` is the relative error against the
    truth; ``fastbn_speedup`` is this row's time over fastbn's on the same point, mode and
    thread count (on baseline rows where both are "ok"); ``threads`` is
    torch.get_num_threads() while the row ran. ``eager_ms`` (CUDA): ms per call of
    back-to-back calls with one synchronisation and no flush; above ``median_ms`` the
    call is host-bound.
    """

    shape: tuple[int, ...]
    dtype: str
    layout: str
    fusion: str
    mode: str
    provider: str
    status: str
    bytes: int
    error: float | None = None
    message: str = ""
    median_ms: float | None = None
    q20_ms: float | None = None
    q80_ms: float | None = None
    reps: int = 0
    gbps: float | None = None
    pct_copy: float | None = None
    fastbn_speedup: float | None = None
    threads: int | None = None
    eager_ms: float | None = None


def describe(exc: Exception) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def failed(point: Point, mode: str, provider: str, message: str) -> Row:
    """The row of a measurement that could not be made."""
    numel, element_size = math.prod(point.shape), TORCH_DTYPES[point.dtype].itemsize
    return Row(
        point.shape, point.dtype, point.layout, point.fusion, mode, provider, "error",
        compulsory_bytes(mode, point.fusion, numel, element_size), message=message,
        threads=torch.get_num_threads(),
    )


def check(
    provider: Provider, mode: str, point: Point, inputs: Inputs, expected: Truth,
) -> tuple[Row, Callable[[], object] | None]:
    """Run ``mode`` once through ``provider`` and check it: the row so far, and the step to
    time when it is right (None when it is wrong or raised; the row says why)."""
    row = failed(point, mode, provider.name, "")
    try:
        step = make_step(mode, provider.bind, inputs)
        outputs = step()
        error = relative_error(outputs, expected.values_for(outputs))
        del outputs
    except Exception as exc:  # a provider that fails is reported, and the run goes on
        row.message = describe(exc)
        return row, None
    row.error = error if math.isfinite(error) else None
    if not error <= TOLERANCE[point.dtype]:
        row.status = "wrong"
        row.message = (
            f"relative error {error:.3g} against the float64 truth exceeds "
            f"{TOLERANCE[point.dtype]:g}"
        )
        return row, None
    return row, step


def record(row: Row, timing: Timing, settings: Settings) -> Row:
    """A checked row with its timing."""
    row.status = "ok"
    row.median_ms, row.q20_ms, row.q80_ms = timing.median_ms, timing.q20_ms, timing.q80_ms
    row.reps = timing.reps
    row.gbps = row.bytes / (timing.median_ms * 1e-3) / 1e9
    row.pct_copy = 100 * row.gbps / settings.copy_gbps
    return row


def measure(
    provider: Provider, mode: str, point: Point, inputs: Inputs, expected: Truth,
    settings: Settings,
) -> Row:
    """Run ``mode`` once through ``provider`` and check it; time it only if it is right."""
    row, step = check(provider, mode, point, inputs, expected)
    if step is None:
        return row
    try:
        timing = settings.time_step(step, settings.warmup, settings.reps)
        eager = (None if settings.time_eager is None
                 else settings.time_eager(step, settings.reps))
    except Exception as exc:
        row.message = describe(exc)
        return row
    row.eager_ms = eager
    return record(row, timing, settings)


def measure_interleaved(
    providers: list[Provider], mode: str, point: Point, inputs: Inputs, expected: Truth,
    settings: Settings,
) -> dict[str, Row]:
    """``measure`` for every provider on one mode, the timed calls interleaved (one call of
    each provider in turn, ``settings.reps`` rounds): on a CPU shared with other work, load
    that comes and goes then slows every provider alike, and the speedups stay fair."""
    rows, steps = {}, {}
    for provider in providers:
        rows[provider.name], step = check(provider, mode, point, inputs, expected)
        if step is not None:
            steps[provider.name] = step
    try:
        timings = time_interleaved(steps, settings.warmup, settings.reps)
    except Exception as exc:
        for name in steps:
            rows[name].message = describe(exc)
        return rows
    for name, timing in timings.items():
        record(rows[name], timing, settings)
        if settings.time_eager is not None:
            rows[name].eager_ms = settings.time_eager(steps[name], settings.reps)
    return rows


def add_speedups(rows: list[Row]) -> None:
    """Set ``fastbn_speedup`` = time / fastbn's time on each checked baseline row."""
    fastbn_ms = {
        (r.shape, r.dtype, r.layout, r.fusion, r.mode, r.threads): r.median_ms
        for r in rows
        if r.provider == "fastbn" and r.status == "ok"
    }
    for row in rows:
        reference_ms = fastbn_ms.get(
            (row.shape, row.dtype, row.layout, row.fusion, row.mode, row.threads)
        )
        if row.provider != "fastbn" and row.status == "ok" and reference_ms:
            row.fastbn_speedup = row.median_ms / reference_ms


def running(point: Point, providers: list[Provider]) -> list[Provider]:
    """The providers that run ``point``'s fusion."""
    return [provider for provider in providers if point.fusion in provider.fusions]


def run_point(
    point: Point, modes: tuple[str, ...], providers: list[Provider], settings: Settings,
    progress: Callable[[str], None],
) -> list[Row]:
    """The rows of one point: its inputs and truth are made once, shared by every provider.

    A failure becomes "error" rows: while preparing the inputs (out of memory, say), for
    all the point's rows; in a provider's set-up for the point, for that provider's rows.
    """
    try:
        inputs = make_inputs(point, settings.device)
        expected = truth(inputs, modes)
    except Exception as exc:
        message = f"preparing the inputs failed: {describe(exc)}"
        return [failed(point, mode, p.name, message) for p in providers for mode in modes]
    if settings.device.type == "cpu":
        return run_point_interleaved(point, modes, providers, settings, progress, inputs,
                                     expected)
    rows = []
    for provider in providers:
        failure = ""
        try:
            provider.start_point()
        except Exception as exc:
            failure = f"setting up {provider.name} failed: {describe(exc)}"
        for mode in modes:
            progress(
                f"{point.label} {point.dtype} {point.layout} {point.fusion} {mode} {provider.name}"
            )
            rows.append(
                failed(point, mode, provider.name, failure)
                if failure
                else measure(provider, mode, point, inputs, expected, settings)
            )
    return rows


def run_point_interleaved(
    point: Point, modes: tuple[str, ...], providers: list[Provider], settings: Settings,
    progress: Callable[[str], None], inputs: Inputs, expected: Truth,
) -> list[Row]:
    """``run_point`` on a CPU: per mode, every provider checked, then timed interleaved
    (``measure_interleaved``). The rows come in the same order (provider, then mode)."""
    ready, rows = [], {}
    for provider in providers:
        try:
            provider.start_point()
            ready.append(provider)
        except Exception as exc:
            for mode in modes:
                rows[provider.name, mode] = failed(
                    point, mode, provider.name, f"setting up {provider.name} failed: "
                    f"{describe(exc)}"
                )
    for mode in modes:
        for provider in providers:
            progress(
                f"{point.label} {point.dtype} {point.layout} {point.fusion} {mode} {provider.name}"
            )
        measured = measure_interleaved(ready, mode, point, inputs, expected, settings)
        rows.update({(name, mode): row for name, row in measured.items()})
    return [rows[provider.name, mode] for provider in providers for mode in modes]


def run(
    points: list[Point],
    modes: tuple[str, ...],
    providers: list[Provider],
    settings: Settings,
    progress: ProgressCallback = lambda done, total, label: None,
) -> list[Row]:
    """Every (point, provider, mode) as a Row, in that nesting order, speedups filled in;
    none for a provider that does not run the point's fusion."""
    rows: list[Row] = []
    total = sum(len(running(point, providers)) for point in points) * len(modes)
    done = 0

    def advance(label: str) -> None:
        nonlocal done
        progress(done, total, label)
        done += 1

    for point in points:
        runners = running(point, providers)
        if runners:
            rows += run_point(point, modes, runners, settings, advance)
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    progress(total, total, "done")
    add_speedups(rows)
    return rows
