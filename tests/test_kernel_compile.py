"""Every kernel specialisation the launchers can request compiles to cubin for sm_90 and
sm_80, without register spills, with vectorised loads in the kernels that stream tensors.

This catches what Triton's interpreter forgives (non-constexpr globals, unsupported
operations, type errors in branches the interpreter never specialises, max/min that drop
NaN: the interpreter's numpy keeps it). It runs
tests/kernel_specializations.py in subprocesses without TRITON_INTERPRET, split in two
shards that compile side by side; ``-m slow`` compiles the full cartesian product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("kernel_specializations.py")
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
PROGRAMS_PER_SM = 2
# Kernels that write whole tensors through row windows (VECTOR): their stores vectorise too.
WINDOW_STORING_KERNELS = {"normalize_kernel", "slice_backward_kernel", "slice_forward_kernel"}


def compile_specializations(*options: str, shards: int = 2) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *options, "--shard", f"{k}/{shards}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for k in range(shards)
    ]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=1200)
        assert process.returncode == 0, f"compilation failed:\n{err[-4000:]}"
        reports += [json.loads(line) for line in out.splitlines() if line.strip()]
    return reports


def check(reports: list[dict]) -> None:
    assert reports, "no kernel was compiled"
    kernels = {(r["kernel"], r["arch"]) for r in reports}
    for name in ("partial_stats_kernel", "normalize_kernel", "partial_grad_sums_kernel",
                 "grad_input_kernel", "slice_backward_kernel", "slice_forward_kernel"):
        assert (name, 90) in kernels and (name, 80) in kernels, name
    spilling = [r for r in reports if r["spill_bytes"]]
    assert not spilling, f"register spills: {spilling}"
    scalar = [(r["kernel"], r["arch"], r["constexprs"], r["global_loads"]) for r in reports
              if r["streaming"] and r["aligned"] and not r["vector_loads"]]
    assert not scalar, f"streaming kernels without vector loads: {scalar}"
    # Row windows (VECTOR): 16-byte loads, and 16-byte stores where the kernel writes tensors.
    narrow = [(r["kernel"], r["arch"], r["constexprs"], r["global_loads"], r["global_stores"])
              for r in reports if r["vector"] and r["aligned"]
              and not (r["full_width_loads"] and (r["full_width_stores"]
                                                  or r["kernel"] not in WINDOW_STORING_KERNELS))]
    assert not narrow, f"row windows without 16-byte loads and stores: {narrow}"
    # Registers: two programs of each streaming kernel fit in an SM's register file.
    heavy = [(r["kernel"], r["arch"], r["registers"], r["num_warps"], r["constexprs"])
             for r in reports if r["streaming"]
             and PROGRAMS_PER_SM * r["registers"] * 32 * r["num_warps"] > REGISTER_FILE]
    assert not heavy, f"fewer than {PROGRAMS_PER_SM} programs per SM: {heavy}"
    # NaN must propagate: PTX max/min without .NaN drop it (see kernels/forward.py).
    dropping = [(r["kernel"], r["arch"]) for r in reports if r["nan_dropping_minmax"]]
    assert not dropping, f"max/min that drop NaN: {dropping}"


def test_every_specialization_compiles_for_sm90_and_sm80():
    """The flag matrix at 64x8x8, and every kind of launch the bench's resnet50, bn1d and
    video suites make in bf16 (their fp16 compiles alike; fp32 is in the flag matrix and
    in the slow test), among them 14x14 rows made known (ROW = 196: 8-byte vectors) in
    the statistics, the mask-writing normalize, both backward sums, the one-launch
    backward and the one-launch forward, the statistics' runs of rows (RUN: 16-byte
    vectors at 7x7), and the row windows (VECTOR: 16-byte vectors at contiguous 7x7 and
    14x14) of the mask-writing normalize, the backward sums and the one-launch kernels."""
    reports = compile_specializations("--suite-dtypes", "bf16")
    check(reports)
    rows = {r["kernel"] for r in reports if r["row"] == 196 and r["vector_loads"]}
    assert rows >= {"partial_stats_kernel", "normalize_kernel", "partial_grad_sums_kernel",
                    "slice_backward_kernel", "slice_forward_kernel"}, rows
    # 7x7 statistics: rows of 49 align to nothing, their runs of 32 rows to 16 bytes.
    runs = [r for r in reports if r["run"] and r["aligned"]]
    assert runs and all(r["vector_loads"] for r in runs), runs
    # Contiguous 7x7 and 14x14 elsewhere: row windows (16-byte vectors; check() checks the
    # widths), with and without the activation bits, in every kernel that takes them.
    windows = {(r["kernel"], r["act_bits"]) for r in reports if r["vector"] and r["aligned"]}
    assert windows >= {("normalize_kernel", True), ("partial_grad_sums_kernel", True),
                       ("partial_grad_sums_kernel", False), ("slice_backward_kernel", True),
                       ("slice_backward_kernel", False), ("slice_forward_kernel", True),
                       ("slice_forward_kernel", False)}, windows


@pytest.mark.slow
def test_full_cartesian_product_compiles():
    """The cartesian product of the flags, and the suites in every dtype."""
    check(compile_specializations("--full"))
