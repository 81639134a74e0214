"""The custom ops: the boundary torch.compile, export and tensor subclasses see.

Eager calls on plain tensors skip the dispatcher (``ops.direct``); everything else goes
through the ops. Both routes must give identical results, and the ops must satisfy
torch.library.opcheck (schema, fake implementation, autograd registration).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_input

import fastbn
from fastbn import cpu, ops, reference

CASES = {
    "train": dict(training=True),
    "eval": dict(training=False),
    "train_relu_residual": dict(training=True, activation="relu", residual=True),
    "train_silu_residual": dict(training=True, activation="silu", residual=True),
    "eval_leaky_relu_residual": dict(training=False, activation="leaky_relu", residual=True),
    "train_no_affine_channels_last": dict(training=True, affine=False, channels_last=True),
    "train_bf16_residual": dict(training=True, residual=True, dtype=torch.bfloat16),
    "train_bf16_channels_last_nchw_grad": dict(training=True, channels_last=True,
                                               dtype=torch.bfloat16, grad_channels_last=False),
    "train_momentum_none_channels_last": dict(training=True, channels_last=True, momentum=None),
}


def run(device, training, activation=None, residual=False, affine=True, channels_last=False,
        dtype=torch.float32, grad_channels_last=None, momentum=0.1):
    """Output, gradients and running statistics of one fastbn.batch_norm call (grad_out in
    x's memory format unless grad_channels_last says otherwise)."""
    x = make_input((3, 4, 5, 6), dtype, seed=1, channels_last=channels_last, device=device)
    leaves = {"x": x.requires_grad_(True)}
    if affine:
        leaves["weight"] = torch.linspace(0.5, 1.5, 4, device=device).requires_grad_(True)
        leaves["bias"] = torch.linspace(-0.2, 0.2, 4, device=device).requires_grad_(True)
    if residual:
        leaves["residual"] = make_input((3, 4, 5, 6), dtype, seed=2,
                                        channels_last=channels_last,
                                        device=device).requires_grad_(True)
    running_mean = torch.full((4,), 0.1, device=device)
    running_var = torch.full((4,), 1.5, device=device)
    steps = torch.tensor(3, device=device)
    y = fastbn.batch_norm(
        leaves["x"], running_mean, running_var, leaves.get("weight"), leaves.get("bias"),
        training, momentum, 1e-5, residual=leaves.get("residual"), activation=activation,
        num_batches_tracked=steps,
    )
    grad_format = channels_last if grad_channels_last is None else grad_channels_last
    grad_out = make_input(y.shape, dtype, seed=3, channels_last=grad_format, device=device)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out)
    return [y, *grads, running_mean, running_var, steps]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_eager_route_equals_the_custom_op_route(backend, device, case, monkeypatch):
    eager = run(device, **case)
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    through_ops = run(device, **case)
    for mine, theirs in zip(eager, through_ops, strict=True):
        assert torch.equal(mine, theirs)


def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not():
    x = torch.ones(2, 3)
    assert ops.direct(x)
    assert not ops.direct(torch.nn.Parameter(x))  # a subclass: through the op
    with torch._subclasses.FakeTensorMode():
        assert not ops.direct(torch.ones(2, 3))


@pytest.mark.parametrize("activation,save_mask", [("none", False), ("relu", True),
                                                  ("hardswish", False)])
def test_ops_pass_opcheck(backend, device, activation, save_mask):
    x = make_input((3, 4, 5, 5), torch.float64, device=device)
    residual = make_input((3, 4, 5, 5), torch.float64, seed=1, device=device)
    weight = torch.rand(4, dtype=torch.float64, device=device)
    bias = torch.rand(4, dtype=torch.float64, device=device)
    running_mean = torch.zeros(4, dtype=torch.float64, device=device)
    running_var = torch.ones(4, dtype=torch.float64, device=device)
    stats_args = (x, running_mean, running_var, torch.tensor(2, device=device), None, backend)
    torch.library.opcheck(ops.batch_stats_, stats_args)
    mean, var = reference.batch_mean_var(x)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, residual)]
    normalize_args = (leaves[0], mean, var, leaves[1], leaves[2], leaves[3], 1e-5, True,
                      activation, 0.01, save_mask, backend)
    torch.library.opcheck(ops.normalize, normalize_args)
    _, mask = ops.normalize(*normalize_args)
    grad_out = torch.randn_like(x)
    backward_args = (grad_out, x, mean, var, weight, bias, None if save_mask else residual,
                     mask if save_mask else None, 1e-5, True, activation, 0.01,
                     [True, True, True, True], backend)
    torch.library.opcheck(ops.normalize_backward, backward_args)
    train_args = (x, running_mean, running_var, torch.tensor(2, device=device), 0.1, weight,
                  bias, residual, 1e-5, activation, 0.01, save_mask, backend)
    torch.library.opcheck(ops.batch_norm_train_, train_args)


@pytest.mark.parametrize("output_mask", [[True, False, False, False], [False, True, False, True],
                                         [False, False, True, False]],
                         ids=["input", "weight_residual", "bias"])
def test_ops_return_an_empty_tensor_for_each_output_not_computed(backend, device, output_mask):
    """The op contract: every output is a tensor, an empty one (on x's device) for a mask
    not saved and a gradient not asked for, though the Triton launchers say None for those
    (the op layer makes the tensor; eager calls skip it); opcheck holds with a partial mask."""
    x = make_input((3, 4, 5, 5), torch.float64, device=device)
    residual = make_input((3, 4, 5, 5), torch.float64, seed=1, device=device)
    weight = torch.rand(4, dtype=torch.float64, device=device)
    bias = torch.rand(4, dtype=torch.float64, device=device)
    mean, var = reference.batch_mean_var(x)
    grad_out = torch.randn_like(x)

    def assert_empty(t, dtype):
        assert isinstance(t, torch.Tensor) and t.numel() == 0
        assert t.dtype == dtype and t.device == x.device

    _, mask = ops.normalize(x, mean, var, weight, bias, residual, 1e-5, True, "relu", 0.01,
                            False, backend)
    assert_empty(mask, torch.uint8)
    *_, mask = ops.batch_norm_train_(
        x, torch.zeros_like(mean), torch.ones_like(var), torch.tensor(0, device=device), 0.1,
        weight, bias, residual, 1e-5, "relu", 0.01, False, backend)
    assert_empty(mask, torch.uint8)
    common = (grad_out, x, mean, var, weight, bias, residual, None)
    backward_args = (*common, 1e-5, True, "relu", 0.01, output_mask, backend)
    torch.library.opcheck(ops.normalize_backward, backward_args)
    for wanted, grad, like in zip(output_mask, ops.normalize_backward(*backward_args),
                                  (x, weight, bias, residual), strict=True):
        if wanted:
            assert grad.shape == like.shape
        else:
            assert_empty(grad, x.dtype)
    sums, *grads = ops.normalize_grad_sums(*common, 1e-5, "relu", 0.01, output_mask[1:3],
                                           backend)
    assert sums.shape == (2, 4)
    grad_means = sums / 75  # N * H * W values per channel
    grads = [*grads, *ops.normalize_grad_input(*common, grad_means, 1e-5, True, "relu", 0.01,
                                               [output_mask[0], output_mask[3]], backend)]
    for wanted, grad, like in zip((*output_mask[1:3], output_mask[0], output_mask[3]), grads,
                                  (weight, bias, x, residual), strict=True):
        if wanted:
            assert grad.shape == like.shape
        else:
            assert_empty(grad, x.dtype)


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient (None)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", True)])
def test_an_output_given_no_gradient_backpropagates_zero_as_through_the_op(
        activation, residual, monkeypatch):
    # The eager Functions leave gradients unmaterialized (no zero fill for the mask output):
    # y's own gradient None must still give what the op route, which materializes, gives.
    # (A call the CPU path's native route serves, a float32 NCHW tensor this small among
    # them, has torch's own autograd nodes, which raise for the unused weight as torch's
    # BatchNorm does: NATIVE_PLANES_MAX at 0 keeps this call on the eager Function.)
    monkeypatch.setattr(cpu, "NATIVE_PLANES_MAX", 0)
    def grads():
        x = make_input((3, 4, 5, 6), torch.float32, seed=1).requires_grad_(True)
        weight = torch.linspace(0.5, 1.5, 4).requires_grad_(True)
        z = make_input((3, 4, 5, 6), torch.float32, seed=2).requires_grad_(True) \
            if residual else None
        y = fastbn.batch_norm(x, None, None, weight, None, True, 0.1, 1e-5, residual=z,
                              activation=activation)
        leaves = [x, weight] if z is None else [x, weight, z]
        return torch.autograd.grad(_NoGradient.apply(y).sum() + x.sum(), leaves)

    eager = grads()
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    through_ops = grads()
    assert torch.equal(eager[0], torch.ones(3, 4, 5, 6))
    for mine, theirs in zip(eager, through_ops, strict=True):
        assert torch.equal(mine, theirs)
