"""Ground truth and tolerances: every numeric assertion in the suite goes through here.

Truth is float64, computed from BatchNorm's definition on the exact values the tested
call saw (low-precision inputs are upcast, not re-drawn). A result passes when it is
within the per-dtype tolerance of the truth and no worse than twice torch's own error
on the same call plus atol (when torch's result is given).
"""

from __future__ import annotations

import torch
from torch import Tensor

from conftest import ON_GPU

# (atol, rtol) per dtype of the tensor under test. bf16 allows two ulps at 1: the
# Triton interpreter truncates fp32 -> bf16 stores instead of rounding.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = (None, "relu", "relu6", "leaky_relu", "silu", "hardswish")


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close_to_truth(
    name: str, actual: Tensor, truth: Tensor, torch_actual: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """actual is within tolerance of the float64 truth (and of torch's own error, if given).

    The tolerance is that of ``dtype`` when given (the precision the computation ran in),
    else of actual's dtype.
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    atol, rtol = tolerance(dtype or actual.dtype)
    truth = truth.detach().double().cpu()
    error = (actual.detach().double().cpu() - truth).abs()
    assert torch.isfinite(error).all() or not torch.isfinite(truth).all(), f"{name}: non-finite"
    limit = atol + rtol * truth.abs()
    worst = (error - limit).argmax() if error.numel() else None
    assert bool((error <= limit).all()), (
        f"{name}: max error {error.max().item():.3g} over tolerance (atol {atol}, rtol {rtol}) "
        f"at flat index {worst.item()}: got {actual.flatten()[worst].item()}, "
        f"truth {truth.flatten()[worst].item()}"
    )
    if torch_actual is not None and error.numel():
        torch_error = (torch_actual.detach().double().cpu() - truth).abs().max().item()
        assert error.max().item() <= 2 * torch_error + atol, (
            f"{name}: error {error.max().item():.3g} is more than twice torch's "
            f"{torch_error:.3g} + atol {atol}"
        )


def activation64(u: Tensor, activation: str | None, negative_slope: float = 0.01) -> Tensor:
    """The activation by torch's own functions (float64 definition)."""
    f = torch.nn.functional
    if activation is None:
        return u
    return {
        "relu": f.relu,
        "relu6": f.relu6,
        "leaky_relu": lambda t: f.leaky_relu(t, negative_slope),
        "silu": f.silu,
        "hardswish": f.hardswish,
    }[activation](u)


def batch_norm_truth(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    num_batches_tracked: int | None = None,
) -> dict[str, Tensor | None]:
    """BatchNorm from its definition in float64; nothing passed in is modified.

    Returns y (requires grad through the float64 leaves x64, weight64, bias64, residual64,
    which are returned too), and the running statistics after the call.
    num_batches_tracked is the counter's value *after* this step's increment.
    """
    def leaf(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)

    x64, w64, b64, z64 = leaf(x), leaf(weight), leaf(bias), leaf(residual)
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    rm64 = None if running_mean is None else running_mean.detach().double().cpu()
    rv64 = None if running_var is None else running_var.detach().double().cpu()
    if training or rm64 is None:
        mean = x64.mean(dims)
        var = x64.var(dims, unbiased=False)
        if training and rm64 is not None and count > 0:
            if momentum is None:
                factor = 1.0 / num_batches_tracked
            else:
                factor = momentum
            unbiased = x64.detach().var(dims, unbiased=True) if count > 1 else var.detach()
            rm64 = (1 - factor) * rm64 + factor * mean.detach()
            rv64 = (1 - factor) * rv64 + factor * unbiased
    else:
        mean, var = rm64, rv64
    u = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if w64 is not None:
        u = u * w64.view(shape)
    if b64 is not None:
        u = u + b64.view(shape)
    if z64 is not None:
        u = u + z64
    y = activation64(u, activation, negative_slope)
    return {
        "y": y, "x": x64, "weight": w64, "bias": b64, "residual": z64,
        "running_mean": rm64, "running_var": rv64,
    }


def grads_truth(truth: dict, grad_out: Tensor) -> dict[str, Tensor]:
    """Float64 gradients of truth["y"] with respect to each leaf that exists."""
    names = [n for n in ("x", "weight", "bias", "residual") if truth[n] is not None]
    grads = torch.autograd.grad(
        truth["y"], [truth[n] for n in names], grad_out.detach().double().cpu(),
        allow_unused=True,
    )
    return {
        n: torch.zeros_like(truth[n]) if g is None else g for n, g in zip(names, grads)
    }


def kernel_sizes(small: int, large: int) -> int:
    """A size for kernel tests: small in the CPU interpreter, large on a GPU."""
    return large if ON_GPU else small
