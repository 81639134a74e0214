# ruff: noqa  (a throwaway repro script of the trial, not library code)
"""Probe: real-model-shaped blocks, fastbn.convert at each fuse level vs the torch model.

Usage: python trial_scripts/probe_models.py [torch|triton]  (triton: interpreter, tiny shapes)
"""
import copy
import os
import sys
import warnings

BACKEND = sys.argv[1] if len(sys.argv) > 1 else "torch"
if BACKEND == "triton":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from convert_models import BasicBlock  # noqa: E402  (torchvision's shape)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fastbn  # noqa: E402



def Basic(cin, cout, stride=1, downsample=None):  # noqa: N802
    return BasicBlock(cin, cout, stride, downsample)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


class InvRes(nn.Module):
    def __init__(self, cin, cout, expand, act):
        super().__init__()
        hid = cin * expand
        self.use_res = cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), act(inplace=True),
            nn.Conv2d(hid, hid, 3, 1, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), act(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 4)
        self.bn2 = nn.BatchNorm1d(4, momentum=None)

    def forward(self, x):
        return self.bn2(self.fc2(self.act(self.bn1(self.fc1(x)))))


class Seq1d(nn.Module):  # (N, C, L)
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.SiLU(),
                                  nn.Conv1d(6, 6, 3, padding=1), nn.BatchNorm1d(6, affine=False))

    def forward(self, x):
        return self.body(x)


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv3d(4, 3, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(3, track_running_stats=False)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def resnetish():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        Basic(4, 4),
        Basic(4, 8, 2, nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))),
        Bottleneck(8, 2),
        Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


MODELS = {
    "resnet": (resnetish, (4, 3, 8, 8)),
    "mobilenet_relu6": (lambda: nn.Sequential(InvRes(3, 3, 2, nn.ReLU6), InvRes(3, 4, 2, nn.Hardswish)),
                        (4, 3, 6, 6)),
    "mlp": (MLP, (5, 6)),
    "seq1d": (Seq1d, (3, 3, 7)),
    "video": (Video, (2, 3, 3, 4, 4)),
}


def compare(tag, a, b, tol):
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    bad = d > tol * max(1.0, b.abs().max().item())
    if bad:
        print(f"   MISMATCH {tag}: {d:.3g}")
    return bad


def check(name, fuse, channels_last=False):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    ref = make()
    model = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = fastbn.convert(model, fuse=fuse)
    msgs = [str(x.message)[:120] for x in w]
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bad = False
    tol = 1e-4
    for step in range(3):
        for m, o in ((ref, opt_r), (model, opt_m)):
            o.zero_grad()
            out = m(x)
            out.pow(2).mean().backward()
            o.step()
            m._last = out.detach()
        bad |= compare(f"step{step} out", model._last, ref._last, tol)
    for (n, p), (_, q) in zip(ref.named_parameters(), fastbn.revert(copy.deepcopy(model)).named_parameters()):
        bad |= compare(f"param {n}", q.detach(), p.detach(), tol)
    sr, sm = ref.state_dict(), fastbn.revert(copy.deepcopy(model)).state_dict()
    if list(sr) != list(sm):
        print("   state_dict keys differ", set(sr) ^ set(sm)); bad = True
    for k in sr:
        if k in sm:
            bad |= compare(f"buf {k}", sm[k].float(), sr[k].float(), tol)
    ref.eval(); model.eval()
    with torch.no_grad():
        bad |= compare("eval", model(x), ref(x), tol)
    print(f"{name:16s} fuse={fuse:5s} cl={channels_last:d}: {'BAD' if bad else 'ok'} {msgs if msgs else ''}")
    return model, ref, x


if __name__ == "__main__":
    with fastbn.use_backend(BACKEND):
        for name in MODELS:
            for fuse in ("none", "safe", "graph"):
                check(name, fuse)
            check(name, "graph", channels_last=True)
