"""fastbn.batch_norm: torch.nn.functional.batch_norm's contract, plus fused residual/activation.

Every check runs before anything changes: a bad call raises the exception type torch raises
for the same mistake, with a message that names it, and leaves the running statistics and
``num_batches_tracked`` as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbn import ops
from fastbn.backend import resolve_backend
from fastbn.reference import ACTIVATIONS, SIGN_ACTIVATIONS, reduced_count

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """y = activation(BatchNorm(input) + residual), with F.batch_norm's semantics.

    input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), any memory format;
    float16/bfloat16 (parameters and buffers in float32 or the input's dtype), float32,
    float64. The output has the input's dtype and memory format.

    training=True normalizes with the batch statistics and, when running_mean and
    running_var are given, updates them in place: running = (1 - momentum) * running +
    momentum * batch, with the unbiased batch variance. training=False normalizes with
    running_mean and running_var.

    residual: a tensor shaped like input, added after the affine transform.
    activation: None, "relu", "relu6", "leaky_relu" (uses negative_slope), "silu",
    "hardswish".
    num_batches_tracked: the module's step counter, incremented in training; with
    momentum=None the update factor is 1 / num_batches_tracked (a cumulative average),
    computed on the device.
    """
    activation_name = "none" if activation is None else activation
    _check_call(
        input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
        activation_name, num_batches_tracked,
    )
    backend = resolve_backend(input)
    if training:
        mean, var = ops.call_batch_stats_(
            input.detach(), running_mean, running_var, num_batches_tracked, momentum, backend
        )
    else:
        mean, var = running_mean, running_var
    output, _ = ops.call_normalize(
        input, mean, var, weight, bias, residual, eps, training, activation_name,
        negative_slope, saves_mask(activation_name, input, weight, bias, residual), backend,
    )
    return output


def saves_mask(
    activation: str, input: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None,
) -> bool:
    """Whether the forward keeps the activation's bit mask for the backward instead of the
    residual: relu-family activations with a residual, when a backward can follow."""
    return (
        activation in SIGN_ACTIVATIONS
        and residual is not None
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))
    )


def _check_call(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    residual: Tensor | None,
    activation: str,
    num_batches_tracked: Tensor | None,
    whole_batch: bool = True,
) -> None:
    """Raise for a call batch_norm cannot serve; change nothing. ``whole_batch=False`` says
    input is one rank's share of a synchronised batch, which may hold one value per channel
    (or none)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"batch_norm: expected 2D to 5D input (got {input.dim()}D input)")
    if input.dtype not in _FLOATING:
        raise NotImplementedError(
            f"batch_norm: input dtype {input.dtype} is not supported; "
            "expected float16, bfloat16, float32 or float64"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"batch_norm: unknown activation {activation!r}; expected None or one of "
            f"{ACTIVATIONS[1:]}"
        )
    channels = input.shape[1]
    per_channel = {
        "weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var,
    }
    for name, tensor in per_channel.items():
        if tensor is None:
            continue
        _check_same_device(name, tensor, input)
        if tensor.dim() != 1 or tensor.numel() != channels:
            raise RuntimeError(
                f"batch_norm: {name} should be a 1-D tensor of {channels} elements (the input's "
                f"channel count), got shape {tuple(tensor.shape)}"
            )
        allowed = {input.dtype, torch.float32} if input.dtype in _FLOATING[:2] else {input.dtype}
        if tensor.dtype not in allowed:
            raise RuntimeError(
                f"batch_norm: {name} has dtype {tensor.dtype}, but a {input.dtype} input needs "
                f"it in {' or '.join(sorted(str(d) for d in allowed))}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must be given together or both be None"
        )
    if residual is not None:
        _check_same_device("residual", residual, input)
        if residual.shape != input.shape or residual.dtype != input.dtype:
            raise RuntimeError(
                f"batch_norm: residual must match the input's shape {tuple(input.shape)} and "
                f"dtype {input.dtype}, got {tuple(residual.shape)} and {residual.dtype}"
            )
    if num_batches_tracked is not None:
        _check_same_device("num_batches_tracked", num_batches_tracked, input)
        if num_batches_tracked.numel() != 1 or num_batches_tracked.is_floating_point():
            raise ValueError(
                "batch_norm: num_batches_tracked must be a one-element integer tensor, got "
                f"shape {tuple(num_batches_tracked.shape)} and dtype {num_batches_tracked.dtype}"
            )
    if not training:
        if running_mean is None:
            raise RuntimeError(
                "batch_norm: running_mean must be defined in evaluation mode "
                "(pass training=True to normalize with batch statistics)"
            )
        return
    if whole_batch and reduced_count(input) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()}"
        )
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "batch_norm: momentum=None (a cumulative moving average) needs num_batches_tracked"
        )


def _check_same_device(name: str, tensor: Tensor, input: Tensor) -> None:
    if tensor.device != input.device:
        raise RuntimeError(
            f"batch_norm: expected all tensors on the input's device {input.device}, "
            f"but {name} is on {tensor.device}"
        )
