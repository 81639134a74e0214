# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): a layer called twice in one forward (shared BN; CL then NCHW input), the
autograd.functional jacobian (loop and vectorize=True: vmap over the native route's
backward), SyncBatchNorm outside a process group, on the CPU native route, against torch.

Usage: python trial_scripts/probe_s5_misc.py

Finding: jacobian(vectorize=True) (autograd.grad with is_grads_batched=True) raises a vmap
copy_ error for channels_last input on the native route: its pre-hook copies the batched
gradient into an unbatched empty_like(x) (tests/test_trial_s5.py).
"""
import copy

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbn
from s5_common import BAD, report as _report

torch.set_num_threads(1)


def report(tag, ok, why=""):
    _report(tag, ok, why, 60)


def close(a, b, tol=1e-5):
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


# 1. shared layer, two calls per forward
for act in (None, "relu", "leaky_relu"):
    torch.manual_seed(0)
    fb = fastbn.BatchNorm2d(4, activation=act, negative_slope=0.1)
    tb = nn.BatchNorm2d(4)
    tact = (lambda t: t) if act is None else F.relu if act == "relu" else (lambda t: F.leaky_relu(t, 0.1))
    x1 = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last)
    x2 = torch.randn(3, 4, 5, 6) * 2 + 1
    outs = []
    for m, f in ((tb, lambda m, t: tact(m(t))), (fb, lambda m, t: m(t))):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        y = f(m, a) * 2 + f(m, b)
        y.square().sum().backward()
        outs.append([y.detach(), a.grad, b.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, m.num_batches_tracked])
    report(f"shared layer CL then NCHW act={act}", all(close(p, q, 1e-4) for p, q in zip(outs[1], outs[0])))  # (d bias ~3e-5 by cancellation: 1e-4)

# 2. jacobian, loop and vectorized
for act in (None, "relu", "leaky_relu"):
    for vec in (False, True):
        torch.manual_seed(1)
        x = torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last)
        w = torch.rand(3) + 0.5
        fz = lambda t: fastbn.batch_norm(t, None, None, w, None, True, activation=act, negative_slope=0.1)
        tz = lambda t: ((lambda u: u) if act is None else F.relu if act == "relu" else (lambda u: F.leaky_relu(u, 0.1)))(F.batch_norm(t, None, None, w, None, True))
        tag = f"autograd.functional.jacobian vectorize={vec} act={act}"
        try:
            jf = torch.autograd.functional.jacobian(fz, x, vectorize=vec)
            jt = torch.autograd.functional.jacobian(tz, x, vectorize=vec)
            report(tag, close(jf, jt, 1e-4), f"maxdiff {(jf - jt).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:200]}")

# 3. SyncBatchNorm without a process group: a BatchNorm of the input's rank
for shape, fmt in (((3, 4, 5, 6), torch.channels_last), ((9, 4), None), ((3, 4, 5, 6), None)):
    torch.manual_seed(2)
    x = torch.randn(shape)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    sb = fastbn.SyncBatchNorm(4, activation="relu")
    tb = nn.BatchNorm2d(4) if len(shape) == 4 else nn.BatchNorm1d(4)
    res = []
    for m, f in ((tb, lambda m, t: F.relu(m(t))), (sb, lambda m, t: m(t))):
        xi = x.clone().requires_grad_()
        y = f(m, xi); y.square().sum().backward()
        res.append([y.detach(), xi.grad, m.weight.grad, m.running_mean, m.running_var, m.num_batches_tracked])
    report(f"SyncBatchNorm no group {shape} {fmt}", all(close(p, q) for p, q in zip(res[1], res[0])))
print("BAD:", len(BAD))
