"""torch.compile(fullgraph=True) of a fastbn model: no graph breaks, the same results as eager.

Each compiled graph costs ~15 s on two CPU cores, so there are three: training with
momentum 0.1, training with momentum=None (the 1 / num_batches_tracked factor read on the
device), and eval. They run on the default backend ("auto": the kernels on CUDA, else the
PyTorch implementation).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import ON_GPU
from helpers import assert_matches, make_input

import fastbn

SHAPE = (4, 2, 6, 6)


def conv_bn_relu(device, momentum=0.1) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        fastbn.BatchNorm2d(3, momentum=momentum),
        torch.nn.ReLU(),
    ).to(device)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def train_step(model, run, x, grad_out):
    """One step of run (model or its compiled form): output, input grad, parameter grads."""
    model.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y = run(leaf)
    y.backward(grad_out)
    return {
        "output": y.detach(), "input grad": leaf.grad, "conv weight grad": model[0].weight.grad,
        "bn weight grad": model[1].weight.grad, "bn bias grad": model[1].bias.grad,
    }


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_none"])
def test_compiled_training_matches_eager(device, momentum):
    eager = conv_bn_relu(device, momentum)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = make_input(SHAPE, seed=step, device=device)
        grad_out = make_input((4, 3, 6, 6), seed=10 + step, device=device)
        expected = train_step(eager, eager, x, grad_out)
        actual = train_step(compiled_model, compiled, x, grad_out)
        for name, value in expected.items():
            assert_matches(f"step {step} {name}", actual[name], value)
    for name in ("running_mean", "running_var"):
        assert_matches(name, getattr(compiled_model[1], name), getattr(eager[1], name))
    assert int(compiled_model[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 2


def test_compiled_eval_matches_eager(device):
    eager = conv_bn_relu(device)
    with torch.no_grad():
        eager[1].running_mean.uniform_(-0.5, 0.5)
        eager[1].running_var.uniform_(0.5, 1.5)
    eager.eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = make_input(SHAPE, device=device)
    with torch.no_grad():
        assert_matches("output", compiled(x), eager(x))


FIRST_CALL_COMPILED = """
import os, sys
if not {on_gpu}:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    from triton_compat import patch_interpreter_index  # as conftest does

    patch_interpreter_index()
import torch, fastbn, fastbn.backend
assert fastbn.backend._triton_problem is None  # nothing has probed the kernels yet
bn = fastbn.BatchNorm2d(3).to("{device}")
x = torch.randn(2, 3, 4, 4, device="{device}", requires_grad=True)
with {choice}:
    y = torch.compile(bn, fullgraph=True, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
torch_bn = torch.nn.BatchNorm2d(3).to("{device}")
expected = torch_bn(x)
torch.testing.assert_close(y, expected)
torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])
torch.testing.assert_close(bn.running_var, torch_bn.running_var)
print("ok")
"""


@pytest.mark.parametrize("choice", ['fastbn.use_backend("triton")', "contextlib.nullcontext()"],
                         ids=["use_backend", "default_backend"])
def test_first_fastbn_call_may_be_inside_a_compiled_region(device, choice):
    """The backend probe (can the kernels run?) runs when dynamo first meets a call, not
    through a traced import, and FASTBN_BACKEND was read at import, so a model compiled
    (fullgraph) before any eager call still compiles: a training step, its backward and
    running statistics as torch's."""
    code = "import contextlib\n" + FIRST_CALL_COMPILED.format(
        on_gpu=ON_GPU, device=device, choice=choice,
        tests=os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTBN_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
