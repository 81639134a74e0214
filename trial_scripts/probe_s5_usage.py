# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe (s5): what users do with a fastbn layer's output on the CPU native route (and the
fp32 NCHW Function route as a control), against torch's BatchNorm + add + activation doing
the same: in-place ops after the forward, retain_grad, hooks, double backward, no_grad,
inference_mode, frozen params, momentum=None, track_running_stats=False, affine=False.
Each scenario prints ok, or what differs; "raises" must agree with torch's.

Usage: python trial_scripts/probe_s5_usage.py
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbn
from fastbn import cpu

torch.set_num_threads(1)
BAD = []

LAYOUTS = {  # name: (shape, memory format or None, x dtype)
    "fp32-cl": ((3, 5, 4, 6), torch.channels_last, torch.float32),
    "fp32-2d": ((7, 5), None, torch.float32),
    "fp32-cl3d": ((2, 5, 3, 4, 2), torch.channels_last_3d, torch.float32),
    "bf16-nchw": ((3, 5, 4, 6), None, torch.bfloat16),
    "bf16-cl": ((3, 5, 4, 6), torch.channels_last, torch.bfloat16),
    "fp32-nchw(control)": ((3, 5, 4, 6), None, torch.float32),
}
ACTS = (None, "relu", "leaky_relu")


def make(layout, act, residual, **kw):
    shape, fmt, dtype = LAYOUTS[layout]
    cls = {2: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[len(shape)]
    tcls = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    torch.manual_seed(1)
    fb = cls(shape[1], activation=act, negative_slope=0.1, **kw)
    tb = tcls(shape[1], **kw)
    if fb.weight is not None:
        with torch.no_grad():
            fb.weight.uniform_(0.5, 1.5); fb.bias.uniform_(-0.5, 0.5)
    tb.load_state_dict(fb.state_dict())
    x = torch.randn(shape).mul_(2).add_(0.3)
    z = torch.randn(shape) if residual else None
    if fmt is not None:
        x = x.to(memory_format=fmt)
        z = None if z is None else z.to(memory_format=fmt)
    x = x.to(dtype)
    z = None if z is None else z.to(dtype)

    def tfwd(inp, res=None):
        y = tb(inp)
        if res is not None:
            y = y + res
        if act == "relu":
            y = F.relu(y)
        elif act == "leaky_relu":
            y = F.leaky_relu(y, 0.1)
        return y

    def ffwd(inp, res=None):
        return fb(inp, res)

    return fb, tb, ffwd, tfwd, x, z


def route(fb, x, act):
    return cpu.serves_natively(x, fb.running_mean, fb.running_var, fb.weight, fb.bias, act or "none", 0.1)


def close(a, b, dtype):
    if a is None or b is None:
        return a is None and b is None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def scenario(name, body, layouts=LAYOUTS, acts=ACTS, residuals=(False, True), **kw):
    for layout in layouts:
        for act in acts:
            for residual in residuals:
                fb, tb, ffwd, tfwd, x, z = make(layout, act, residual, **kw)
                native = route(fb, x, act)
                res = {}
                for tag, fwd, mod in (("torch", tfwd, tb), ("fastbn", ffwd, fb)):
                    xi = x.clone().requires_grad_(True)
                    zi = None if z is None else z.clone().requires_grad_(True)
                    try:
                        res[tag] = body(fwd, mod, xi, zi)
                    except Exception as e:  # noqa: BLE001
                        res[tag] = f"raises {type(e).__name__}: {str(e)[:160]}"
                    res[tag + "_state"] = [t.clone() for t in mod.buffers()]
                t, f = res["torch"], res["fastbn"]
                ok = True
                why = ""
                if isinstance(t, str) or isinstance(f, str):
                    ok = isinstance(t, str) == isinstance(f, str)
                    why = f"torch: {t if isinstance(t, str) else 'ok'} | fastbn: {f if isinstance(f, str) else 'ok'}"
                else:
                    for i, (a, b) in enumerate(zip(f, t)):
                        if not close(a, b, x.dtype):
                            ok = False
                            why += f" item{i}" + ("" if a is None or b is None else f" maxdiff {(a.float()-b.float()).abs().max().item():.3g}")
                for a, b in zip(res["fastbn_state"], res["torch_state"]):
                    if not close(a.float(), b.float(), torch.float32):
                        ok = False; why += " buffers differ"
                tag = f"{name:28s} {layout:18s} act={str(act):10s} res={int(residual)} native={int(native)}"
                if not ok:
                    BAD.append(tag)
                    print(f"{tag}: BAD {why}", flush=True)
    print(f"{name}: done", flush=True)


def grads(*ts):
    return [None if t is None else t.grad for t in ts]


def plain(fwd, mod, x, z):
    y = fwd(x, z)
    y.float().pow(2).sum().backward()
    return [y, *grads(x, z, mod.weight, mod.bias)]


def iadd_after(fwd, mod, x, z):
    y = fwd(x, z)
    y += 1
    y.float().pow(2).sum().backward()
    return [y, *grads(x, z, mod.weight, mod.bias)]


def inplace_relu_after(fwd, mod, x, z):
    y = nn.ReLU(inplace=True)(fwd(x, z))
    y.float().pow(2).sum().backward()
    return [y, *grads(x, z, mod.weight, mod.bias)]


def mul_after(fwd, mod, x, z):
    y = fwd(x, z)
    y.mul_(2)
    y.float().pow(2).sum().backward()
    return [y, *grads(x, z, mod.weight, mod.bias)]


def retain(fwd, mod, x, z):
    y = fwd(x, z)
    y.retain_grad()
    (y.float() * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    return [y, y.grad, *grads(x, z, mod.weight, mod.bias)]


def tensor_hook(fwd, mod, x, z):
    y = fwd(x, z)
    seen = []
    y.register_hook(lambda g: (seen.append(g.clone()), g * 3)[1])
    y.float().pow(2).sum().backward()
    return [y, seen[0], *grads(x, z, mod.weight, mod.bias)]


def module_hooks(fwd, mod, x, z):
    seen = []
    hs = [mod.register_forward_pre_hook(lambda m, a: seen.append("pre")),
          mod.register_forward_hook(lambda m, a, o: o * 2),
          mod.register_full_backward_hook(lambda m, gi, go: (seen.append(go[0].clone()), None)[1])]
    try:
        # torch: hooks on the BN module itself, then add/act outside; fastbn: the fused module.
        # So compare only the no-residual, no-activation case fully; others: no exception.
        y = fwd(x, z)
        y.float().pow(2).sum().backward()
    finally:
        for h in hs:
            h.remove()
    return [y, *grads(x, z, mod.weight, mod.bias)]


def double_backward(fwd, mod, x, z):
    y = fwd(x, z)
    w = torch.arange(y.numel()).reshape(y.shape).float().cos().to(y.dtype)
    gx, = torch.autograd.grad((y * w).float().pow(2).sum(), x, create_graph=True)
    gx.float().pow(2).sum().backward()
    return [y, gx, *grads(z, mod.weight, mod.bias)]


def no_grad(fwd, mod, x, z):
    with torch.no_grad():
        y = fwd(x, z)
    return [y]


def inference(fwd, mod, x, z):
    with torch.inference_mode():
        y = fwd(x, z)
    return [y.clone()]


def input_no_grad(fwd, mod, x, z):
    x = x.detach()
    y = fwd(x, None if z is None else z.detach())
    y.float().pow(2).sum().backward()
    return [y, *grads(mod.weight, mod.bias)]


def frozen(fwd, mod, x, z):
    for p in mod.parameters():
        p.requires_grad_(False)
    y = fwd(x, z)
    y.float().pow(2).sum().backward()
    return [y, *grads(x, z)]


def steps_then_eval(fwd, mod, x, z):
    outs = []
    for i in range(3):
        y = fwd(x * (i + 1), z)
        y.float().sum().backward()
        outs.append(y)
    mod.eval()
    with torch.no_grad():
        outs.append(fwd(x, z))
    mod.train()
    return outs


if __name__ == "__main__":
    scenario("plain", plain)
    scenario("x += 1 after", iadd_after)
    scenario("y.mul_(2) after", mul_after)
    scenario("ReLU(inplace) after", inplace_relu_after)
    scenario("retain_grad", retain)
    scenario("register_hook", tensor_hook)
    scenario("module hooks", module_hooks, acts=(None,), residuals=(False,))
    scenario("create_graph double bwd", double_backward)
    scenario("no_grad", no_grad)
    scenario("inference_mode", inference)
    scenario("x requires_grad False", input_no_grad)
    scenario("frozen params", frozen)
    scenario("3 steps + eval", steps_then_eval)
    scenario("momentum None", steps_then_eval, momentum=None)
    scenario("track_running_stats False", steps_then_eval, track_running_stats=False)
    scenario("affine False", plain, affine=False)
    print("BAD:", len(BAD))
