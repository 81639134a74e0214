# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: fastbn.convert / revert of layers whose weight is parametrized."""
import warnings

import torch
from torch.nn.utils import parametrize

import fastbn


class Double(torch.nn.Module):
    def forward(self, w):
        return w * 2


x = torch.randn(4, 3, 5, 5)
for start in ("torch", "fastbn"):
    bn = (torch.nn.BatchNorm2d if start == "torch" else fastbn.BatchNorm2d)(3)
    parametrize.register_parametrization(bn, "weight", Double())
    model = torch.nn.Sequential(bn).eval()
    want = model(x)
    for kw in ({}, {"sync": True}):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                conv = fastbn.convert(torch.nn.Sequential(bn), **kw).eval()
                got = conv(x)
                print(start, kw, type(conv[0]).__name__, "diff", (got - want).abs().max().item(),
                      [str(m.message)[:100] for m in w])
            except Exception as e:
                print(start, kw, type(e).__name__, str(e)[:200])
    try:
        rev = fastbn.revert(torch.nn.Sequential(bn)).eval()
        print(start, "revert", type(rev[0]).__name__, (rev(x) - want).abs().max().item())
    except Exception as e:
        print(start, "revert", type(e).__name__, str(e)[:200])

# torch layer -> convert -> parametrize the fastbn layer -> revert
bn = torch.nn.BatchNorm2d(3)
model = fastbn.convert(torch.nn.Sequential(bn)).eval()
parametrize.register_parametrization(model[0], "weight", Double())
want = model(x)
try:
    rev = fastbn.revert(model)
    print("convert+parametrize+revert", type(rev[0]).__name__, (rev(x) - want).abs().max().item())
except Exception as e:
    print("convert+parametrize+revert", type(e).__name__, str(e)[:200])
