"""Compile every kernel specialisation fastbn's launchers request, for real GPUs, on any machine.

    python tests/kernel_specializations.py [--full] [--arch 90 --arch 80] [--shard K/N]

The launchers in fastbn.launch run over a matrix of dtypes x layouts x flags with the
kernels replaced by recorders; each recorded launch is specialised exactly as Triton's JIT
would specialise it on a GPU (value-1 integers become constants, 16-divisible integers and
pointers get divisibility hints), compiled to cubin with ``triton.compile`` for each
architecture, and reported as one JSON line: kernel, architecture, registers, spill bytes,
and whether the PTX has vectorised global loads. Needs triton without TRITON_INTERPRET.
The quick matrix varies every flag across the dtypes and layouts, compiled for sm_90, and
its bfloat16 and float64 cases for sm_80 too; --full takes the cartesian product of the
flags for every architecture asked for. --shard K/N compiles every N-th specialisation,
so N processes share the work.
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
from fastbn.reference import SIGN_ACTIVATIONS

KERNEL_MODULES = (launch.forward_kernels, launch.backward_kernels)
KERNEL_NAMES = (
    "partial_stats_kernel", "finalize_stats_kernel", "normalize_kernel",
    "partial_grad_sums_kernel", "finalize_grad_sums_kernel", "grad_input_kernel",
)
# Kernels that stream whole tensors: these must vectorise their loads.
STREAMING_KERNELS = {
    "partial_stats_kernel", "normalize_kernel", "partial_grad_sums_kernel", "grad_input_kernel",
}
ACTIVATIONS = tuple(launch.ACTIVATION_CODES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "channels_last")


class Recorder:
    """Stands in for a @triton.jit kernel: records (kernel, args, kwargs) per launch."""

    def __init__(self, kernel, records):
        self.kernel = kernel
        self.records = records

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.records.append((self.kernel, args, kwargs))

        return launch_


def record_launches(configs) -> list:
    """Run the launchers over configs with recorders in place of the kernels."""
    records: list = []
    originals = {}
    for module in KERNEL_MODULES:
        for name in KERNEL_NAMES:
            if hasattr(module, name):
                originals[(module, name)] = getattr(module, name)
                setattr(module, name, Recorder(getattr(module, name), records))
    try:
        for config in configs:
            run_config(**config)
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return records


def make(shape, dtype, layout):
    x = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def run_config(dtype, layout, batch, activation, residual, affine, track, momentum, use_int64):
    """One forward (training and eval) and backward of every launcher for one configuration."""
    launch_needs_int64 = launch.needs_int64
    if use_int64:
        launch.needs_int64 = lambda tensors: True
    try:
        x = make((batch, 64, 8, 8), dtype, layout)
        params = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.ones(64, dtype=params) if affine else None
        bias = torch.zeros(64, dtype=params) if affine else None
        running_mean = torch.zeros(64, dtype=params) if track else None
        running_var = torch.ones(64, dtype=params) if track else None
        nbt = torch.tensor(1) if track else None
        z = make(x.shape, dtype, layout) if residual else None
        mean, var = launch.batch_stats_(x, running_mean, running_var, nbt, momentum)
        mean, var = mean.zero_(), var.fill_(1.0)
        save_mask = residual and activation in SIGN_ACTIVATIONS
        _, mask = launch.normalize(x, mean, var, weight, bias, z, 1e-5, activation, 0.01,
                                   save_mask)
        mask = mask if save_mask else None
        grad = make(x.shape, dtype, layout)
        for batch_stats in (True, False):
            launch.normalize_backward(grad, x, mean, var, weight, bias, z, mask, 1e-5,
                                      batch_stats, activation, 0.01,
                                      [True, affine, affine, residual])
        launch.normalize_backward(grad, x, mean, var, weight, bias, z, mask, 1e-5, True,
                                  activation, 0.01, [False, affine, affine, False])
    finally:
        launch.needs_int64 = launch_needs_int64


def quick_configs():
    """Every flag value in every dtype and layout; batch 2 takes one chunk, 64 several."""
    configs = []
    for index, (dtype, layout) in enumerate(itertools.product(DTYPES, LAYOUTS)):
        for variant in range(2):
            configs.append(dict(
                dtype=dtype, layout=layout, batch=(2, 64)[variant],
                activation=ACTIVATIONS[(index + 3 * variant) % len(ACTIVATIONS)],
                residual=bool(variant), affine=variant == 0 or index % 2 == 0,
                track=variant == 0 or index % 3 == 0,
                momentum=None if (index + variant) % 2 else 0.1,
                use_int64=index == variant,
            ))
    return configs


def full_configs():
    keys = ("dtype", "layout", "batch", "activation", "residual", "affine", "track",
            "momentum", "use_int64")
    values = (DTYPES, LAYOUTS, (2, 64), ACTIVATIONS, (False, True), (False, True),
              (False, True), (0.1, None), (False, True))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


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
        seen = set()
        for kernel, kernel_args, kwargs in record_launches(chosen):
            options, signature, constexprs, attrs = specialize(kernel, kernel_args, kwargs,
                                                               backend)
            key = (kernel.__name__, json.dumps(signature, sort_keys=True),
                   repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
            if key not in seen:
                seen.add(key)
                jobs.append((arch, target, kernel, signature, constexprs, attrs, options))
    for arch, target, kernel, signature, constexprs, attrs, options in jobs[shard::shards]:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        report = {
            "kernel": kernel.__name__,
            "arch": arch,
            "streaming": kernel.__name__ in STREAMING_KERNELS,
            "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[248]\.", ptx)),
            "constexprs": {str(k): str(v) for k, v in constexprs.items()},
            "signature": signature,
            **ptxas_report(ptx, arch),
        }
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
