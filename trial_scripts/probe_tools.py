# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: converted models under torch.compile(fullgraph), torch.export, fx, jit.trace, folding."""
import copy
import warnings

import torch
from probe_models import MODELS

import fastbn

warnings.simplefilter("ignore")


def diff(a, b):
    return (a - b).abs().max().item()


for name in ("resnet", "mobilenet_relu6", "mlp", "video"):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    ref = make()
    x = torch.randn(shape)
    for fuse in ("none", "graph"):
        model = fastbn.convert(copy.deepcopy(ref), fuse=fuse)
        r = copy.deepcopy(ref)
        # compile fullgraph, training
        try:
            c = torch.compile(model, fullgraph=True, backend="aot_eager")
            y = c(x); y.sum().backward()
            yr = r(x); yr.sum().backward()
            g = diff(next(model.parameters()).grad, next(r.parameters()).grad)
            rs = max(diff(a.float(), b.float()) for a, b in zip(fastbn.revert(copy.deepcopy(model)).state_dict().values(), r.state_dict().values()))
            print(f"{name} {fuse} compile train: out {diff(y, yr):.2g} grad {g:.2g} state {rs:.2g}")
        except Exception as e:
            print(f"{name} {fuse} compile: {type(e).__name__}: {str(e)[:300]}")
        # export, eval and train
        for mode in ("eval", "train"):
            m = copy.deepcopy(model).train(mode == "train"); rr = copy.deepcopy(r).train(mode == "train")
            try:
                ep = torch.export.export(m, (x,))
                out = ep.module()(x)
                print(f"{name} {fuse} export {mode}: {diff(out, rr(x)):.2g}")
            except Exception as e:
                print(f"{name} {fuse} export {mode}: {type(e).__name__}: {str(e)[:300]}")
        # fx
        try:
            gm = torch.fx.symbolic_trace(copy.deepcopy(model))
            print(f"{name} {fuse} fx: {diff(gm(x), copy.deepcopy(ref)(x)):.2g}")
        except Exception as e:
            print(f"{name} {fuse} fx: {type(e).__name__}: {str(e)[:300]}")
        # jit.trace
        try:
            tm = torch.jit.trace(copy.deepcopy(model), (x,), check_trace=False)
            print(f"{name} {fuse} jit.trace: {diff(tm(x), copy.deepcopy(ref)(x)):.2g}")
        except Exception as e:
            print(f"{name} {fuse} jit.trace: {type(e).__name__}: {str(e)[:300]}")
        # folding after revert
        m = copy.deepcopy(model); m(x)
        rv = fastbn.revert(m).eval()
        try:
            from torch.fx.experimental.optimization import fuse as fxfuse
            folded = fxfuse(copy.deepcopy(rv))
            print(f"{name} {fuse} revert+fold: {diff(folded(x), rv(x)):.2g} types-ok={all(type(a) is type(b) for a, b in zip(rv.modules(), ref.modules()))}")
        except Exception as e:
            print(f"{name} {fuse} fold: {type(e).__name__}: {str(e)[:300]}")
