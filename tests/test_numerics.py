"""Numerics: large means, constant channels, and fp16/bf16 inputs with float32 statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import Case, run_side_by_side
from helpers import (
    LOW_PRECISION,
    assert_close_to_truth,
    backend_sizes,
    batch_norm_truth,
    make_input,
)

import fastbn


def large_mean_case(backend) -> Case:
    """x = 1e4 + randn (float32, one std per channel 1..1.75), with statistics to update.

    momentum=1.0, so after the call running_var is the unbiased batch variance itself.
    """
    shape = (backend_sizes(backend, 4, 64), 4, *(backend_sizes(backend, 16, 32),) * 2)
    return Case(shape, offset=1e4, weight=False, bias=False, counter=False, momentum=1.0)


def run_large_mean(backend, device):
    """fastbn's and torch's results on the large-mean call, and the float64 truth, fastbn's
    held against the truth (output, gradients, running statistics)."""
    ours, theirs, truth = run_side_by_side(large_mean_case(backend), device)
    return {"fastbn": ours, "torch": theirs}, truth


def test_large_mean_batch_variance_is_right(backend, device):
    """Mean 1e4 and std ~1: the variance survives.

    fp32 holds 1e4 to a spacing of 2**-10 ~ 1e-3; E[x^2] - E[x]^2 in fp32 works at a
    spacing of 8 around 1e8 and loses the variance of 1 entirely (relative error >= 1). A
    shifted or two-pass computation keeps the error near (mean error)^2 + fp32 rounding of
    the sum of squares, about 1e-6 .. 1e-4 relative; < 1e-3 leaves room for any sound
    fp32 method and still rejects the naive one by three orders of magnitude.
    """
    results, truth = run_large_mean(backend, device)
    var = results["fastbn"]["running_var"].double().cpu()
    relative_error = ((var - truth["running_var"]) / truth["running_var"]).abs().max().item()
    assert relative_error < 1e-3


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_large_mean_running_stats_are_as_accurate_as_torchs(backend, device, name):
    results, truth = run_large_mean(backend, device)
    assert_close_to_truth(name, results["fastbn"][name], truth[name], results["torch"][name])


def test_large_mean_output_is_within_fp32_tolerance_of_truth(backend, device):
    results, truth = run_large_mean(backend, device)
    assert_close_to_truth("output", results["fastbn"]["y"], truth["y"], results["torch"]["y"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_constant_channel_output_equals_bias(backend, device, training):
    """A channel with zero variance normalizes to 0: the output is the bias, finite."""
    x = make_input((8, 3, 4, 4), device=device)
    x[:, 1] = 3.7
    weight = torch.tensor([1.5, 2.0, 0.5], device=device)
    bias = torch.tensor([0.1, 0.25, -0.3], device=device)
    running_mean = torch.tensor([0.0, 3.7, 0.0], device=device)
    running_var = torch.tensor([1.0, 0.0, 1.0], device=device)
    y = fastbn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
    y_torch = F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
    assert torch.isfinite(y).all()
    assert_close_to_truth(
        "constant channel", y[:, 1], torch.full_like(y[:, 1], 0.25), y_torch[:, 1]
    )


def test_constant_channel_gradients_are_finite(backend, device):
    x = make_input((8, 3, 4, 4), device=device)
    x[:, 1] = 3.7
    x.requires_grad_(True)
    weight = torch.ones(3, device=device, requires_grad=True)
    bias = torch.zeros(3, device=device, requires_grad=True)
    fastbn.batch_norm(x, None, None, weight, bias, True).pow(2).sum().backward()
    for name, grad in (("x", x.grad), ("weight", weight.grad), ("bias", bias.grad)):
        assert torch.isfinite(grad).all(), f"grad {name} is not finite"


def low_precision_call(backend, device, dtype):
    """fp16/bf16 x with mean 100 and std ~4 and float32 parameters and statistics.

    1024 values per channel (on the torch backend) sum to ~1e5: above fp16's largest
    finite value 65504, and far beyond the precision of bf16 sums.
    """
    n = backend_sizes(backend, 4, 16)
    x = make_input((n, 4, 8, 8), dtype, offset=100.0, spread=4.0, device=device)
    generator = torch.Generator().manual_seed(1)
    weight = (1 + torch.randn(4, generator=generator)).to(device)
    bias = torch.randn(4, generator=generator).to(device)
    return x, weight, bias


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_input_gives_float32_accurate_statistics(backend, device, dtype):
    x, weight, bias = low_precision_call(backend, device, dtype)
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, True, momentum=1.0)
    torch_stats = running_mean.clone(), running_var.clone()
    F.batch_norm(x, *torch_stats, weight, bias, True, 1.0)
    fastbn.batch_norm(x, running_mean, running_var, weight, bias, True, 1.0)
    assert running_mean.dtype == running_var.dtype == torch.float32
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"], torch_stats[0])
    assert_close_to_truth("running_var", running_var, truth["running_var"], torch_stats[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_output_is_within_its_dtype_tolerance(backend, device, dtype, training):
    x, weight, bias = low_precision_call(backend, device, dtype)
    running_mean = torch.full((4,), 100.5, device=device)
    running_var = torch.full((4,), 15.0, device=device)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, training)
    y = fastbn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
    y_torch = F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
    assert y.dtype == dtype
    assert_close_to_truth("output", y, truth["y"], y_torch)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_non_finite_value_gives_torchs_statistics(backend, device, value, where):
    """inf, -inf or NaN in one element, the channel's first (the statistics' anchor) or
    not: the running statistics and the output have torch's non-finite pattern."""
    x = make_input((4, 3, 3, 3), device=device)
    x[(0, 1, 0, 0) if where == "first" else (2, 1, 1, 2)] = value
    fast, ref = fastbn.BatchNorm2d(3).to(device), torch.nn.BatchNorm2d(3).to(device)
    y, expected = fast(x), ref(x)
    for name, mine, theirs in (("output", y, expected),
                               ("running_mean", fast.running_mean, ref.running_mean),
                               ("running_var", fast.running_var, ref.running_var)):
        assert torch.equal(mine.isnan(), theirs.isnan()), f"{name}: NaN pattern"
        assert torch.equal(mine.isinf() & (mine > 0), theirs.isinf() & (theirs > 0)), name
        assert torch.equal(mine.isinf() & (mine < 0), theirs.isinf() & (theirs < 0)), name
