"""One point's tensors, the float64 truth on them, and a provider's distance from it."""

from __future__ import annotations

import math
from collections.abc import Callable
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
# The gradients of (x, weight, bias) and, for add_relu, of the residual z.
GRADS = ("grad_input", "grad_weight", "grad_bias", "grad_residual")

# What each fusion (shapes.FUSIONS) adds after BatchNorm: fastbn.batch_norm's activation
# argument, and whether a residual z of x's shape is added before it.
ACTIVATION = {"none": None, "relu": "relu", "add_relu": "relu"}
RESIDUAL = {"none": False, "relu": False, "add_relu": True}


@dataclass
class Inputs:
    """The tensors of one point: x, dy (and z) in its dtype and layout, fp32 parameters and
    stats.

    ``x_leaf`` and ``residual_leaf`` are x and z as autograd leaves (the training modes
    differentiate through them); ``residual`` is None unless the point's fusion adds one;
    ``running_mean``/``running_var`` are initial values, cloned by each user.
    """

    point: Point
    x: Tensor
    x_leaf: Tensor
    grad_out: Tensor
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter
    running_mean: Tensor
    running_var: Tensor
    residual: Tensor | None = None
    residual_leaf: Tensor | None = None


def memory_format(layout: str, rank: int) -> torch.memory_format:
    """The torch memory format of a layout name for a tensor of ``rank`` dimensions."""
    if layout == "channels_last" and rank == 4:
        return torch.channels_last
    if layout == "channels_last" and rank == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def make_inputs(point: Point, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs for ``point``: x has a per-channel offset, the statistics are not 0 and 1;
    z, when the fusion adds one, is standard normal like BN's output."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    channels = point.shape[1]
    fmt = memory_format(point.layout, len(point.shape))
    dtype = TORCH_DTYPES[point.dtype]
    offset = randn(channels).view(1, channels, *([1] * (len(point.shape) - 2)))
    x = (randn(*point.shape) + offset).to(dtype).contiguous(memory_format=fmt)
    grad_out = randn(*point.shape).to(dtype).contiguous(memory_format=fmt)
    inputs = Inputs(
        point=point,
        x=x,
        x_leaf=x.detach().requires_grad_(True),
        grad_out=grad_out,
        weight=torch.nn.Parameter(1 + 0.1 * randn(channels)),
        bias=torch.nn.Parameter(0.1 * randn(channels)),
        running_mean=0.1 * randn(channels),
        running_var=0.5 + torch.rand(channels, generator=generator, device=device),
    )
    if RESIDUAL[point.fusion]:
        inputs.residual = randn(*point.shape).to(dtype).contiguous(memory_format=fmt)
        inputs.residual_leaf = inputs.residual.detach().requires_grad_(True)
    return inputs


@dataclass
class Truth:
    """The float64 truth of one point (``values``, under the keys of the steps' outputs) and,
    when the fusion ends in a ReLU, what it takes to judge gradients at its kink.

    Where the training pre-activation u = BN(x) (+ z) is within the dtype's tolerance of 0
    (``kink``: |u| <= TOLERANCE x (|w (x - mean) / sqrt(var + eps)| + |b| + |z|)), rounding
    may put a provider's u on either side, and the ReLU's derivative there is 1 or 0 with it:
    one element's whole dy in dx (and dz). ``values_for`` reads the provider's side at those
    elements from its dx and recomputes the truth's gradients with it; everywhere else the
    truth's side stands.
    """

    values: dict[str, Tensor]
    gradients: Callable[[Tensor], dict[str, Tensor]] | None = None  # for a ReLU mask
    mask: Tensor | None = None  # u > 0: where the truth's ReLU passes the gradient
    kink: Tensor | None = None  # where either side of the ReLU is within rounding
    flip: Tensor | None = None  # the change of dx where the mask is 0 and becomes 1

    def values_for(self, actual: dict[str, Tensor]) -> dict[str, Tensor]:
        """The truth to judge ``actual`` against: ``values``, with the gradients taken on the
        provider's side of the ReLU where u is at the kink."""
        if self.gradients is None or "grad_input" not in actual:
            return self.values
        dx, expected_dx = actual["grad_input"].detach().double(), self.values["grad_input"]
        if dx.shape != expected_dx.shape:
            return self.values
        flipped_dx = expected_dx + torch.where(self.mask, -self.flip, self.flip)
        flips = self.kink & ((dx - flipped_dx).abs() < (dx - expected_dx).abs())
        if not flips.any():
            return self.values
        return {**self.values, **self.gradients(self.mask ^ flips)}


def truth(inputs: Inputs, modes: tuple[str, ...]) -> Truth:
    """BatchNorm and its fusion from their definition in float64, on the device, for what
    ``modes`` check.

    Keys: ``y_eval`` (normalized with the running statistics), ``y_train`` (with the batch
    statistics), each followed by the fusion's add of z and ReLU; ``running_mean``/
    ``running_var`` after one training step (the update takes the unbiased batch variance);
    and the gradients ``grad_input``/``grad_weight``/``grad_bias`` (and ``grad_residual``
    with z) of y_train for dy = grad_out, by autograd through the definition, the ReLU's
    derivative as its 0/1 mask u > 0 (see Truth for the kink).
    """
    relu = ACTIVATION[inputs.point.fusion] == "relu"
    tensors = [inputs.x, inputs.weight, inputs.bias]
    if inputs.residual is not None:
        tensors.append(inputs.residual)
    leaves = [tensor.detach().double() for tensor in tensors]
    x = leaves[0]
    running_mean, running_var = inputs.running_mean.double(), inputs.running_var.double()
    shape = (1, -1, *([1] * (x.dim() - 2)))
    dims = [0, *range(2, x.dim())]

    def pre_activation(leaves: list[Tensor], mean: Tensor, var: Tensor) -> Tensor:
        x, weight, bias, *residual = leaves
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
        u = x_hat * weight.view(shape) + bias.view(shape)
        return u + residual[0] if residual else u

    def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
        return x.mean(dims), x.var(dims, correction=0)

    def gradients(mask: Tensor | None) -> dict[str, Tensor]:
        differentiable = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            u = pre_activation(differentiable, *batch_stats(differentiable[0]))
            y = u if mask is None else u * mask
            grads = torch.autograd.grad(y, differentiable, inputs.grad_out.double())
        return dict(zip(GRADS[: len(grads)], grads, strict=True))

    out: dict[str, Tensor] = {}
    if "forward-eval" in modes:
        u = pre_activation(leaves, running_mean, running_var)
        out["y_eval"] = torch.relu(u) if relu else u
    if all(mode == "forward-eval" for mode in modes):
        return Truth(out)
    mean, var = batch_stats(x)
    u = pre_activation(leaves, mean, var)
    out["y_train"] = torch.relu(u) if relu else u
    count = x.numel() // x.shape[1]
    out["running_mean"] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean
    out["running_var"] = (1 - MOMENTUM) * running_var + MOMENTUM * var * (count / (count - 1))
    if not any(mode in ("backward", "forward-backward") for mode in modes):
        return Truth(out)
    if not relu:
        out.update(gradients(None))
        return Truth(out)
    mask = u > 0
    out.update(gradients(mask))
    scale = (leaves[1] / torch.sqrt(var + EPS)).view(shape)  # w / sqrt(var + eps)
    magnitude = ((x - mean.view(shape)) * scale).abs() + leaves[2].abs().view(shape)
    if inputs.residual is not None:
        magnitude += leaves[3].abs()
    kink = u.abs() <= TOLERANCE[inputs.point.dtype] * magnitude
    return Truth(out, gradients, mask, kink, flip=scale * inputs.grad_out.double())


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
