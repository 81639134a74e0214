"""Bugs found by the s5 new-user trial of the CPU path (each test is a bug report: it fails
until the bug is fixed).

1. A fused leaky_relu's output may be modified in place before the backward, as torch's
   F.leaky_relu's may (its backward saves the input, not the output). The CPU native route
   applies leaky_relu_ in place, whose autograd node saves the output, so `y.mul_(2)`,
   `y += 1` or an `nn.ReLU(inplace=True)` after the layer makes the backward raise "one of
   the variables needed for gradient computation has been modified by an inplace
   operation"; fp32 NCHW (the autograd-Function route) runs.
2. The same through fastbn.convert: conv -> BatchNorm2d -> LeakyReLU in an nn.Sequential,
   then `out += x`, trains as torch's model does (channels_last: the native route).
3. fuse="graph" rewrites `out = bn(conv(x)); out += x` into `bn(conv(x), residual=x)`:
   torch.fx records `+=` as `+`, so under autocast a float32 x now promotes the block's
   output to float32, where torch's in-place add keeps out's bfloat16.
4. An inference-tensor running_mean in a training call: the refusal comes after
   num_batches_tracked was incremented (both CPU routes).
5. Under torch.utils.checkpoint(use_reentrant=False) the native route without activation
   updates the running statistics and counter once where torch's BatchNorm does twice.
6. channels_last x, a contiguous (NCHW) output gradient: torch.compile's gradients differ
   from eager's by rounding where the eager backward is not the native route's (float16 /
   bfloat16 leaky_relu; the exact path at large mean), since its sums follow g's format.
7. Batched gradients (is_grads_batched=True, jacobian(vectorize=True)) of a channels_last
   native call raise a vmap copy_ error in the native route's gradient-format pre-hook.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DEVICE
from convert_models import InputResidual
from helpers import assert_close_to_truth, batch_norm_truth, grads_truth, make_input, tolerance
from torch.utils.checkpoint import checkpoint

import fastbn

# (shape, channels_last, dtype of x; the per-channel tensors are float32): the CPU native
# route's cases (channels innermost in float32, bfloat16 any layout), then fp32 NCHW.
NATIVE_CASES = [
    ((3, 5, 4, 6), True, torch.float32),
    ((7, 5), False, torch.float32),
    ((2, 5, 3, 4, 2), True, torch.float32),
    ((3, 5, 4, 6), False, torch.bfloat16),
    ((3, 5, 4, 6), False, torch.float32),
]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("shape", "channels_last", "dtype"), NATIVE_CASES, ids=str)
def test_fused_leaky_relu_output_may_be_modified_in_place_before_backward(
    shape, channels_last, dtype, residual
):
    """y = leaky_relu(BN(x) + z); y.mul_(2); the backward gives the gradients of 2 * y."""
    x = make_input(shape, dtype, channels_last=channels_last, offset=0.3).requires_grad_(True)
    z = make_input(shape, dtype, seed=3, channels_last=channels_last) if residual else None
    channels = shape[1]
    weight = torch.linspace(0.5, 1.5, channels, device=DEVICE).requires_grad_(True)
    bias = torch.linspace(-0.3, 0.3, channels, device=DEVICE).requires_grad_(True)
    running_mean = torch.zeros(channels, device=DEVICE)
    running_var = torch.ones(channels, device=DEVICE)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, True, residual=z,
                             activation="leaky_relu", negative_slope=0.1)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, True, residual=z,
                          activation="leaky_relu", negative_slope=0.1)
    y.mul_(2)
    grad_out = make_input(shape, dtype, seed=7, channels_last=channels_last,
                          scaled_channels=False)
    grads = torch.autograd.grad(y, [x, weight, bias], grad_out)
    expected = grads_truth(truth, 2 * grad_out.double())
    assert_close_to_truth("output", y, 2 * truth["y"])
    for name, grad in zip(("x", "weight", "bias"), grads, strict=True):
        assert_close_to_truth(f"grad {name}", grad, expected[name], dtype=dtype)


class LeakyResidual(nn.Module):
    """A darknet/CSP-style block: conv -> BN -> LeakyReLU in a Sequential, then `out += x`."""

    def __init__(self, channels=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.LeakyReLU(0.1))

    def forward(self, x):
        out = self.body(x)
        out += x
        return out


@pytest.mark.parametrize("fuse", ["safe", "graph"])
def test_converted_bn_leaky_relu_then_in_place_add_trains_like_torch(fuse):
    torch.manual_seed(0)
    model = LeakyResidual().to(DEVICE).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    converted = fastbn.convert(model, fuse=fuse)
    x = make_input((2, 4, 5, 5), channels_last=True)
    converted(x).square().sum().backward()
    reference(x).square().sum().backward()
    atol, rtol = tolerance(torch.float32)
    for (name, p), q in zip(reference.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=name)


class InPlaceInputResidual(InputResidual):
    """torchvision's `out += identity` with the block's own (float32) input as identity."""

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return F.relu(out)


@pytest.mark.xfail(strict=True, reason=(
    "known limit (README Limits): torch.fx records `out += x` as `out + x`, so fuse='graph' "
    "fuses it as a residual that promotes the output's dtype under autocast"))
@pytest.mark.parametrize("training", [True, False])
def test_graph_fused_in_place_add_keeps_the_outputs_dtype_under_autocast(training):
    torch.manual_seed(0)
    model = InPlaceInputResidual().to(DEVICE).train(training)
    reference = copy.deepcopy(model)
    converted = fastbn.convert(model, fuse="graph")
    x = make_input((2, 4, 6, 6))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        output, expected = converted(x), reference(x)
    assert expected.dtype == torch.bfloat16
    assert output.dtype == expected.dtype
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(output, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_refused_inference_tensor_running_mean_leaves_the_counter_unchanged(channels_last):
    """A running_mean made under torch.inference_mode cannot be updated in place outside it:
    the training call raises torch's RuntimeError (as F.batch_norm does with a weight that
    requires grad) before anything changes, num_batches_tracked included."""
    x = make_input((4, 3, 5, 6), channels_last=channels_last)
    with torch.inference_mode():
        running_mean = torch.zeros(3, device=DEVICE)
    running_var = torch.ones(3, device=DEVICE)
    num_batches_tracked = torch.tensor(0, device=DEVICE)
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, running_mean, running_var.clone(), weight, None, True)
    with pytest.raises(RuntimeError):
        fastbn.batch_norm(x, running_mean, running_var, weight, None, True,
                          num_batches_tracked=num_batches_tracked)
    assert num_batches_tracked.item() == 0
    assert torch.equal(running_var, torch.ones(3, device=DEVICE))


_EARLY_STOP = ("known limit (README Limits): the native route updates the running statistics "
               "after torch.native_batch_norm saved its tensors, where the non-reentrant "
               "checkpoint's recomputation stops early: once, not twice as torch's BatchNorm")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("shape", "channels_last", "native_planes_max"), [
    pytest.param((3, 4, 5, 6), True, None,
                 marks=pytest.mark.xfail(strict=True, reason=_EARLY_STOP)),
    pytest.param((9, 4), False, None, marks=pytest.mark.xfail(strict=True, reason=_EARLY_STOP)),
    pytest.param((3, 4, 5, 6), False, None,
                 marks=pytest.mark.xfail(strict=True, reason=_EARLY_STOP)),
    ((3, 4, 5, 6), False, 0)], ids=str)
def test_non_reentrant_checkpoint_updates_the_running_statistics_as_torchs_does(
    shape, channels_last, native_planes_max, residual, monkeypatch
):
    """torch.utils.checkpoint(use_reentrant=False) runs the forward again in the backward;
    torch's BatchNorm updates its running statistics and counter in both runs. The CPU
    native route (channels_last, 2-D, and float32 NCHW up to NATIVE_PLANES_MAX elements)
    updates them after torch.native_batch_norm has saved its tensors, so the
    recomputation, which stops as soon as every saved tensor is back, stops before the
    update: once, not twice (with relu, whose output is saved last, twice). A float32 NCHW
    call on the eager Function (NATIVE_PLANES_MAX at 0, as for a larger tensor) updates
    them twice, as torch does."""
    if native_planes_max is not None:
        monkeypatch.setattr(fastbn.cpu, "NATIVE_PLANES_MAX", native_planes_max)
    cls = fastbn.BatchNorm2d if len(shape) == 4 else fastbn.BatchNorm1d
    torch_cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    layer, reference = cls(4).to(DEVICE), torch_cls(4).to(DEVICE)
    x = make_input(shape, channels_last=channels_last, offset=0.5).requires_grad_(True)
    z = make_input(shape, seed=2, channels_last=channels_last) if residual else None

    def fastbn_forward(t):
        return layer(t, z)

    def torch_forward(t):
        y = reference(t)
        return y if z is None else y + z

    checkpoint(fastbn_forward, x, use_reentrant=False).sum().backward()
    checkpoint(torch_forward, x, use_reentrant=False).sum().backward()
    assert layer.num_batches_tracked.item() == reference.num_batches_tracked.item() == 2
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.running_var, reference.running_var, atol=atol, rtol=rtol)


# (dtype, activation, offset): the eager calls on channels_last x whose backward takes g in
# x's format: float16 leaky_relu (not served natively; low precision converts), float32 at
# mean 1e4 (the rule sends it to the exact path, whose float64 formulas lose nothing by the
# conversion); then a native float32 relu call, whose relu backward hands the BatchNorm
# kernel x's format. (A float32 call on the fast path without relu takes g as it comes, as
# torch's own layer does, for torch's precision: its compiled gradients then differ from
# eager by rounding, as torch's own compiled layer's do; tests/test_cpu_path.py.)
FORMAT_CASES = [(torch.float16, "leaky_relu", 0.0), (torch.float32, None, 1e4),
                (torch.float32, "relu", 1e4), (torch.float32, "relu", 0.0)]


@pytest.mark.parametrize(("dtype", "activation", "offset"), FORMAT_CASES, ids=str)
def test_compiled_gradients_equal_eager_for_an_nchw_gradient_of_a_channels_last_output(
    dtype, activation, offset
):
    """y = BN(x) for a channels_last x, y.backward(g) with g contiguous (NCHW): torch.compile
    (fullgraph) gives eager's bits. AOTAutograd hands the compiled backward g in y's format
    (channels_last); the eager backward of these calls sums in g's own format, so the
    weight, bias (and x) gradients differ by rounding unless the backward takes g in x's
    format (see FORMAT_CASES)."""

    def step(fn):
        x = make_input((2, 3, 4, 5), dtype, channels_last=True, offset=offset)
        x.requires_grad_(True)
        weight = torch.linspace(0.5, 1.5, 3, device=DEVICE).requires_grad_(True)
        bias = torch.linspace(-0.3, 0.3, 3, device=DEVICE).requires_grad_(True)
        y = fn(x, weight, bias)
        grad_out = make_input(y.shape, dtype, seed=4, scaled_channels=False)  # contiguous
        return [y, *torch.autograd.grad(y, [x, weight, bias], grad_out)]

    def call(x, weight, bias):
        return fastbn.batch_norm(x, None, None, weight, bias, True, activation=activation,
                                 negative_slope=0.1)

    eager = step(call)
    compiled = step(torch.compile(call, backend="aot_eager", fullgraph=True))
    for name, mine, theirs in zip(("output", "x", "weight", "bias"), eager, compiled,
                                  strict=True):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(2, 3, 2, 4), (2, 3, 2, 2, 3)], ids=str)
def test_batched_gradients_of_a_channels_last_call_equal_torchs(shape, activation):
    """autograd.grad(..., is_grads_batched=True) (what jacobian(vectorize=True) and hessian
    run) vmaps the backward over a batch of output gradients. On the CPU native route the
    pre-hook that hands the node its gradient in x's format copies the batched gradient
    into an unbatched empty_like(x) (reference.like_input's copy_), which vmap refuses."""
    x = make_input(shape, channels_last=True).requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, 3, device=DEVICE)
    grads_out = torch.stack([make_input(shape, seed=s, scaled_channels=False) for s in (3, 4)])
    y = fastbn.batch_norm(x, None, None, weight, None, True, activation=activation)
    expected_y = F.batch_norm(x, None, None, weight, None, True)
    if activation == "relu":
        expected_y = F.relu(expected_y)
    grads, = torch.autograd.grad(y, x, grads_out, is_grads_batched=True)
    expected, = torch.autograd.grad(expected_y, x, grads_out, is_grads_batched=True)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(grads, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inference_input_needed_for_the_backward_raises_before_any_update(
    channels_last, activation
):
    """An input made under torch.inference_mode, with a weight that requires grad, in
    training outside it: torch's BatchNorm cannot save the input for the backward and
    raises RuntimeError with nothing changed; so does fastbn's, on every route."""
    with torch.inference_mode():
        x = make_input((4, 3, 5, 6), channels_last=channels_last)
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    running_mean, running_var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    num_batches_tracked = torch.tensor(0, device=DEVICE)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, None, True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        fastbn.batch_norm(x, running_mean, running_var, weight, None, True,
                          activation=activation, num_batches_tracked=num_batches_tracked)
    assert num_batches_tracked.item() == 0
    assert torch.equal(running_mean, torch.zeros(3, device=DEVICE))
    assert torch.equal(running_var, torch.ones(3, device=DEVICE))
