# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): module hooks on fused layers of the CPU native route (full backward hooks,
legacy backward hooks, forward hooks replacing the output), and a converted channels_last
ResNet-ish model (fuse="graph") under torch.compile (inductor, fullgraph) against eager:
same bits for outputs, gradients and buffers over two training steps.

Usage: python trial_scripts/probe_s5_hooks_compile.py
"""
import copy
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # (probe_models imports tests/conftest)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn as nn

import fastbn
from s5_common import BAD, report as _report
from probe_models import resnetish

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def report(tag, ok, why=""):
    _report(tag, ok, why, 60)


# 1. hooks on a fused layer: what the hooks see and the gradients must equal the same layer's
#    without hooks (full backward hook: grad_output of the fused output, grad_input of x).
for fmt, dtype in ((torch.channels_last, torch.float32), (torch.contiguous_format, torch.bfloat16),
                   (torch.contiguous_format, torch.float32)):
    for act in ("relu", "leaky_relu", None):
        torch.manual_seed(0)
        bn = fastbn.BatchNorm2d(4, activation=act, negative_slope=0.1)
        x = torch.randn(3, 4, 5, 6).to(dtype).contiguous(memory_format=fmt)
        z = torch.randn_like(x)
        go = torch.randn_like(x)

        def call(m, hooks):
            seen = {}
            hs = []
            if hooks:
                hs.append(m.register_full_backward_hook(lambda mod, gi, g: seen.update(gi=gi[0].clone(), go=g[0].clone())))
                hs.append(m.register_forward_hook(lambda mod, a, o: o * 1.5))
            xi, zi = x.clone().requires_grad_(), z.clone().requires_grad_()
            y = m(xi, zi)
            y.backward(go)
            for h in hs:
                h.remove()
            return y, xi.grad, zi.grad, m.weight.grad.clone(), seen

        tag = f"hooks {str(fmt)[6:]} {str(dtype)[6:]} act={act}"
        try:
            y0, gx0, gz0, gw0, _ = call(copy.deepcopy(bn), False)
            y1, gx1, gz1, gw1, seen = call(copy.deepcopy(bn), True)
            ok = (torch.equal(y1, y0 * 1.5) and torch.equal(seen["go"], go) and
                  torch.allclose(gx1.float(), (gx0 * 1.5).float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5) and
                  torch.equal(seen["gi"], gx1))
            report(tag, ok, f"y {torch.equal(y1, y0 * 1.5)} go {torch.equal(seen['go'], go)} gi==x.grad {torch.equal(seen['gi'], gx1)}")
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:200]}")

# 2. converted model under torch.compile: eager vs compiled bits (NCHW inductor: torch's own
#    model also differs by ~3e-7 between eager and inductor, so only the native-route CL row
#    and aot_eager speak for fastbn)
for fmt in (torch.channels_last, torch.contiguous_format):
    for backend in ("aot_eager", "inductor"):
        torch.manual_seed(0)
        model = fastbn.convert(resnetish(), fuse="graph").to(memory_format=fmt)
        eager, comp = copy.deepcopy(model), copy.deepcopy(model)
        compiled = torch.compile(comp, backend=backend, fullgraph=True)
        x = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt)
        tag = f"convert(graph) resnetish {str(fmt)[6:]} compile {backend}"
        try:
            torch._dynamo.reset()
            ok = True
            why = []
            for step in range(2):
                ye = eager(x); ye.square().mean().backward()
                yc = compiled(x); yc.square().mean().backward()
                if not torch.equal(ye, yc):
                    ok = False; why.append(f"step{step} out {(ye - yc).abs().max().item():.3g}")
                for (n, p), q in zip(eager.named_parameters(), comp.parameters()):
                    if not torch.equal(p.grad, q.grad):
                        ok = False; why.append(f"step{step} grad {n} {(p.grad - q.grad).abs().max().item():.3g}")
                for (n, p), q in zip(eager.named_buffers(), comp.buffers()):
                    if not torch.equal(p, q):
                        ok = False; why.append(f"step{step} buffer {n}")
            report(tag, ok, "; ".join(why[:6]))
        except Exception as e:  # noqa: BLE001
            report(tag, False, f"{type(e).__name__}: {str(e)[:300]}")
print("BAD:", len(BAD))
