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

C = 3
INPUTS = {
    "fp32-cl": lambda: torch.randn(4, C, 5, 6).to(memory_format=torch.channels_last),
    "fp32-2d": lambda: torch.randn(9, C),
    "bf16-nchw": lambda: torch.randn(4, C, 5, 6).bfloat16(),
}
FLAGS = []


def state():
    return dict(rm=torch.zeros(C), rv=torch.ones(C), w=torch.nn.Parameter(torch.ones(C)),
                b=torch.nn.Parameter(torch.zeros(C)), nbt=torch.tensor(0))


def run(label, fn_t, fn_f):
    out = []
    for fn in (fn_t, fn_f):
        s = state()
        snap = {k: (v.detach().clone(), v._version) for k, v in s.items()}
        try:
            fn(s); res = "ok"
        except Exception as e:
            res = f"{type(e).__name__}: {str(e)[:110]}"
        changed = [k for k, v in s.items() if v._version != snap[k][1] or not torch.equal(v.detach(), snap[k][0])]
        out.append((res, changed))
    (rt, ct), (rf, cf) = out
    flag = "" if (rt.split(":")[0] == rf.split(":")[0]) else "  <-- TYPE DIFFERS"
    if rf != "ok" and cf:
        flag += "  <-- STATE CHANGED ON ERROR"
    if flag:
        FLAGS.append(label)
        print(f"{label}\n   torch : {rt} changed={ct}\n   fastbn: {rf} changed={cf}{flag}")


def cases(x):
    shape = x.shape
    return {
        "rm wrong shape": lambda s: dict(running_mean=torch.zeros(C + 1)),
        "weight wrong shape": lambda s: dict(weight=torch.ones(C + 1)),
        "weight int dtype": lambda s: dict(weight=torch.ones(C, dtype=torch.int64)),
        "rm fp64": lambda s: dict(running_mean=torch.zeros(C, dtype=torch.float64)),
        "rm aliasing rv": lambda s: dict(running_var=s["rm"]),
        "rm expanded (stride 0)": lambda s: dict(running_mean=torch.zeros(1).expand(C)),
        "rm non-contiguous view": lambda s: dict(running_mean=torch.zeros(2 * C)[::2]),
        "rm requires_grad": lambda s: dict(running_mean=torch.zeros(C, requires_grad=True)),
        "rm inference tensor": lambda s: dict(running_mean=inference_zeros()),
        "weight inference tensor": lambda s: dict(weight=inference_ones()),
        "eps negative": lambda s: dict(eps=-1.0),
        "momentum str": lambda s: dict(momentum="0.1"),
        "momentum tensor": lambda s: dict(momentum=torch.tensor(0.1)),
        "eps tensor": lambda s: dict(eps=torch.tensor(1e-5)),
        "input N=1 S=1": lambda s: dict(input=torch.randn(1, C, *[1] * (len(shape) - 2)).to(x.dtype)),
        "input meta": lambda s: dict(input=x.to("meta")),
        "rm on meta": lambda s: dict(running_mean=torch.zeros(C, device="meta")),
        "weight list": lambda s: dict(weight=[1.0, 1.0, 1.0]),
        "rm only, rv None": lambda s: dict(running_var=None),
        "training int 1": lambda s: dict(training=1),
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
                run(f"[{xname} act={act} res={int(with_res)}] {label}", lambda s: call(False, s), lambda s: call(True, s))
print("flagged:", len(FLAGS))
