# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: module forward reading _parameters/_buffers vs parametrize / weight_norm hooks."""
import copy
import pickle

import torch
from torch.nn.utils import parametrize

import fastbn

torch.manual_seed(0)
x = torch.randn(4, 3, 5, 5)

def pair():
    t = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        t.weight.uniform_(0.5, 2); t.bias.uniform_(-1, 1)
    f = fastbn.BatchNorm2d(3)
    f.load_state_dict(t.state_dict())
    return t, f

class Double(torch.nn.Module):
    def forward(self, w):
        return w * 2

# 1. parametrize on weight
t, f = pair()
parametrize.register_parametrization(t, "weight", Double())
parametrize.register_parametrization(f, "weight", Double())
print("parametrize weight:", (t(x) - f(x)).abs().max().item())

# 2. old-style weight_norm-like hook: deletes Parameter, sets plain attribute in pre-hook
def wn(m):
    g = m.weight
    del m._parameters["weight"]
    m.register_parameter("weight_g", torch.nn.Parameter(g.detach().clone()))
    def hook(mod, inp):
        mod.weight = mod.weight_g * 3
    m.register_forward_pre_hook(hook)
    hook(m, None)
t, f = pair(); wn(t); wn(f)
print("weight_norm-like hook:", (t(x) - f(x)).abs().max().item())

# 3. torch.func.functional_call
t, f = pair()
p = {"weight": torch.full((3,), 2.0), "bias": torch.full((3,), 0.5),
     "running_mean": torch.zeros(3), "running_var": torch.ones(3),
     "num_batches_tracked": torch.tensor(0)}
pt = {k: v.clone() for k, v in p.items()}; pf = {k: v.clone() for k, v in p.items()}
yt = torch.func.functional_call(t, pt, (x,)); yf = torch.func.functional_call(f, pf, (x,))
print("functional_call:", (yt - yf).abs().max().item(), (pt["running_mean"] - pf["running_mean"]).abs().max().item(), pt["num_batches_tracked"].item(), pf["num_batches_tracked"].item())

# 4. register_buffer None running stats
t, f = pair()
for m in (t, f):
    m.register_buffer("running_mean", None); m.register_buffer("running_var", None)
print("None stats train:", (t(x) - f(x)).abs().max().item())
t.eval(); f.eval()
print("None stats eval:", (t(x) - f(x)).abs().max().item())

# 5. momentum None, track False, affine False
for kw in ({"momentum": None}, {"track_running_stats": False}, {"affine": False}):
    t = torch.nn.BatchNorm2d(3, **kw); f = fastbn.BatchNorm2d(3, **kw)
    for _ in range(3):
        d = (t(x) - f(x)).abs().max().item()
    sd = max(((a.float() - b.float()).abs().max().item() for a, b in zip(t.state_dict().values(), f.state_dict().values())), default=0)
    t.eval(); f.eval()
    print(kw, d, sd, (t(x) - f(x)).abs().max().item())

# 6. deepcopy / pickle / to / half / channels_last
t, f = pair(); t(x); f(x)
for name, g in (("deepcopy", copy.deepcopy(f)), ("pickle", pickle.loads(pickle.dumps(f)))):
    print(name, (t(x) - g(x)).abs().max().item())
f2 = copy.deepcopy(f).double(); t2 = copy.deepcopy(t).double()
print("double", (t2(x.double()) - f2(x.double())).abs().max().item())
xl = x.to(memory_format=torch.channels_last)
f3 = copy.deepcopy(f).to(memory_format=torch.channels_last); t3 = copy.deepcopy(t)
print("channels_last", (t3(xl) - f3(xl)).abs().max().item())
# 7. load_state_dict strict / non-strict
f4 = fastbn.BatchNorm2d(3)
sd = t.state_dict(); del sd["num_batches_tracked"]
print(f4.load_state_dict(sd, strict=False))
# 8. replicate
try:
    r = torch.nn.parallel.replicate(f, [torch.device("cpu")] )
    print("replicate ok")
except Exception as e:
    print("replicate:", type(e).__name__, e)
