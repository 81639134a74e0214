# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: running_mean an expanded (stride-0) view: torch accepts it; fastbn raises. Does
the failed call leave num_batches_tracked and running_var as they were, per backend?"""
import os

os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F

import fastbn

x = torch.randn(4, 3, 5)
rm, rv = torch.zeros(1).expand(3), torch.ones(3)
F.batch_norm(x, rm, rv, training=True)
print("torch: ok, rm", rm.tolist(), "rv", rv.tolist())
for backend in ("torch", "triton"):
    rm, rv, nbt = torch.zeros(1).expand(3), torch.ones(3), torch.tensor(0)
    try:
        with fastbn.use_backend(backend):
            fastbn.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt)
        print(backend, "ok")
    except Exception as e:
        print(backend, type(e).__name__, str(e)[:80])
    print("   after: rm", rm.tolist(), "rv", rv.tolist(), "nbt", nbt.item())
