"""Compile every kernel specialisation fastbn's launchers request, for real GPUs, on any machine.

    python tests/kernel_specializations.py [--full] [--no-suites] [--arch 90 --arch 80]
                                           [--shard K/N]

The launchers in fastbn.launch run on meta tensors (no memory) inside
``launch.recording()``, over a matrix of dtypes x layouts x flags at 64x8x8, and over every
point of the bench's resnet50, bn1d and video suites (training forward, eval forward and
backward, with the suite's fusion). Each recorded launch is specialised exactly as
Triton's JIT would specialise it on a GPU (value-1 integers become constants, 16-divisible
integers and pointers get divisibility hints), the repeats dropped, compiled to cubin
with ``triton.compile`` for each architecture, and reported as one JSON line: kernel,
architecture, registers, spill bytes, whether the PTX has vectorised global loads (and
which global loads it has), whether it has 16-byte loads and stores (and which global
stores), the row length ROW the launch made known, the run RUN of consecutive rows it
loads and the vector VECTOR of its row windows (0: none), whether it reads or writes
activation bits, and
whether the alignment allows vectors (see alignment_allows_vectors). Needs triton without
TRITON_INTERPRET.
The quick matrix varies every flag across the dtypes and layouts, compiled for sm_90, and
its bfloat16 and float64 cases for sm_80 too; the suites compile for sm_90 only; --full
takes the cartesian product of the flags for every architecture asked for. --shard K/N
compiles every N-th specialisation, so N processes share the work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from fastbn import launch
from fastbn.bench.shapes import SUITES
from fastbn.conventions import BackwardInputs
from fastbn.reference import SIGN_ACTIVATIONS

KERNEL_NAMES = (
    "partial_stats_kernel", "normalize_kernel", "partial_grad_sums_kernel", "grad_input_kernel",
    "slice_backward_kernel", "slice_forward_kernel",
)
# Kernels that stream whole tensors: these must vectorise their loads where the alignment
# allows.
STREAMING_KERNELS = set(KERNEL_NAMES)
ACTIVATIONS = tuple(launch.ACTIVATION_CODES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "channels_last")
SUITE_NAMES = ("resnet50", "bn1d", "video")
BENCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A 16-byte global load or store of a tensor (%s: ld or st): 4 x 32 bits, or 2 x 64 (not
# the .cg loads of the chunk merges).
FULL_WIDTH = r"%s\.global\.(v4\.b32|v2\.b64)"


def record_launches(configs) -> list:
    """(kernel, args, kwargs) of every launch the launchers make over configs."""
    with launch.recording() as records:
        for config in configs:
            run_config(**config)
    return [(getattr(launch.KERNEL_MODULES[planned.module], planned.kernel),
             *planned.arguments(tensors, floats)) for planned, tensors, floats in records]


def make(shape, dtype, layout):
    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if len(shape) == 5
                 else torch.channels_last)
    return x


def run_config(dtype, layout, batch, activation, residual, affine, track, momentum, use_int64,
               shape=None, eval_too=True):
    """One forward (training, in two launches and through batch_norm_train_, and eval) and
    backward of every launcher for one configuration (x of ``shape``, else (batch, 64, 8,
    8))."""
    launch_needs_int64 = launch.needs_int64
    if use_int64:
        launch.needs_int64 = lambda geometries: True
    launch.clear_plans()  # plans made with the other needs_int64 must not be reused
    try:
        x = make(shape or (batch, 64, 8, 8), dtype, layout)
        channels = x.shape[1]
        params = torch.float64 if dtype == torch.float64 else torch.float32

        def vector():
            return torch.empty(channels, dtype=params, device="meta")

        weight = vector() if affine else None
        bias = vector() if affine else None
        running_mean = vector() if track else None
        running_var = vector() if track else None
        nbt = torch.empty((), dtype=torch.int64, device="meta") if track else None
        z = make(x.shape, dtype, layout) if residual else None
        mean, var = launch.batch_stats_(x, running_mean, running_var, nbt, momentum)
        save_mask = residual and activation in SIGN_ACTIVATIONS
        _, mask = launch.normalize(x, mean, var, weight, bias, z, 1e-5, activation, 0.01,
                                   save_mask)
        mask = mask if save_mask else None
        launch.batch_norm_train_(x, running_mean, running_var, nbt, momentum, weight, bias, z,
                                 1e-5, activation, 0.01, save_mask)
        if eval_too and track:
            launch.normalize(x, running_mean, running_var, weight, bias, z, 1e-5, activation,
                             0.01, False)
        grad = make(x.shape, dtype, layout)
        inputs = BackwardInputs(grad, x, mean, var, weight, bias, z, mask, 1e-5, activation, 0.01)
        for batch_stats in (True, False) if eval_too else (True,):
            launch.normalize_backward(inputs, batch_stats, [True, affine, affine, residual])
        launch.normalize_backward(inputs, True, [False, affine, affine, False])
    finally:
        launch.needs_int64 = launch_needs_int64
        launch.clear_plans()


def quick_configs():
    """Every flag value in every dtype and layout; batch 2 takes one chunk and the one-launch
    backward, 256 several chunks and the two-launch backward."""
    configs = []
    for index, (dtype, layout) in enumerate(itertools.product(DTYPES, LAYOUTS)):
        for variant in range(2):
            configs.append(dict(
                dtype=dtype, layout=layout, batch=(2, 256)[variant],
                activation=ACTIVATIONS[(index + 3 * variant) % len(ACTIVATIONS)],
                residual=bool(variant), affine=variant == 0 or index % 2 == 0,
                track=variant == 0 or index % 3 == 0,
                momentum=None if (index + variant) % 2 else 0.1,
                use_int64=index == variant,
            ))
    return configs


def suite_configs(dtypes=tuple(BENCH_DTYPES)):
    """Every point of the bench's resnet50, bn1d and video suites in ``dtypes``, as a
    module in training would run it: affine, running statistics, momentum 0.1, the point's
    fusion."""
    configs = []
    for name in SUITE_NAMES:
        for point in SUITES[name].points:
            if point.dtype not in dtypes:
                continue
            configs.append(dict(
                dtype=BENCH_DTYPES[point.dtype],
                layout="channels_last" if point.layout == "channels_last" else "contiguous",
                batch=point.shape[0], shape=point.shape,
                activation="none" if point.fusion == "none" else "relu",
                residual=point.fusion == "add_relu", affine=True, track=True, momentum=0.1,
                use_int64=False, eval_too=False,
            ))
    return configs


def full_configs():
    keys = ("dtype", "layout", "batch", "activation", "residual", "affine", "track",
            "momentum", "use_int64")
    values = (DTYPES, LAYOUTS, (2, 256), ACTIVATIONS, (False, True), (False, True),
              (False, True), (0.1, None), (False, True))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def alignment_allows_vectors(kernel, args, kwargs) -> bool:
    """Whether the launch's addresses let the contiguous axis load vectors (8 bytes at
    least): a FLAT walk; runs of consecutive rows (RUN) that start 16-byte aligned; rows of
    a known length ROW (launch.known_row) whose alignment covers 8 bytes (S = 196: 4
    elements, 8 bytes of bfloat16); or every stride argument other than 0 and 1 a
    multiple of 16 (Triton's divisibility hint), so rows start aligned; windows (VECTOR,
    tiling.row_windows) where numel is a multiple of 16, so the load mask is constant
    along each vector."""
    if kwargs.get("FLAT"):
        return True
    bound = dict(zip(kernel.arg_names, args, strict=False))
    if kwargs.get("VECTOR"):  # windows from aligned offsets, masked by numel (a 16-multiple)
        return bound["numel"] % 16 == 0
    if kwargs.get("RUN"):  # runs start at multiples of BLOCK_C elements past a row n
        return (bound["stride_n"] % 16 == 0
                and kwargs["BLOCK_C"] * bound["x_ptr"].element_size() >= 16)
    row = kwargs.get("ROW", 0)
    if row:
        return (row & -row) * bound["x_ptr"].element_size() >= 8
    strides = [value for name, value in bound.items() if "stride" in name]
    return all(value in (0, 1) or value % 16 == 0 for value in strides)


def specialization_key(kernel, signature, constexprs, attrs, exact: bool) -> tuple:
    """What makes two specialisations compile alike. ``exact``: everything Triton keys on.
    Otherwise only the constexpr flags, the dtypes, and the hints on pointers and strides,
    which decide vector widths and addressing: sizes and counts (C, S, tile and chunk
    counts) that differ only in being multiples of 16 compile to the same loads, and
    registers."""
    if exact:
        return (kernel.__name__, json.dumps(signature, sort_keys=True),
                repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
    names = kernel.arg_names

    def kept(index_path):
        name = names[index_path[0]]
        return "ptr" in name or "stride" in name or name.isupper()

    return (kernel.__name__,
            json.dumps({k: v for k, v in signature.items() if kept((names.index(k),))},
                       sort_keys=True),
            repr(sorted((k, v) for k, v in constexprs.items() if kept(k))),
            repr(sorted((k, v) for k, v in attrs.items() if kept(k))))


def specialize(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would build them."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes that ptxas reports for the PTX.

    Triton wheels ship more than one ptxas (``ptxas-blackwell`` reads newer PTX versions);
    the first that accepts the PTX answers.
    """
    binaries = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        for ptxas in (binaries / "ptxas-blackwell", binaries / "ptxas"):
            if not ptxas.exists():
                continue
            result = subprocess.run(
                [str(ptxas), "-v", "--gpu-name", gpu, str(source), "-o", f"{tmp}/k.cubin"],
                capture_output=True, text=True,
            )
            text = result.stdout + result.stderr
            if result.returncode == 0:
                registers = re.search(r"Used (\d+) registers", text)
                spills = [int(v) for v in re.findall(r"(\d+) bytes spill", text)]
                return {"registers": int(registers.group(1)) if registers else None,
                        "spill_bytes": sum(spills)}
            errors.append(text.strip())
    raise RuntimeError(f"no ptxas accepted the PTX: {errors}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="cartesian product of the flags")
    parser.add_argument("--arch", type=int, action="append", help="SM version (default 90, 80)")
    parser.add_argument("--shard", default="0/1", help="K/N: compile every N-th, from the K-th")
    parser.add_argument("--exact", action="store_true",
                        help="compile every distinct specialisation, not one per kind")
    parser.add_argument("--suite-dtypes", default=",".join(BENCH_DTYPES),
                        help="the suites' dtypes to compile (default: all)")
    parser.add_argument("--no-suites", action="store_true",
                        help="only the flag matrix, not the bench suites' shapes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles real GPU code")
    shard, shards = (int(part) for part in args.shard.split("/"))
    configs = full_configs() if args.full else quick_configs()
    jobs = []
    for arch in args.arch or [90, 80]:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        chosen = [c for c in configs if args.full or arch >= 90
                  or c["dtype"] in (torch.bfloat16, torch.float64)]
        if arch >= 90 and not args.no_suites:
            chosen += suite_configs(args.suite_dtypes.split(","))
        seen = set()
        for kernel, kernel_args, kwargs in record_launches(chosen):
            options, signature, constexprs, attrs = specialize(kernel, kernel_args, kwargs,
                                                               backend)
            key = specialization_key(kernel, signature, constexprs, attrs, args.exact)
            if key not in seen:
                seen.add(key)
                launch_facts = {
                    "aligned": alignment_allows_vectors(kernel, kernel_args, kwargs),
                    "row": kwargs.get("ROW", 0), "run": kwargs.get("RUN", 0),
                    "vector": kwargs.get("VECTOR", 0),
                    "act_bits": bool(kwargs.get("USE_ACT_BITS") or kwargs.get("WRITE_ACT_BITS")),
                }
                jobs.append((arch, target, kernel, signature, constexprs, attrs, options,
                             launch_facts))
    for (arch, target, kernel, signature, constexprs, attrs, options,
         launch_facts) in jobs[shard::shards]:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        report = {
            "kernel": kernel.__name__,
            "arch": arch,
            "streaming": kernel.__name__ in STREAMING_KERNELS,
            "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[248]\.", ptx)),
            "full_width_loads": bool(re.search(FULL_WIDTH % "ld", ptx)),
            "full_width_stores": bool(re.search(FULL_WIDTH % "st", ptx)),
            "global_stores": sorted(set(re.findall(r"st\.global(?:\.\w+)*", ptx))),
            "global_loads": sorted(set(re.findall(r"ld\.global(?:\.\w+)*", ptx))),
            **launch_facts,
            "num_warps": options.num_warps,
            "nan_dropping_minmax": bool(re.search(r"\b(max|min)\.f(32|64)\b", ptx)),
            "constexprs": {str(k): str(v) for k, v in constexprs.items()},
            "signature": signature,
            **ptxas_report(ptx, arch),
        }
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
