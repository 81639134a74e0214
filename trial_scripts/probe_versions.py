# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: _version bumps of the state a training call mutates, per backend (as torch's)."""
import os

os.environ["TRITON_INTERPRET"] = "1"
import torch

import fastbn

x = torch.randn(4, 3, 5, 5)
for backend in ("torch", "triton"):
    for momentum in (0.1, None):
        m = fastbn.BatchNorm2d(3, momentum=momentum)
        before = {k: v._version for k, v in m.state_dict(keep_vars=True).items()}
        with fastbn.use_backend(backend):
            m(x)
        print(backend, momentum, {k: v._version - before[k] for k, v in m.state_dict(keep_vars=True).items()})
t = torch.nn.BatchNorm2d(3)
before = {k: v._version for k, v in t.state_dict(keep_vars=True).items()}
t(x)
print("torch module", {k: v._version - before[k] for k, v in t.state_dict(keep_vars=True).items()})
