"""Fused residual and activation: y = act(BN(x) + z), and what its backward keeps.

Each activation, with and without a residual, in NCHW and channels_last, float32 and
bfloat16, on both backends, against the float64 truth: the output and every gradient
(including d residual), no worse than twice torch's own error on BN -> add -> act.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ACTIVATIONS,
    activation64,
    assert_close_to_truth,
    batch_norm_truth,
    grads_truth,
    kink_distance,
    make_input,
)

import fastbn

SLOPE = 0.2


def draw_away_from_kinks(shape, dtype, channels_last, activation, residual, device):
    """Inputs whose pre-activations lie at least 1e-3 from the activation's kinks, so the
    float64 truth and a float32 computation take the same side of every kink."""
    weight = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float32, device=device)
    bias = torch.linspace(-0.3, 0.3, shape[1], dtype=torch.float32, device=device)
    for seed in range(100):
        x = make_input(shape, dtype, seed=seed, channels_last=channels_last, spread=2.0,
                       device=device)
        z = (make_input(shape, dtype, seed=seed + 500, channels_last=channels_last,
                        device=device) if residual else None)
        pre = batch_norm_truth(x, None, None, weight, bias, True, residual=z)["y"]
        if kink_distance(pre, activation) > 1e-3:
            return x, z, weight, bias
    pytest.fail("no seed gave pre-activations 1e-3 away from the kinks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_fused_output_and_every_gradient_match_truth(backend, device, activation, residual,
                                                     channels_last, dtype):
    shape = (3, 4, 5, 6)
    x, z, weight, bias = draw_away_from_kinks(shape, dtype, channels_last, activation,
                                              residual, device)
    grad_out = make_input(shape, dtype, seed=99, channels_last=channels_last, device=device)
    truth = batch_norm_truth(x, None, None, weight, bias, True, residual=z,
                             activation=activation, negative_slope=SLOPE)
    expected = grads_truth(truth, grad_out)

    def run(function):
        leaves = {"x": x, "weight": weight, "bias": bias, "residual": z}
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()
                  if v is not None}
        y = function(leaves)
        grads = torch.autograd.grad(y, list(leaves.values()), grad_out)
        return y, dict(zip(leaves, grads, strict=True))

    y, grads = run(lambda t: fastbn.batch_norm(
        t["x"], None, None, t["weight"], t["bias"], True, residual=t.get("residual"),
        activation=activation, negative_slope=SLOPE))
    torch_y, torch_grads = run(lambda t: activation64(
        F.batch_norm(t["x"], None, None, t["weight"], t["bias"], True)
        + t.get("residual", 0), activation, SLOPE))

    assert_close_to_truth("output", y, truth["y"], torch_y)
    for name, grad in grads.items():
        assert_close_to_truth(f"grad {name}", grad, expected[name], torch_grads[name],
                              dtype=dtype)


def saved_bytes(function) -> int:
    """Bytes of the distinct tensors autograd saves while ``function`` runs."""
    saved = {}

    def pack(tensor):
        saved[(tensor.data_ptr(), tensor.numel(), tensor.dtype)] = (
            tensor.numel() * tensor.element_size()
        )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(saved.values())


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_relu_family_saves_less_than_torch_bn_then_activation(backend, device,
                                                                     activation, residual):
    shape = (4, 8, 16, 16)
    x = make_input(shape, device=device).requires_grad_(True)
    z = make_input(shape, seed=1, device=device).requires_grad_(True) if residual else None
    fused = fastbn.BatchNorm2d(8, activation=activation, device=device)
    plain = torch.nn.BatchNorm2d(8, device=device)

    def torch_layers():
        u = plain(x) if z is None else plain(x) + z
        return activation64(u, activation)

    ours = saved_bytes(lambda: fused(x, residual=z))
    theirs = saved_bytes(torch_layers)
    # Ours keeps x (and a 1-bit mask with a residual); torch keeps x and the activation's
    # output or input: a second full tensor.
    assert ours < theirs
    assert ours <= x.numel() * x.element_size() * (1 + 1 / 16) + 1024


def test_residual_mask_replaces_the_residual_only_when_a_backward_can_follow(device):
    x = make_input((2, 3, 4, 4), device=device)
    z = make_input((2, 3, 4, 4), seed=1, device=device)
    weight = torch.ones(3, device=device, requires_grad=True)
    with torch.no_grad():
        inference = saved_bytes(
            lambda: fastbn.batch_norm(x, None, None, weight, None, True, residual=z,
                                      activation="relu"))
    assert inference == 0
