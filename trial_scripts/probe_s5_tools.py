# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): tools on layers that take the CPU native route eagerly: torch.compile
(default inductor and aot_eager, fullgraph) must give eager's bits (outputs, grads, running
stats), torch.export, fx, jit.trace, torch.func (functional_call, vmap, grad), gradcheck at
fp64 (not native), state_dict round trip, deepcopy, pickle.

Usage: python trial_scripts/probe_s5_tools.py [inductor|aot_eager ...]
"""
import copy
import io
import pickle
import sys

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn as nn

import fastbn
from s5_common import BAD, report as _report

torch.set_num_threads(1)
BACKENDS = sys.argv[1:] or ["aot_eager", "inductor"]

CASES = {  # name: (module factory, input factory)
    "cl-relu-res": (lambda: fastbn.BatchNorm2d(5, activation="relu"), lambda: torch.randn(3, 5, 4, 6).to(memory_format=torch.channels_last), True),
    "cl-leaky": (lambda: fastbn.BatchNorm2d(5, activation="leaky_relu", negative_slope=0.2), lambda: torch.randn(3, 5, 4, 6).to(memory_format=torch.channels_last), False),
    "2d-relu": (lambda: fastbn.BatchNorm1d(5, activation="relu"), lambda: torch.randn(9, 5), False),
    "cl3d-plain-res": (lambda: fastbn.BatchNorm3d(5), lambda: torch.randn(2, 5, 3, 4, 2).to(memory_format=torch.channels_last_3d), True),
    "bf16x-relu-res": (lambda: fastbn.BatchNorm2d(5, activation="relu"), lambda: torch.randn(3, 5, 4, 6).bfloat16(), True),
    "bf16x-cl-plain": (lambda: fastbn.BatchNorm2d(5), lambda: torch.randn(3, 5, 4, 6).bfloat16().to(memory_format=torch.channels_last), False),
}


def report(tag, ok, why=""):
    _report(tag, ok, why, 44)


def setup(name):
    mk, xk, res = CASES[name]
    torch.manual_seed(2)
    m = mk()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
    x = xk().mul(2).add(0.5)
    z = torch.randn_like(x) if res else None
    return m, x, z


def run(m, x, z):
    xi = x.clone().requires_grad_(True)
    zi = None if z is None else z.clone().requires_grad_(True)
    y = m(xi, zi) if zi is not None else m(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    out = [y.detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]
    if zi is not None:
        out.append(zi.grad)
    m.zero_grad()
    return out


def same_bits(a, b):
    return all(torch.equal(p, q) and p.stride() == q.stride() for p, q in zip(a, b))


for name in CASES:
    m, x, z = setup(name)
    eager = run(copy.deepcopy(m), x, z)
    for backend in BACKENDS:
        for fullgraph in (False, True):
            tag = f"{name} compile {backend} fullgraph={int(fullgraph)}"
            try:
                torch._dynamo.reset()
                mc = copy.deepcopy(m)
                c = torch.compile(mc, backend=backend, fullgraph=fullgraph)
                got = run(c, x, z)
                # strides: compiled outputs may legitimately differ; values must be the same bits
                eq = [torch.equal(p, q) for p, q in zip(got, eager)]
                report(tag, all(eq), f"equal per item {eq} maxdiff {[round((p.float()-q.float()).abs().max().item(), 8) for p, q in zip(got, eager)]}")
            except Exception as e:  # noqa: BLE001
                report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
    # torch.export (train and eval), fx, jit.trace: same bits as eager forward
    for mode in ("train", "eval"):
        tag = f"{name} export {mode}"
        try:
            m1, m2 = copy.deepcopy(m).train(mode == "train"), copy.deepcopy(m).train(mode == "train")
            args = (x,) if z is None else (x, z)
            ep = torch.export.export(m1, args)
            a = ep.module()(*args)
            b = m2(*args)
            st = [torch.equal(p, q) for p, q in zip(ep.module().buffers(), m2.buffers())] if mode == "train" else [True]
            report(tag, torch.equal(a, b) and all(st), f"out equal {torch.equal(a, b)} buffers {st}")
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
    for tool in ("fx", "jit.trace"):
        tag = f"{name} {tool} train fwd+bwd"
        try:
            m1, m2 = copy.deepcopy(m), copy.deepcopy(m)
            if tool == "fx":
                t = torch.fx.symbolic_trace(m1)
            else:
                t = torch.jit.trace(m1, (x,) if z is None else (x, z), check_trace=False)
                m1 = copy.deepcopy(m)  # (trace ran a training call: start again from the same state)
                t = torch.jit.trace(m1, (x,) if z is None else (x, z), check_trace=False)
                m2 = copy.deepcopy(m); m2(x) if z is None else m2(x, z)  # the same one extra step
            a = run(t, x, z)
            b = run(m2, x, z)
            eq = [torch.equal(p, q) for p, q in zip(a, b)]
            report(tag, all(eq), f"equal per item {eq}")
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
    # torch.func
    tag = f"{name} func.functional_call"
    try:
        m1 = copy.deepcopy(m)
        params = {k: v.detach().clone().requires_grad_() for k, v in m1.named_parameters()}
        bufs = {k: v.clone() for k, v in m1.named_buffers()}
        args = (x,) if z is None else (x, z)
        a = torch.func.functional_call(m1, {**params, **bufs}, args)
        b = copy.deepcopy(m)(*args)
        report(tag, torch.equal(a, b) and torch.equal(bufs["running_mean"], m1.running_mean * 0 + bufs["running_mean"]), f"maxdiff {(a.float()-b.float()).abs().max().item()}")
    except Exception as e:  # noqa: BLE001
        report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
    tag = f"{name} func.vmap (eval) / grad (train)"
    try:
        m1 = copy.deepcopy(m).eval()
        xs = torch.stack([x, x * 2])
        a = torch.func.vmap(lambda t: m1(t))(xs)
        b = torch.stack([m1(x), m1(x * 2)])
        m2 = copy.deepcopy(m); m3 = copy.deepcopy(m)
        params = dict(m2.named_parameters())
        g = torch.func.grad(lambda p: torch.func.functional_call(m2, p, (x,)).float().square().sum())(params)
        y = m3(x); y.float().square().sum().backward()
        ok = torch.allclose(a.float(), b.float(), atol=1e-2 if x.dtype != torch.float32 else 1e-5) and all(
            torch.allclose(g[k], p.grad, atol=1e-2 if x.dtype != torch.float32 else 1e-4, rtol=1e-3) for k, p in m3.named_parameters())
        report(tag, ok, f"vmap {(a.float()-b.float()).abs().max().item():.3g} grad {[ (g[k]-p.grad).abs().max().item() for k, p in m3.named_parameters()]}")
    except Exception as e:  # noqa: BLE001
        report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
    # state_dict / deepcopy / pickle after a training step
    tag = f"{name} state_dict/deepcopy/pickle"
    try:
        m1 = copy.deepcopy(m); run(m1, x, z)
        m2 = type(m1)(5, activation=m1.activation, negative_slope=m1.negative_slope)
        m2.load_state_dict(m1.state_dict())
        m3 = copy.deepcopy(m1)
        buf = io.BytesIO(); torch.save(m1, buf); buf.seek(0)
        m4 = torch.load(buf, weights_only=False)
        m5 = pickle.loads(pickle.dumps(m1))
        outs = [run(k, x, z) for k in (m1, m2, m3, m4, m5)]
        report(tag, all(same_bits(outs[0], o) for o in outs[1:]), "")
    except Exception as e:  # noqa: BLE001
        report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")

# gradcheck at fp64 (fp64 never takes the native route), channels_last, relu/leaky + residual
for act in ("relu", "leaky_relu", None):
    for fmt in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(3)
        x = torch.randn(2, 3, 3, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        z = torch.randn(2, 3, 3, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
        b = torch.randn(3, dtype=torch.float64).requires_grad_()
        f = lambda x, z, w, b: fastbn.batch_norm(x, None, None, w, b, training=True, residual=z, activation=act, negative_slope=0.1)
        tag = f"gradcheck+gradgradcheck fp64 act={act} {fmt}"
        try:
            ok = torch.autograd.gradcheck(f, (x, z, w, b)) and torch.autograd.gradgradcheck(f, (x, z, w, b))
            report(tag, ok)
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
print("BAD:", len(BAD))
