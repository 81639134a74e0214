"""Pure-PyTorch BatchNorm: the CPU fallback and the oracle the kernels are tested against.

The five functions here have the same signatures as their twins in ``fastbn.launch``
(the Triton launchers) and ``fastbn.cpu``, so the backend choice is one switch in
``fastbn.ops``; the backward's three take normalize's tensors and options as one
``BackwardInputs``:

- ``batch_stats_``          per-channel batch mean and biased variance, and the in-place
                            running-statistics update;
- ``normalize``             y = act((x - mean) * invstd * weight + bias + residual);
- ``normalize_backward``    the gradients of ``normalize`` (explicit formulas, not
                            autograd), in two pieces that SyncBatchNorm also calls:
- ``normalize_grad_sums``   the per-channel sums, which are d weight and d bias;
- ``normalize_grad_input``  d input and d residual from given sums.

An input (N, C, *S) of any rank >= 2 and any strides is reduced over every dimension but 1.
Elementwise math and sums run in float32 (float64 for float64 input); the batch statistics
passed between the ops are float64 (see STATS_DTYPE). Outputs keep the input's memory
format. Everything is written with differentiable torch operations, so the
double backward in ``fastbn.ops`` differentiates ``normalize_backward`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbn.conventions import (  # noqa: F401  (re-exported for callers of the oracle)
    ACTIVATIONS,
    SIGN_ACTIVATIONS,
    STATS_DTYPE,
    BackwardInputs,
    compute_dtype,
    mask_positions,
    mask_shape,
    reduced_count,
    unbiasing_factor,
)


def split_mean(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """mean as hi + lo in dtype, so x - mean = (x - hi) - lo loses nothing in dtype."""
    hi = mean.to(dtype)
    lo = (mean.to(torch.float64) - hi.to(torch.float64)).to(dtype)
    return hi, lo


def reduced_dims(x: Tensor) -> list[int]:
    """Every dimension of an (N, C, *S) tensor except the channel dimension 1."""
    return [0, *range(2, x.dim())]


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector of length C viewed as (1, C, 1, ...) to broadcast against x."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def like_input(t: Tensor, x: Tensor) -> Tensor:
    """t in x's dtype and memory format (the strides torch.empty_like(x) would choose)."""
    out = torch.empty_like(x)
    if t.dtype == out.dtype and t.stride() == out.stride():
        return t
    out.copy_(t)
    return out


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (STATS_DTYPE) by two passes in the compute dtype.

    Values are shifted by an anchor, the channel's first element A, before summing:
    x - A is exact for values near A, so the mean A + mean(x - A) and the variance stay
    right when the mean is large against the spread (mean 1e4, std 1 in float32).
    An empty batch (M = 0) gives mean 0 and variance 0.
    """
    count = reduced_count(x)
    if count == 0:
        zeros = x.new_zeros(x.shape[1], dtype=STATS_DTYPE)
        return zeros, zeros.clone()
    dtype = compute_dtype(x.dtype)
    anchor = x[(0, slice(None)) + (0,) * (x.dim() - 2)].to(dtype)
    anchor = torch.where(anchor.isfinite(), anchor, 0.0)  # an inf anchor would make inf - inf
    shifted = x.to(dtype) - channel_view(anchor, x)
    dims = reduced_dims(x)
    shifted_mean = shifted.mean(dims)
    var = (shifted - channel_view(shifted_mean, x)).square().mean(dims)
    return anchor.to(STATS_DTYPE) + shifted_mean.to(STATS_DTYPE), var.to(STATS_DTYPE)


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    momentum: float | None,
) -> None:
    """running = (1 - factor) * running + factor * batch, with the unbiased batch variance.

    factor is ``momentum``, or 1 / num_batches_tracked (read on the device, after the caller
    incremented it) when momentum is None: the cumulative average. Nothing changes when the
    batch is empty. ``count`` may be a tensor on the device (SyncBatchNorm's count over all
    ranks, which the host does not know): then an empty batch sets the factor to 0 there.
    """
    if isinstance(count, int) and count == 0:
        return
    factor: float | Tensor
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(STATS_DTYPE)
    else:
        factor = momentum
    if isinstance(count, Tensor):
        factor = (count > 0).to(STATS_DTYPE) * factor
        unbiased_var = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased_var = var * unbiasing_factor(count)
    running_mean.copy_(factor * mean + (1 - factor) * running_mean.to(STATS_DTYPE))
    running_var.copy_(factor * unbiased_var + (1 - factor) * running_var.to(STATS_DTYPE))


def batch_stats_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of x (STATS_DTYPE); updates the running stats in place.

    ``num_batches_tracked``, when given, is incremented by one first (torch's module does the
    same on every training step).
    """
    mean, var = batch_mean_var(x)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None and running_var is not None:
        update_running_stats_(
            running_mean, running_var, num_batches_tracked, mean, var, reduced_count(x), momentum
        )
    return mean, var


def activation_forward(u: Tensor, activation: str, negative_slope: float) -> Tensor:
    """act(u) for the names in ACTIVATIONS."""
    if activation == "none":
        return u
    if activation == "relu":
        return torch.relu(u)
    if activation == "relu6":
        return u.clamp(0.0, 6.0)
    if activation == "leaky_relu":
        return torch.where(u > 0, u, u * negative_slope)
    if activation == "silu":
        return u * torch.sigmoid(u)
    if activation == "hardswish":
        return u * (u + 3.0).clamp(0.0, 6.0) / 6.0
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def derivative_is_one(u: Tensor, activation: str) -> Tensor:
    """Where a SIGN_ACTIVATIONS activation has derivative 1 at u (torch's kink conventions:
    relu'(0) = 0, relu6'(0) = relu6'(6) = 0, leaky_relu'(0) = negative_slope)."""
    if activation == "relu6":
        return (u > 0) & (u < 6.0)
    return u > 0


def derivative_from_bits(bits: Tensor, activation: str, negative_slope: float,
                         dtype: torch.dtype) -> Tensor:
    """A SIGN_ACTIVATIONS derivative from its derivative_is_one bits, in dtype: the slope is
    rounded once, to dtype (two Python numbers would make a float32 tensor first, which
    rounds a float64 call's slope to float32)."""
    otherwise = negative_slope if activation == "leaky_relu" else 0.0
    return torch.where(bits, bits.new_ones((), dtype=dtype), otherwise)


def activation_derivative(u: Tensor, activation: str, negative_slope: float) -> Tensor:
    """d act / du at u."""
    if activation in SIGN_ACTIVATIONS:
        return derivative_from_bits(derivative_is_one(u, activation), activation,
                                    negative_slope, u.dtype)
    if activation == "silu":
        sig = torch.sigmoid(u)
        return sig * (1.0 + u * (1.0 - sig))
    if activation == "hardswish":
        middle = u / 3.0 + 0.5
        # Written so that NaN falls through to the middle branch: a NaN derivative, as the
        # definition u * relu6(u + 3) / 6 gives.
        return torch.where(u < -3.0, torch.zeros_like(u), torch.where(u > 3.0, 1.0, middle))
    raise ValueError(f"activation {activation!r} has no derivative here")


def pack_bits(bits: Tensor) -> Tensor:
    """A boolean tensor shaped like x, packed into its uint8 activation mask."""
    view = mask_positions(bits).to(torch.uint8)
    padded = torch.nn.functional.pad(view, (0, -view.shape[-1] % 8))
    groups = padded.reshape(*padded.shape[:2], padded.shape[-1] // 8, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=bits.device)
    return (groups * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(mask: Tensor, x: Tensor) -> Tensor:
    """The boolean tensor shaped like x that ``pack_bits`` packed into mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = ((mask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    rows, channels, positions = mask_positions(x).shape
    bits = bits[..., :positions]
    return bits[0].t() if x.dim() == 2 else bits.reshape(x.shape)


def channel_constants(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-channel (hi, lo, invstd, scale, shift) in the compute dtype.

    With mean = hi + lo, invstd = 1 / sqrt(var + eps), scale = invstd * weight and
    shift = bias - lo * scale, the pre-activation is (x - hi) * scale + shift.
    """
    dtype = compute_dtype(x.dtype)
    hi, lo = split_mean(mean, dtype)
    invstd = torch.rsqrt(var.to(dtype) + eps)
    scale = invstd if weight is None else invstd * weight.to(dtype)
    shift = -lo * scale if bias is None else bias.to(dtype) - lo * scale
    return hi, lo, invstd, scale, shift


def pre_activation(
    x: Tensor, hi: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None
) -> Tensor:
    """u = (x - hi) * scale + shift + residual = (x - mean) * invstd * weight + bias + residual.

    Forward and backward both call this, so the backward sees exactly the forward's u and
    the activation's kinks fall on the same elements.
    """
    u = (x.to(scale.dtype) - channel_view(hi, x)) * channel_view(scale, x) + channel_view(shift, x)
    if residual is not None:
        u = u + residual.to(scale.dtype)
    return u


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    """y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), in x's dtype and format,
    and, when ``save_mask``, the packed derivative_is_one bits of a SIGN_ACTIVATIONS
    activation (else an empty uint8 tensor)."""
    hi, _, _, scale, shift = channel_constants(x, mean, var, weight, bias, eps)
    u = pre_activation(x, hi, scale, shift, residual)
    y = like_input(activation_forward(u, activation, negative_slope), x)
    if save_mask:
        return y, pack_bits(derivative_is_one(u, activation))
    return y, x.new_empty(0, dtype=torch.uint8)


def normalize_grad_sums(
    inputs: BackwardInputs, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-channel sums of the backward, and the parameter gradients they are.

    Returns sums = [sum(g), sum(g * x_hat)] as one [2, C] tensor in the compute dtype, then
    d weight and d bias (``normalize_backward``'s formulas) where ``output_mask`` (weight,
    bias) asks for them (else empty tensors).
    """
    g, x_hat, _ = output_grad(inputs)
    return grad_sums(g, x_hat, inputs.x, inputs.weight, inputs.bias, output_mask)


def normalize_grad_input(
    inputs: BackwardInputs, grad_means: Tensor | None, use_batch_stats: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """The elementwise gradients (d input, d residual) of ``normalize``, given the means.

    ``grad_means`` is [mean(g), mean(g * x_hat)] per channel: ``normalize_grad_sums``'s sums
    divided by the count they were taken over (SyncBatchNorm's: the sums and count of every
    rank). Only d input with ``use_batch_stats`` reads it. ``output_mask`` is (input, residual);
    a gradient it does not ask for comes back as an empty tensor.
    """
    g, x_hat, scale = output_grad(inputs)
    return grad_input_residual(g, x_hat, scale, inputs, grad_means, use_batch_stats, output_mask)


def output_grad(inputs: BackwardInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(g, x_hat, scale) in the compute dtype: g = grad_out * act'(u), x_hat = (x - mean) *
    invstd, and scale = weight * invstd per channel.

    act'(u) comes from ``activation_mask`` when given (the forward's packed bits; the
    residual is then not needed), else from u recomputed from x (and the residual).
    """
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
     negative_slope) = inputs
    hi, lo, invstd, scale, shift = channel_constants(x, mean, var, weight, bias, eps)
    x_hat = (x.to(invstd.dtype) - channel_view(hi, x)) * channel_view(invstd, x) - channel_view(
        lo * invstd, x
    )
    g = grad_out.to(invstd.dtype)
    if activation_mask is not None:
        bits = unpack_bits(activation_mask, x)
        g = g * derivative_from_bits(bits, activation, negative_slope, g.dtype)
    elif activation != "none":
        u = pre_activation(x, hi, scale, shift, residual)
        g = g * activation_derivative(u, activation, negative_slope)
    return g, x_hat, scale


def grad_sums(
    g: Tensor, x_hat: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``normalize_grad_sums`` from g and x_hat."""
    dims = reduced_dims(x)
    sums = torch.stack([g.sum(dims), (g * x_hat).sum(dims)])
    # Custom-op outputs must not alias each other: a fresh tensor for each.
    grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
    if output_mask[0] and weight is not None:
        grad_weight = sums[1].to(weight.dtype, copy=True)
    if output_mask[1] and bias is not None:
        grad_bias = sums[0].to(bias.dtype, copy=True)
    return sums, grad_weight, grad_bias


def grad_input_residual(
    g: Tensor, x_hat: Tensor, scale: Tensor, inputs: BackwardInputs,
    grad_means: Tensor | None, use_batch_stats: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """``normalize_grad_input`` from g, x_hat and scale."""
    grad_out, x, residual = inputs.grad_out, inputs.x, inputs.residual
    grad_input, grad_residual = x.new_empty(0), x.new_empty(0)
    if output_mask[0]:
        if use_batch_stats:
            mean_g, mean_g_xhat = grad_means.to(g.dtype)
            g_centered = g - channel_view(mean_g, x) - x_hat * channel_view(mean_g_xhat, x)
        else:
            g_centered = g
        grad_input = like_input(g_centered * channel_view(scale, x), x)
    if output_mask[1]:  # in the residual's format, or x's when the mask stood in for it
        grad_residual = like_input(g, x if residual is None else residual)
        if grad_residual is grad_out:  # nor alias an input
            grad_residual = grad_out.clone()
    return grad_input, grad_residual


def normalize_backward(
    inputs: BackwardInputs, use_batch_stats: bool, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (d input, d weight, d bias, d residual) of ``normalize``: the sums of
    ``normalize_grad_sums``, then the elementwise gradients of ``normalize_grad_input``.

    With g = grad_out * act'(u), x_hat = (x - mean) * invstd and sums over the M values of
    each channel:
        d weight   = sum(g * x_hat)          d bias = sum(g)          d residual = g
        d input    = weight * invstd * g                                 (running stats)
        d input    = weight * invstd * (g - sum(g) / M - x_hat * sum(g * x_hat) / M)
                                                    (batch stats: mean and var depend on x)
    A gradient that ``output_mask`` does not ask for comes back as an empty tensor.
    """
    want_input, want_weight, want_bias, want_residual = output_mask
    g, x_hat, scale = output_grad(inputs)
    x = inputs.x
    grad_means, grad_weight, grad_bias = None, x.new_empty(0), x.new_empty(0)
    if want_weight or want_bias or (want_input and use_batch_stats):
        sums, grad_weight, grad_bias = grad_sums(g, x_hat, x, inputs.weight, inputs.bias,
                                                 [want_weight, want_bias])
        grad_means = sums / max(reduced_count(x), 1)  # (an empty batch's sums are 0)
    grad_input, grad_residual = grad_input_residual(
        g, x_hat, scale, inputs, grad_means, use_batch_stats, [want_input, want_residual]
    )
    return grad_input, grad_weight, grad_bias, grad_residual
