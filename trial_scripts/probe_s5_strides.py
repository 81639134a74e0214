# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): output, d x and d residual strides of the native route against torch's BN + add + relu,
for every layout it serves, channel slices and the (N, C, L) channels-innermost 3-D view; the
output gradient in y's format or contiguous. All matched torch's.

Usage: python trial_scripts/probe_s5_strides.py
"""
import torch, fastbn, torch.nn.functional as F
cases = {"cl": torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last), "cl3d": torch.randn(2, 4, 3, 4, 2).to(memory_format=torch.channels_last_3d),
         "2d": torch.randn(7, 4), "bf16": torch.randn(3, 4, 5, 6).bfloat16(), "bf16cl": torch.randn(3, 4, 5, 6).bfloat16().to(memory_format=torch.channels_last),
         "3d-cl(N,L,C)": torch.randn(3, 6, 4).transpose(1, 2), "cl-sliceC": torch.randn(3, 8, 5, 6).to(memory_format=torch.channels_last)[:, :4]}
for name, x0 in cases.items():
    for act in (None, "relu"):
        for gfmt in ("same", "contig"):
            out = []
            for impl in ("torch", "fastbn"):
                x = x0.detach().clone().requires_grad_() if name != "cl-sliceC" else x0.detach().requires_grad_()
                z = torch.randn_like(x).requires_grad_()
                w = torch.ones(4, requires_grad=True)
                if impl == "torch":
                    y = F.batch_norm(x, None, None, w, None, True) + z
                    y = y if act is None else F.relu(y)
                else:
                    y = fastbn.batch_norm(x, None, None, w, None, True, residual=z, activation=act)
                g = torch.ones_like(y) if gfmt == "same" else torch.ones(y.shape, dtype=y.dtype)
                y.backward(g)
                out.append((y.stride(), x.grad.stride(), z.grad.stride()))
            flag = "" if out[0] == out[1] else "  <-- DIFF"
            print(f"{name:14s} act={str(act):5s} grad={gfmt:6s} torch y/gx/gz {out[0]} fastbn {out[1]}{flag}")
