# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): probe_bad_inputs.py's functional cases on inputs that take the CPU native
route (fp32 channels_last, fp32 (N, C), bf16 NCHW with fp32 buffers), with relu + residual
and plain: fastbn's exception type vs torch's (F.batch_norm + add + relu), and no state
changed on error. Prints only the flagged cases, then a count.

Usage: python trial_scripts/probe_s5_bad_inputs.py
"""
import torch
import torch.nn.functional as F

import fastbn
from probe_bad_inputs import CASES, C, run, state  # (its cases run only as a script)

INPUTS = {
    "fp32-cl": lambda: torch.randn(4, C, 5, 6).to(memory_format=torch.channels_last),
    "fp32-2d": lambda: torch.randn(9, C),
    "bf16-nchw": lambda: torch.randn(4, C, 5, 6).bfloat16(),
}
FLAGS = []


def cases(x):
    shape = x.shape
    per_channel = {k: v for k, v in CASES.items() if "input" not in v(state())}  # (x-independent)
    return {**per_channel,
        "rm inference tensor": lambda s: dict(running_mean=inference_zeros()),
        "weight inference tensor": lambda s: dict(weight=inference_ones()),
        "input N=1 S=1": lambda s: dict(input=torch.randn(1, C, *[1] * (len(shape) - 2)).to(x.dtype)),
        "input meta": lambda s: dict(input=x.to("meta")),
        "residual wrong shape": lambda s: dict(residual=torch.randn(shape[0] + 1, *shape[1:]).to(x.dtype)),
        "residual int": lambda s: dict(residual=torch.ones(shape, dtype=torch.int64)),
        "residual meta": lambda s: dict(residual=torch.randn(shape, device="meta").to(x.dtype)),
    }


def inference_zeros():
    with torch.inference_mode():
        return torch.zeros(C)


def inference_ones():
    with torch.inference_mode():
        return torch.ones(C, requires_grad=False)


for xname, mkx in INPUTS.items():
    for act in (None, "relu"):
        for with_res in (False, True):
            torch.manual_seed(0)
            x = mkx()
            z = torch.randn_like(x) if with_res else None
            for label, mk in cases(x).items():
                def call(fused, s, mk=mk):
                    kw = dict(input=x, running_mean=s["rm"], running_var=s["rv"], weight=s["w"], bias=s["b"],
                              training=True, momentum=0.1, eps=1e-5, residual=z)
                    kw.update(mk(s))
                    if fused:
                        return fastbn.batch_norm(kw.pop("input"), num_batches_tracked=s["nbt"], activation=act, **kw)
                    res = kw.pop("residual")
                    y = F.batch_norm(kw.pop("input"), **kw)
                    y = y if res is None else y + res
                    return y if act is None else F.relu(y)
                label = f"[{xname} act={act} res={int(with_res)}] {label}"
                if run(label, lambda s: call(False, s), lambda s: call(True, s), flagged_only=True):
                    FLAGS.append(label)
print("flagged:", len(FLAGS))
