# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): edge cases of the CPU native route against torch's BatchNorm + add + act:
residual=x itself, channel slices of channels_last tensors, expanded/other-format output
gradients (y.sum(), y.mean(), a channels_last grad for an NCHW bf16 x), backward twice with
retain_graph, large mean (the rule sends the call to the exact path: state updated once),
momentum 0 / 1, torch.utils.checkpoint, anomaly mode, run-to-run bits.

Usage: python trial_scripts/probe_s5_edge.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp

import fastbn
from s5_common import BAD, report as _report
from fastbn import cpu

torch.set_num_threads(1)


def report(tag, ok, why=""):
    _report(tag, ok, why, 64)


def torch_fused(x, rm, rv, w, b, z, act, momentum=0.1):
    y = F.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5)
    y = y if z is None else y + z
    return y if act is None else F.relu(y) if act == "relu" else F.leaky_relu(y, 0.1)


def pair(x, act="relu", residual="z", momentum=0.1, loss=lambda y: y.float().square().sum(), wrap=None):
    """Run fastbn and torch on clones; return both (y, grads..., rm, rv) lists."""
    out = []
    c = x.shape[1]
    for impl in ("torch", "fastbn"):
        xi = x.detach().clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, c).requires_grad_(); b = torch.linspace(-0.3, 0.3, c).requires_grad_()
        rm, rv = torch.zeros(c), torch.ones(c)
        z = xi if residual == "x" else (torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).requires_grad_() if residual == "z" else None)
        f = (lambda t: torch_fused(t, rm, rv, w, b, z if residual != "x" else t, act, momentum)) if impl == "torch" else \
            (lambda t: fastbn.batch_norm(t, rm, rv, w, b, True, momentum, residual=z if residual != "x" else t, activation=act, negative_slope=0.1))
        y = wrap(f, xi) if wrap else f(xi)
        loss(y).backward()
        out.append([y.detach(), xi.grad, w.grad, b.grad, rm, rv] + ([z.grad] if residual == "z" else []))
    return out


def close(t, f, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (a, b) in enumerate(zip(f, t)):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
            return f"item {i} maxdiff {(a.float() - b.float()).abs().max().item():.3g}"
    return ""


cl = lambda s: torch.randn(s).to(memory_format=torch.channels_last)
CASES = {"fp32-cl": (lambda: cl((3, 4, 5, 6)) * 2 + 0.5, torch.float32),
         "fp32-2d": (lambda: torch.randn(9, 4) * 2 + 0.5, torch.float32),
         "bf16-nchw": (lambda: (torch.randn(3, 4, 5, 6) * 2 + 0.5).bfloat16(), torch.bfloat16)}

for name, (mk, dtype) in CASES.items():
    torch.manual_seed(0)
    x = mk()
    for act in ("relu", "leaky_relu", None):
        native = cpu.serves_natively(x, torch.zeros(4), torch.ones(4), torch.ones(4), torch.ones(4), act or "none", 0.1)
        t, f = pair(x, act, residual="x")
        why = close(t, f, dtype); report(f"{name} act={act} native={int(native)} residual=x itself", not why, why)
        for lname, loss in (("y.sum()", lambda y: y.sum()), ("y.mean()", lambda y: y.float().mean()),
                            ("cl grad", lambda y: (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype).contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y * 2).sum())):
            t, f = pair(x, act, loss=loss)
            why = close(t, f, dtype); report(f"{name} act={act} loss={lname}", not why, why)
        for m in (0.0, 1.0):  # (None: probe_s5_usage.py, with the module's counter)
            t, f = pair(x, act, momentum=m)
            why = close(t, f, dtype); report(f"{name} act={act} momentum={m}", not why, why)
        t, f = pair(x, act, wrap=lambda fn, t: cp.checkpoint(fn, t, use_reentrant=False))
        why = close(t, f, dtype); report(f"{name} act={act} checkpoint(use_reentrant=False)", not why, why)
        with torch.autograd.detect_anomaly():
            t, f = pair(x, act)
        why = close(t, f, dtype); report(f"{name} act={act} detect_anomaly", not why, why)
        a, b = pair(x, act)[1], pair(x, act)[1]
        report(f"{name} act={act} run-to-run bits", all(torch.equal(p, q) for p, q in zip(a, b)))

# backward twice with retain_graph: grads accumulate like torch's
for name, (mk, dtype) in CASES.items():
    torch.manual_seed(0)
    x = mk()
    def twice(y):
        l = y.float().square().sum(); l.backward(retain_graph=True); return l
    t, f = pair(x, "relu", loss=twice)
    why = close(t, f, dtype); report(f"{name} relu backward twice (retain_graph)", not why, why)

# channel slices of channels_last tensors (channels innermost, not dense)
big = torch.randn(3, 8, 5, 6).mul(2).add(0.5).to(memory_format=torch.channels_last)
for sl in (slice(0, 4), slice(2, 8, 2)):
    x = big[:, sl]
    for act in ("relu", None):
        t, f = pair(x, act)
        why = close(t, f, torch.float32)
        report(f"cl channel slice {sl} act={act} strides {x.stride()} -> out {f[0].stride()} torch {t[0].stride()}", not why and f[0].stride() == t[0].stride(), why)

# large mean: fp32 CL at mean 1e4 (the rule refuses the kernel's statistics): state updated
# once and close to the float64 truth
x = (torch.randn(4, 3, 5, 6) + 1e4).to(memory_format=torch.channels_last)
rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
y = fastbn.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True, 0.1, num_batches_tracked=nbt, activation="relu")
x64 = x.double()
mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3))
truth = F.relu((x64 - mean.view(1, 3, 1, 1)) / (x64.var((0, 2, 3), unbiased=False).view(1, 3, 1, 1) + 1e-5).sqrt())
report("fp32-cl mean 1e4 relu: nbt once, stats, output vs float64",
       nbt.item() == 1 and torch.allclose(rm.double(), 0.1 * mean, rtol=1e-6) and torch.allclose(rv.double(), 0.9 + 0.1 * var, rtol=1e-5)
       and (y.double() - truth).abs().max().item() < 1e-4, f"nbt {nbt.item()} out err {(y.double() - truth).abs().max().item():.3g}")
print("BAD:", len(BAD))
