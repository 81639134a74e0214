"""Fused residual and activation: y = act(BN(x) + z), and what its backward keeps.

Each activation, with and without a residual, in NCHW and channels_last, float32 and
bfloat16, on both backends, against the float64 truth: the output and every gradient
(including d residual), no worse than twice torch's own error on BN -> add -> act.
"""

from __future__ import annotations

import pytest
import torch
from cases import MEMORY_FORMATS, Case, cases, run_side_by_side
from helpers import ACTIVATIONS, activation64, assert_matches, make_input

import fastbn
from fastbn import cpu, ops

FUSED = Case((3, 4, 5, 6), running_stats=False, spread=2.0)
FUSED_CASES = [
    FUSED.but(dtype=dtype, layout=layout, residual=residual, activation=activation)
    for activation in ACTIVATIONS
    for residual in (False, True)
    for layout in MEMORY_FORMATS
    for dtype in (torch.float32, torch.bfloat16)
]


@cases(*FUSED_CASES)
def test_fused_output_and_every_gradient_match_truth(backend, device, case):
    run_side_by_side(case, device)


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
                                                                     activation, residual,
                                                                     monkeypatch):
    """float32 NCHW, where no native route serves (on the CPU path a small float32 NCHW call
    would: NATIVE_PLANES_MAX, set to 0 here; the native route saves what torch's own layers
    save, as the README's feature table says). The CPU path's eager relu keeps its output
    instead of a mask (ops.keeps_output): what torch keeps, no more."""
    monkeypatch.setattr(cpu, "NATIVE_PLANES_MAX", 0)
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
    if ops.keeps_output(activation, backend):
        # The CPU path's relu keeps x and its output, as torch's BatchNorm and F.relu do.
        full = x.numel() * x.element_size()
        assert 2 * full <= ours <= theirs
        assert ours <= 2 * full + 1024
        return
    # Ours keeps x (and a 1-bit mask with a residual); torch keeps x and the activation's
    # output or input: a second full tensor.
    assert ours < theirs
    assert ours <= x.numel() * x.element_size() * (1 + 1 / 16) + 1024


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_residual_without_activation_is_not_kept_so_it_may_change_before_the_backward(
        backend, device, training, channels_last):
    """BN(x) + z needs no z in its backward (d z is the output's gradient): like torch's
    BatchNorm + add, the fused call keeps none, so z may change in place after the forward
    (a later in-place layer) and the gradients are still torch's."""
    shape = (2, 3, 4, 4)
    x = make_input(shape, channels_last=channels_last, device=device).requires_grad_(True)
    z = make_input(shape, seed=1, channels_last=channels_last, device=device,
                   ).requires_grad_(True)
    grad = make_input(shape, seed=2, device=device, scaled_channels=False)
    ours = fastbn.BatchNorm2d(3, device=device).train(training)
    theirs = torch.nn.BatchNorm2d(3, device=device).train(training)
    y, expected = ours(x, residual=z), theirs(x) + z
    with torch.no_grad():
        z.mul_(2.0)
    got = torch.autograd.grad(y, (x, z, ours.weight, ours.bias), grad)
    want = torch.autograd.grad(expected, (x, z, theirs.weight, theirs.bias), grad)
    for name, actual, truth in zip(("d input", "d residual", "d weight", "d bias"), got, want,
                                   strict=True):
        assert_matches(name, actual, truth)
    assert saved_bytes(lambda: ours(x, residual=z)) < 2 * x.numel() * x.element_size()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_leaky_relu_gradient_on_a_strided_input_keeps_the_slope_in_float64(
        backend, device, training):
    """A transposed (N, L, C) -> (N, C, L) input takes the reference formulas, whose slope
    must not pass through float32 on its way to a float64 derivative."""
    x = make_input((3, 7, 6), torch.float64, device=device).transpose(1, 2) - 0.5
    ours_x, torch_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    stats = (torch.zeros(6, dtype=torch.float64, device=device),
             torch.ones(6, dtype=torch.float64, device=device))
    y = fastbn.batch_norm(ours_x, *(t.clone() for t in stats), None, None, training,
                          activation="leaky_relu", negative_slope=0.01)
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(
        torch_x, *(t.clone() for t in stats), None, None, training), 0.01)
    grad = make_input(y.shape, torch.float64, seed=1, device=device, scaled_channels=False)
    assert_matches("output", y, expected)
    assert_matches("d input", torch.autograd.grad(y, ours_x, grad)[0],
                   torch.autograd.grad(expected, torch_x, grad)[0])


def test_residual_mask_replaces_the_residual_only_when_a_backward_can_follow(device):
    x = make_input((2, 3, 4, 4), device=device)
    z = make_input((2, 3, 4, 4), seed=1, device=device)
    weight = torch.ones(3, device=device, requires_grad=True)
    with torch.no_grad():
        inference = saved_bytes(
            lambda: fastbn.batch_norm(x, None, None, weight, None, True, residual=z,
                                      activation="relu"))
    assert inference == 0


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_family_backward_under_allow_mutation_on_saved_tensors(backend, device, activation,
                                                                    residual, training, dtype):
    """Under torch.autograd.graph.allow_mutation_on_saved_tensors (a TorchDispatchMode) the
    fused relu-family backward runs and gives torch's gradients, the input changed in place
    after the forward as that mode allows (the CPU backward's in-place out= overloads,
    whose output argument the mode looks up by another name, raised a KeyError)."""
    shape = (3, 4, 5, 6)
    x = make_input(shape, dtype, device=device)
    z = make_input(shape, dtype, seed=1, device=device) if residual else None
    grad_out = make_input(shape, dtype, seed=2, device=device)
    fused = fastbn.BatchNorm2d(4, activation=activation, device=device, dtype=dtype)
    plain = torch.nn.BatchNorm2d(4, device=device, dtype=dtype)
    for layer in (fused, plain):
        layer.train(training)

    def grads(forward):
        leaf = x.clone().requires_grad_(True)
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            t = leaf * 1
            y = forward(t)
            t.mul_(2)  # the mode keeps what the backward saved of t as it was
            y.backward(grad_out)
        return leaf.grad

    expected = grads(lambda t: activation64(plain(t) if z is None else plain(t) + z, activation))
    assert_matches("d input", grads(lambda t: fused(t, residual=z)), expected)
