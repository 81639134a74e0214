"""fastbn's torch custom ops: the single boundary that autograd and torch.compile see.

Five ops, each dispatching on its ``backend`` argument ("torch" -> ``fastbn.cpu``, the fast
PyTorch implementation, which falls back to the explicit-formula oracle ``fastbn.reference``
where it must; "triton" -> ``fastbn.launch``; the three modules share these signatures):

``fastbn::batch_stats_(x, running_mean?, running_var?, num_batches_tracked?, momentum?)``
    -> (mean, var). Mutating, not differentiable: the batch mean and biased variance, plus
    the running-statistics update in place. Callers pass ``x.detach()``.

``fastbn::normalize(x, mean, var, weight?, bias?, residual?, eps, batch_stats, ...)``
    -> (y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), activation mask).
    Differentiable in y. ``batch_stats=True`` says mean and var are x's own batch statistics
    (training), so the backward differentiates through them; False says they are constants
    (running stats). With ``save_mask`` it also returns the packed bits of a relu-family
    derivative, which the backward keeps instead of the residual.

``fastbn::normalize_backward(grad_out, x, mean, var, ..., activation_mask?, output_mask)``
    -> (d input, d weight, d bias, d residual), each empty when the mask does not ask for it.
    Differentiable again (double backward), by differentiating the PyTorch formulas of
    ``fastbn.reference.normalize_backward`` with torch.func.vjp.

``normalize_backward`` is the composition of two pieces, exposed as ops of their own for
SyncBatchNorm (``fastbn.distributed``), which sums across ranks in between. Neither has an
autograd formula (SyncBatchNorm has no double backward):

``fastbn::normalize_grad_sums(grad_out, x, mean, var, ..., output_mask)``
    -> ([sum(g), sum(g * x_hat)] per channel, d weight, d bias).

``fastbn::normalize_grad_input(grad_out, x, mean, var, ..., sums?, count, ..., output_mask)``
    -> (d input, d residual) from the sums over ``count`` values per channel.

Callers use the ``call_*`` functions at the end of this file. In plain eager mode they run
the same implementation without the dispatcher, with the same autograd formulas (the
dispatcher's Python layers cost about 100 microseconds per op, more than a small
BatchNorm's kernels take on a GPU); under torch.compile/export tracing, and for tensor
subclasses such as fake tensors, they call the ops.
"""

from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from fastbn import cpu, reference


def implementation(backend: str) -> ModuleType:
    """The module that implements a resolved backend name."""
    if backend == "torch":
        return cpu
    if backend == "triton":
        from fastbn import launch

        return launch
    raise ValueError(f"unknown resolved backend {backend!r}; expected 'torch' or 'triton'")


# ---------------------------------------------------------------------------------------------
# batch_stats_: statistics and running-stat update
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "fastbn::batch_stats_", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def batch_stats_(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation(backend).batch_stats_(
        x, running_mean, running_var, num_batches_tracked, momentum
    )


@batch_stats_.register_fake
def _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, backend):
    channels = x.shape[1]
    return (x.new_empty(channels, dtype=reference.STATS_DTYPE),
            x.new_empty(channels, dtype=reference.STATS_DTYPE))


# ---------------------------------------------------------------------------------------------
# normalize: the differentiable forward
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastbn::normalize", mutates_args=())
def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    save_mask: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation(backend).normalize(
        x, mean, var, weight, bias, residual, eps, activation, negative_slope, save_mask
    )


@normalize.register_fake
def _normalize_fake(x, mean, var, weight, bias, residual, eps, batch_stats, activation,
                    negative_slope, save_mask, backend):
    shape = reference.mask_shape(x) if save_mask else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=torch.uint8)


def _normalize_setup_context(ctx, inputs, output):
    """What the backward keeps: x, the statistics and the affine parameters, plus
    - nothing more without an activation, or with one but no residual (u is recomputed);
    - the packed activation mask (1 bit per element) for relu/relu6/leaky_relu with a
      residual, which is then not kept;
    - the residual for silu/hardswish with a residual (their derivative needs u)."""
    (x, mean, var, weight, bias, residual, eps, batch_stats, activation, slope, save_mask,
     backend) = inputs
    activation_mask = output[1] if save_mask else None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, mean, var, weight, bias,
                          None if save_mask else residual, activation_mask)
    ctx.has_residual = residual is not None
    ctx.eps = eps
    ctx.batch_stats = batch_stats
    ctx.activation = activation
    ctx.negative_slope = slope
    ctx.backend = backend


def _normalize_grads(ctx, grad_out, _grad_mask):
    x, mean, var, weight, bias, residual, activation_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[3], needs[4], needs[5] and ctx.has_residual]
    grads = call_normalize_backward(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, ctx.eps,
        ctx.batch_stats, ctx.activation, ctx.negative_slope, mask, ctx.backend,
    )
    grad_input, grad_weight, grad_bias, grad_residual = (
        grad if wanted else None for grad, wanted in zip(grads, mask, strict=True)
    )
    # One gradient per op argument: x, mean, var, weight, bias, residual, then six non-tensors.
    return (grad_input, None, None, grad_weight, grad_bias, grad_residual,
            None, None, None, None, None, None)


normalize.register_autograd(_normalize_grads, setup_context=_normalize_setup_context)


# ---------------------------------------------------------------------------------------------
# normalize_backward: the gradients, differentiable again
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastbn::normalize_backward", mutates_args=())
def normalize_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation_mask: Optional[Tensor],
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return implementation(backend).normalize_backward(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, batch_stats,
        activation, negative_slope, output_mask,
    )


@normalize_backward.register_fake
def _normalize_backward_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                             eps, batch_stats, activation, negative_slope, output_mask,
                             backend):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(weight) if output_mask[1] and weight is not None else x.new_empty(0),
        torch.empty_like(bias) if output_mask[2] and bias is not None else x.new_empty(0),
        torch.empty_like(x if residual is None else residual) if output_mask[3]
        else x.new_empty(0),
    )


def _normalize_backward_setup_context(ctx, inputs, output):
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, batch_stats,
     activation, slope, output_mask, backend) = inputs
    ctx.save_for_backward(grad_out, x, mean, var, weight, bias, residual, activation_mask)
    ctx.eps = eps
    ctx.batch_stats = batch_stats
    ctx.activation = activation
    ctx.negative_slope = slope
    ctx.output_mask = list(output_mask)


def _normalize_backward_grads(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias,
                              grad_grad_residual):
    """Double backward: the vector-Jacobian product of reference.normalize_backward.

    With batch statistics the mean and variance are recomputed from x inside the function
    being differentiated, so their dependence on x is part of the derivative. The
    activation mask is a constant (the derivatives it encodes are piecewise constant).
    """
    grad_out, x, mean, var, weight, bias, residual, activation_mask = ctx.saved_tensors
    names = ("grad_out", "x", "weight", "bias", "residual")
    present = {
        name: tensor
        for name, tensor in zip(names, (grad_out, x, weight, bias, residual), strict=True)
        if tensor is not None
    }

    def first_backward(*tensors: Tensor) -> tuple[Tensor, ...]:
        args = dict.fromkeys(names)
        args.update(zip(present, tensors, strict=True))
        if ctx.batch_stats:
            batch_mean, batch_var = reference.batch_mean_var(args["x"])
        else:
            batch_mean, batch_var = mean, var
        return reference.normalize_backward(
            args["grad_out"], args["x"], batch_mean, batch_var, args["weight"], args["bias"],
            args["residual"], activation_mask, ctx.eps, ctx.batch_stats, ctx.activation,
            ctx.negative_slope, ctx.output_mask,
        )

    outputs, vjp = torch.func.vjp(first_backward, *present.values())
    cotangents = tuple(
        torch.zeros_like(out) if grad is None else grad.to(out.dtype)
        for out, grad in zip(
            outputs,
            (grad_grad_input, grad_grad_weight, grad_grad_bias, grad_grad_residual),
            strict=True,
        )
    )
    grads = dict(zip(present, vjp(cotangents), strict=True))
    # One gradient per op argument: grad_out, x, mean, var, weight, bias, residual,
    # activation_mask, then six non-tensors.
    return (
        grads.get("grad_out"), grads.get("x"), None, None, grads.get("weight"),
        grads.get("bias"), grads.get("residual"), None, None, None, None, None, None, None,
    )


normalize_backward.register_autograd(
    _normalize_backward_grads, setup_context=_normalize_backward_setup_context
)


# ---------------------------------------------------------------------------------------------
# normalize_grad_sums and normalize_grad_input: normalize_backward in two pieces
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastbn::normalize_grad_sums", mutates_args=())
def normalize_grad_sums(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation_mask: Optional[Tensor],
    eps: float,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend).normalize_grad_sums(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
        negative_slope, output_mask,
    )


@normalize_grad_sums.register_fake
def _normalize_grad_sums_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                              eps, activation, negative_slope, output_mask, backend):
    return (
        x.new_empty((2, x.shape[1]), dtype=reference.compute_dtype(x.dtype)),
        torch.empty_like(weight) if output_mask[0] and weight is not None else x.new_empty(0),
        torch.empty_like(bias) if output_mask[1] and bias is not None else x.new_empty(0),
    )


@torch.library.custom_op("fastbn::normalize_grad_input", mutates_args=())
def normalize_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation_mask: Optional[Tensor],
    sums: Optional[Tensor],
    count: float,
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation(backend).normalize_grad_input(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, sums, count, eps,
        batch_stats, activation, negative_slope, output_mask,
    )


@normalize_grad_input.register_fake
def _normalize_grad_input_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                               sums, count, eps, batch_stats, activation, negative_slope,
                               output_mask, backend):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(x if residual is None else residual) if output_mask[1]
        else x.new_empty(0),
    )


# ---------------------------------------------------------------------------------------------
# Calling the ops
# ---------------------------------------------------------------------------------------------


def direct(x: Tensor) -> bool:
    """Whether a call on x may skip the dispatcher: a plain tensor, outside torch.compile.

    Tracing (torch.compile, export) and tensor subclasses (fake tensors, DTensor, ...) see
    the custom ops, which is what they understand; eager calls run the same implementation
    with the same autograd formulas, without the dispatcher's Python layers.
    """
    return type(x) is Tensor and not torch.compiler.is_compiling()


def call_batch_stats_(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``batch_stats_``: mean and var, running statistics updated in place."""
    if not direct(x):
        return batch_stats_(x, running_mean, running_var, num_batches_tracked, momentum,
                            backend)
    result = implementation(backend).batch_stats_(
        x, running_mean, running_var, num_batches_tracked, momentum
    )
    for mutated in (running_mean, running_var):  # as the op's ADInplaceOrView kernel does
        if mutated is not None:
            torch.autograd.graph.increment_version(mutated)
    return result


class _Normalize(torch.autograd.Function):
    """``normalize`` for eager calls: the op's implementation and autograd formula. (The
    forward takes ctx itself: with a separate setup_context, apply() binds the signature
    through inspect on every call.)"""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, residual, eps, batch_stats, activation,
                negative_slope, save_mask, backend):
        output = implementation(backend).normalize(
            x, mean, var, weight, bias, residual, eps, activation, negative_slope, save_mask
        )
        _normalize_setup_context(
            ctx, (x, mean, var, weight, bias, residual, eps, batch_stats, activation,
                  negative_slope, save_mask, backend), output,
        )
        return output

    backward = staticmethod(_normalize_grads)


def call_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    save_mask: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``normalize``: (y, activation mask)."""
    args = (x, mean, var, weight, bias, residual, eps, batch_stats, activation,
            negative_slope, save_mask, backend)
    return _Normalize.apply(*args) if direct(x) else normalize(*args)


def call_normalize_backward(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``normalize_backward(*args)``; the op itself when its result will be differentiated
    again (grad mode on inside a backward means create_graph=True)."""
    return _call(normalize_backward, "normalize_backward", args,
                 eager=not torch.is_grad_enabled())


def call_normalize_grad_sums(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``normalize_grad_sums(*args)``: (sums, d weight, d bias)."""
    return _call(normalize_grad_sums, "normalize_grad_sums", args)


def call_normalize_grad_input(*args: Any) -> tuple[Tensor, Tensor]:
    """``normalize_grad_input(*args)``: (d input, d residual)."""
    return _call(normalize_grad_input, "normalize_grad_input", args)


def _call(op: Any, name: str, args: tuple, eager: bool = True) -> Any:
    """op(*args), whose last argument is the backend; for an eager call (see ``direct``) on
    a plain first tensor, the implementation function of that name, without the backend."""
    if eager and direct(args[0]):
        return getattr(implementation(args[-1]), name)(*args[:-1])
    return op(*args)
