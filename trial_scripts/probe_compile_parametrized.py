# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: torch.compile(fullgraph=True) of a fastbn layer with a parametrized weight, and of
torch.func.functional_call over a fastbn layer."""
import torch
from torch.nn.utils import parametrize

import fastbn


class Double(torch.nn.Module):
    def forward(self, w):
        return w * 2


x = torch.randn(4, 3, 5, 5)
for cls in (torch.nn.BatchNorm2d, fastbn.BatchNorm2d):
    m = cls(3)
    parametrize.register_parametrization(m, "weight", Double())
    with torch.no_grad():
        m.parametrizations.weight.original.uniform_(0.5, 2)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    print(cls.__module__, "compile parametrized:", (eager - compiled).abs().max().item(),
          "nbt", m.num_batches_tracked.item())
    params = {"weight": torch.full((3,), 3.0), "bias": torch.zeros(3)}
    plain = cls(3)
    f = torch.compile(lambda x: torch.func.functional_call(plain, params, (x,)), fullgraph=True,
                      backend="aot_eager")
    print(cls.__module__, "compile functional_call:", f(x).std((0, 2, 3)).tolist())
