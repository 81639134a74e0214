"""One point's tensors, BatchNorm's float64 truth on them, and a provider's distance from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastbn.bench.shapes import Point

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Largest relative error (see relative_error) a provider may have and still be timed: a few
# roundings of the input dtype, far below what a wrong formula or layout produces.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}

MOMENTUM = 0.1
EPS = 1e-5
GRADS = ("grad_input", "grad_weight", "grad_bias")  # the gradients of (x, weight, bias)


@dataclass
class Inputs:
    """The tensors of one point: x and dy in its dtype and layout, fp32 parameters and stats.

    ``x_leaf`` is x as an autograd leaf (the training modes differentiate through it);
    ``running_mean``/``running_var`` are initial values, cloned by each user.
    """

    x: Tensor
    x_leaf: Tensor
    grad_out: Tensor
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter
    running_mean: Tensor
    running_var: Tensor


def memory_format(layout: str, rank: int) -> torch.memory_format:
    """The torch memory format of a layout name for a tensor of ``rank`` dimensions."""
    if layout == "channels_last" and rank == 4:
        return torch.channels_last
    if layout == "channels_last" and rank == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def make_inputs(point: Point, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs for ``point``: x has a per-channel offset, the statistics are not 0 and 1."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    channels = point.shape[1]
    fmt = memory_format(point.layout, len(point.shape))
    dtype = TORCH_DTYPES[point.dtype]
    offset = randn(channels).view(1, channels, *([1] * (len(point.shape) - 2)))
    x = (randn(*point.shape) + offset).to(dtype).contiguous(memory_format=fmt)
    grad_out = randn(*point.shape).to(dtype).contiguous(memory_format=fmt)
    return Inputs(
        x=x,
        x_leaf=x.detach().requires_grad_(True),
        grad_out=grad_out,
        weight=torch.nn.Parameter(1 + 0.1 * randn(channels)),
        bias=torch.nn.Parameter(0.1 * randn(channels)),
        running_mean=0.1 * randn(channels),
        running_var=0.5 + torch.rand(channels, generator=generator, device=device),
    )


def truth(inputs: Inputs, modes: tuple[str, ...]) -> dict[str, Tensor]:
    """BatchNorm from its definition in float64, on the device, for what ``modes`` check.

    Keys: ``y_eval`` (normalized with the running statistics), ``y_train`` (with the batch
    statistics), ``running_mean``/``running_var`` after one training step (the update takes
    the unbiased batch variance), and the gradients ``grad_input``/``grad_weight``/
    ``grad_bias`` of y_train for dy = grad_out, by autograd through the definition.
    """
    x = inputs.x.detach().double()
    weight = inputs.weight.detach().double()
    bias = inputs.bias.detach().double()
    running_mean, running_var = inputs.running_mean.double(), inputs.running_var.double()
    shape = (1, -1, *([1] * (x.dim() - 2)))
    dims = [0, *range(2, x.dim())]

    def normalized(mean: Tensor, var: Tensor) -> Tensor:
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
        return x_hat * weight.view(shape) + bias.view(shape)

    out: dict[str, Tensor] = {}
    if "forward-eval" in modes:
        out["y_eval"] = normalized(running_mean, running_var)
    if all(mode == "forward-eval" for mode in modes):
        return out
    need_grads = any(mode in ("backward", "forward-backward") for mode in modes)
    with torch.set_grad_enabled(need_grads):
        for leaf in (x, weight, bias):
            leaf.requires_grad_(need_grads)
        mean, var = x.mean(dims), x.var(dims, correction=0)
        y = normalized(mean, var)
        if need_grads:
            grads = torch.autograd.grad(y, (x, weight, bias), inputs.grad_out.double())
            out.update(zip(GRADS, grads, strict=True))
    count = x.numel() // x.shape[1]
    out["y_train"] = y.detach()
    out["running_mean"] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.detach()
    out["running_var"] = (1 - MOMENTUM) * running_var + MOMENTUM * var.detach() * (
        count / (count - 1)
    )
    return out


def relative_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The worst, over the tensors in ``actual``, of max |actual - expected| / max |expected|.

    Measured against the tensor's largest value, not element by element, so a result near
    zero after cancellation (a dx entry) is judged at the scale of its tensor. A shape
    mismatch or a non-finite value gives inf or nan (never within tolerance).
    """
    errors = []
    for name, value in actual.items():
        reference = expected[name]
        if value.shape != reference.shape:
            return math.inf
        scale = reference.abs().max().item() or 1.0
        errors.append((value.detach().double() - reference).abs().max().item() / scale)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)
