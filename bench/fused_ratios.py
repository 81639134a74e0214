"""Interleaved fastbn / torch time ratios for the fused CPU rows (BN+ReLU, BN+add+ReLU).

torch's baseline: F.relu(F.batch_norm(x) + z) in eager; fastbn: fastbn.batch_norm(...,
residual=z, activation="relu") on the "torch" backend. For each row the two run
alternately, `reps` times each; the ratio is median(torch) / median(fastbn) (> 1: fastbn
faster). One thread, the cpu suite's shapes (fastbn/bench/shapes.py _CPU), channels_last
for the 4-D and 5-D ones. A quick check for iteration, not a recorded run: the official
numbers come from ``python -m fastbn.bench --fusion relu,add_relu``.

Usage: python bench/fused_ratios.py [reps] [modes] [dtypes]
       (modes: comma-separated of forward-train,backward,forward-backward; dtypes: fp32,bf16).
To time another checkout's fastbn, put its root first on PYTHONPATH and run from outside
this tree.
"""
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastbn

SHAPES = [(1024, 256), (4096, 512), (32, 128, 256), (8, 64, 56, 56), (16, 256, 14, 14),
          (16, 1024, 7, 7), (2, 64, 8, 28, 28)]


def baseline(x, rm, rv, w, b, z):
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if z is not None:
        y = y + z
    return F.relu(y)


def fused(x, rm, rv, w, b, z):
    return fastbn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, residual=z, activation="relu")


def step(function, mode, x, z, w, b, go):
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    leaves = [x, w, b] + ([z] if z is not None else [])
    if mode == "forward-train":
        return lambda: function(x, rm, rv, w, b, z)
    if mode == "backward":
        y = function(x, rm, rv, w, b, z)
        return lambda: torch.autograd.grad(y, leaves, go, retain_graph=True)
    return lambda: torch.autograd.grad(function(x, rm, rv, w, b, z), leaves, go)


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["forward-train", "backward",
                                                              "forward-backward"]
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["fp32", "bf16"]
    torch.set_num_threads(1)
    print("fastbn from", fastbn.__file__)
    ratios = {}
    with fastbn.use_backend("torch"):
        for fusion in ("relu", "add_relu"):
            for dtype_name in dtypes:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
                for layout in ("nchw", "channels_last"):
                    for shape in SHAPES:
                        if layout == "channels_last" and len(shape) < 4:
                            continue
                        g = torch.Generator().manual_seed(0)
                        fmt = (torch.channels_last if len(shape) == 4 else
                               torch.channels_last_3d if len(shape) == 5 else
                               torch.contiguous_format)
                        fmt = fmt if layout == "channels_last" else torch.contiguous_format

                        def make(g=g, shape=shape, dtype=dtype, fmt=fmt):
                            t = torch.randn(shape, generator=g).to(dtype)
                            return t.contiguous(memory_format=fmt)
                        x = make().requires_grad_(True)
                        z = make().requires_grad_(True) if fusion == "add_relu" else None
                        go = make()
                        w = torch.rand(shape[1], generator=g).add_(0.5).requires_grad_(True)
                        b = torch.randn(shape[1], generator=g).requires_grad_(True)
                        for mode in modes:
                            steps = {name: step(f, mode, x, z, w, b, go)
                                     for name, f in (("torch", baseline), ("fastbn", fused))}
                            times = {"torch": [], "fastbn": []}
                            for _ in range(2):
                                for s in steps.values():
                                    s()
                            for _ in range(reps):
                                for name, s in steps.items():
                                    start = time.perf_counter()
                                    s()
                                    times[name].append(time.perf_counter() - start)
                            ratio = statistics.median(times["torch"]) / statistics.median(
                                times["fastbn"])
                            ratios[(fusion, dtype_name, layout, shape, mode)] = ratio
                            print(f"{fusion:8s} {dtype_name} {layout:13s} {str(shape):18s} "
                                  f"{mode:16s} {ratio:5.2f}x  (torch "
                                  f"{1e3 * statistics.median(times['torch']):.3f} ms)",
                                  flush=True)
    print("geomeans:")
    groups = {}
    for (fusion, dtype_name, layout, _, mode), r in ratios.items():
        for key in ((fusion,), (fusion, mode), (fusion, dtype_name, layout)):
            groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        print(f"  {' '.join(key):32s} {math.exp(statistics.mean(map(math.log, rs))):.2f}x "
              f"(min {min(rs):.2f}, {len(rs)} rows)")


if __name__ == "__main__":
    main()
