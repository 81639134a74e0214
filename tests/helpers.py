"""Ground truth and tolerances: every numeric assertion in the suite goes through here.

Truth is float64, computed from BatchNorm's definition on the exact values the tested
call saw (low-precision inputs are upcast, not re-drawn). A result passes when it is
within the per-dtype tolerance of the truth and no worse than twice torch's own error
on the same call plus atol and one ulp of its own dtype (when torch's result is given).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from conftest import DEVICE, ON_GPU
from torch import Tensor

T = TypeVar("T")

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
# Where each activation's derivative jumps: finite differences and low-precision rounding
# must not straddle these.
KINKS: dict[str | None, tuple[float, ...]] = {
    None: (), "relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "silu": (),
    "hardswish": (-3.0, 3.0),
}


ROUNDING_MARGIN = 1e-5
"""How far from every kink a pre-activation must lie for a float32 computation of it (error
about 1e-6 at the values drawn here) and the float64 truth to take the same side: enough
for a side-by-side run, and found in a few seeds also among 1e5 values, where
``away_from_kinks``' default (for finite differences) would need a lucky draw."""


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
    assert actual.shape == truth.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    )
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
        # A result stored in a low-precision dtype carries its own rounding, up to one ulp at
        # the true value (rounding to nearest gives half; Triton's interpreter truncates
        # fp32 -> bf16); which way it falls is luck that torch's result does not share.
        torch_error = (torch_actual.detach().double().cpu() - truth).abs().max().item()
        rounding = torch.finfo(actual.dtype).eps * truth.abs()
        excess = error - (2 * torch_error + atol + rounding)
        worst = excess.argmax()
        assert bool((excess <= 0).all()), (
            f"{name}: error {error.flatten()[worst].item():.3g} at flat index {worst.item()} is "
            f"more than twice torch's {torch_error:.3g} + atol {atol} + one {actual.dtype} ulp"
        )


def assert_matches(name: str, actual: Tensor, expected: Tensor) -> None:
    """actual equals expected (another run of the same computation) within actual's tolerance."""
    atol, rtol = tolerance(actual.dtype)
    torch.testing.assert_close(
        actual.detach().cpu(), expected.detach().cpu(), atol=atol, rtol=rtol,
        msg=lambda message: f"{name}: {message}",
    )


def make_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    channels_last: bool = False,
    device: torch.device | None = None,
    spread: float = 1.0,
    offset: float = 0.0,
    scaled_channels: bool = True,
) -> Tensor:
    """Seeded values offset + spread * (1 + c / 4) * randn in channel c, in dtype on device
    (offset + spread * randn in every channel with scaled_channels=False: an output gradient,
    whose scale the gradient tolerances assume to be about one).

    Each channel has its own scale, so a mix-up of channels changes the results. The values
    are centred on offset (0 by default): the error of any fp32 implementation grows with
    |mean| / std, and test_numerics.py is where large means are tested on purpose.
    channels_last puts the channel dimension innermost in memory, at any rank >= 3:
    torch.channels_last for 4-D, torch.channels_last_3d for 5-D, the [N*L, C] matrix for 3-D.
    """
    generator = torch.Generator().manual_seed(seed)
    n, channels, *spatial = shape
    values = torch.randn(n, *spatial, channels, generator=generator, dtype=torch.float64)
    values = values * (channel_spreads(channels, spread) if scaled_channels else spread) + offset
    x = values.movedim(-1, 1)
    if not channels_last:
        x = x.contiguous()
    return x.to(device=device or DEVICE, dtype=dtype)


def channel_spreads(channels: int, spread: float = 1.0) -> Tensor:
    """make_input's standard deviation in each channel c: spread * (1 + c / 4), float64."""
    return spread * (1 + 0.25 * torch.arange(channels, dtype=torch.float64))


def kink_distance(u: Tensor, activation: str | None) -> float:
    """How far the nearest value of u lies from a kink of the activation (inf if none)."""
    kinks = KINKS[activation]
    if not kinks or u.numel() == 0:
        return float("inf")
    return min((u.detach().double() - kink).abs().min().item() for kink in kinks)


def away_from_kinks(draw: Callable[[int], T], pre_activation: Callable[[T], Tensor],
                    activation: str | None, margin: float = 1e-3) -> T:
    """draw(seed) for the first seed 0, 1, ... whose pre-activations lie ``margin`` or more
    from every kink of the activation: there the float64 truth and a float32 computation
    take the same side of every kink, and (at the default 1e-3) finite differences of step
    1e-6 do not measure a slope that exists on neither side."""
    for seed in range(100):
        drawn = draw(seed)
        if kink_distance(pre_activation(drawn), activation) >= margin:
            return drawn
    pytest.fail(f"no seed gave pre-activations {margin} away from the kinks of {activation}")


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
            factor = 1.0 / num_batches_tracked if momentum is None else momentum
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
        n: torch.zeros_like(truth[n]) if g is None else g for n, g in zip(names, grads, strict=True)
    }


def kernel_sizes(small: int, large: int) -> int:
    """A size for kernel tests: small in the CPU interpreter, large on a GPU."""
    return large if ON_GPU else small


def backend_sizes(backend: str, small: int, large: int) -> int:
    """A size for tests of either backend: small only where the kernels are interpreted."""
    return kernel_sizes(small, large) if backend == "triton" else large


TORCH_HAS_BIAS_KEYWORD = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters
"""torch's BatchNorm takes bias= from torch 2.12 on."""


def torch_batch_norm(cls: type, *args, bias: bool = True, **options) -> torch.nn.Module:
    """torch's ``cls(*args, **options)``, without a bias parameter when bias=False, also on
    torch releases whose BatchNorm has no bias= keyword: the same module either way."""
    if TORCH_HAS_BIAS_KEYWORD:
        return cls(*args, bias=bias, **options)
    layer = cls(*args, **options)
    if not bias and layer.affine:
        layer.register_parameter("bias", None)
    return layer
