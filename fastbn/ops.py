"""fastbn's torch custom ops: the single boundary that autograd and torch.compile see.

Six ops, each dispatching on its ``backend`` argument ("torch" -> ``fastbn.cpu``, the fast
PyTorch implementation, which falls back to the explicit-formula oracle ``fastbn.reference``
where it must; "triton" -> ``fastbn.launch``; the three modules share these signatures;
"auto", which programs made by torch.export and torch.jit.trace record, -> either, chosen
for the call's tensors when it runs: ``backend.backend_at_run_time``):

``fastbn::batch_stats_(x, running_mean?, running_var?, num_batches_tracked?, momentum?)``
    -> (mean, var). Mutating, not differentiable: the batch mean and biased variance, plus
    the running-statistics update in place. Callers pass ``x.detach()``.

``fastbn::normalize(x, mean, var, weight?, bias?, residual?, eps, use_batch_stats, ...)``
    -> (y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), activation mask).
    Differentiable in y. ``use_batch_stats=True`` says mean and var are x's own batch statistics
    (training), so the backward differentiates through them; False says they are constants
    (running stats). With ``save_mask`` it also returns the packed bits of a relu-family
    derivative, which the backward keeps instead of the residual.

``fastbn::normalize_backward(grad_out, x, mean, var, ..., activation_mask?, output_mask)``
    -> (d input, d weight, d bias, d residual), each empty when the mask does not ask for it.
    Differentiable again (double backward), by differentiating the PyTorch formulas of
    ``fastbn.reference.normalize_backward`` with torch.func.vjp.

``fastbn::batch_norm_train_(x, running_mean?, running_var?, num_batches_tracked?, momentum?,
weight?, bias?, residual?, eps, ...)`` -> (y, mean, var, activation mask). Mutating: the
training forward, ``batch_stats_`` then ``normalize`` with use_batch_stats in one op (in one
launch on the kernels where a channel block's slice fits one program). torch.library gives
a mutating op no autograd formula, so callers reach it through ``call_batch_norm_train_``,
whose ``autograd.Function`` (``_TrainForward``) puts normalize's backward around it;
torch.compile traces that Function. SyncBatchNorm keeps the separate ops: it reduces its
statistics across ranks in between.

``normalize_backward`` is the composition of two pieces, exposed as ops of their own for
SyncBatchNorm (``fastbn.distributed``), which sums across ranks in between. Neither has an
autograd formula (SyncBatchNorm has no double backward):

``fastbn::normalize_grad_sums(grad_out, x, mean, var, ..., output_mask)``
    -> ([sum(g), sum(g * x_hat)] per channel, d weight, d bias).

``fastbn::normalize_grad_input(grad_out, x, mean, var, ..., grad_means?, ..., output_mask)``
    -> (d input, d residual) from the per-channel means [mean(g), mean(g * x_hat)]: the
    sums divided by the count of values they were taken over.

Callers use the ``call_*`` functions at the end of this file. In plain eager mode they run
the same implementation without the dispatcher, with the same autograd formulas (the
dispatcher's Python layers cost about 100 microseconds per op, more than a small
BatchNorm's kernels take on a GPU), and without the empty tensors an op returns for a mask
or gradient it did not compute (None instead); under torch.compile/export tracing, and when
any tensor argument is not a plain tensor (tensor subclasses such as fake tensors or
``TwoTensor``, meta tensors), they call the ops, so the kernels only ever see plain tensors.

Under a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, ...) or inside a forward-AD
``dual_level`` the tensors may be functorch wrappers or carry tangents, which neither the
kernels nor an ``autograd.Function`` can serve: ``fastbn.functional`` then calls
``composite_batch_norm``, the same formulas written in differentiable torch operations
(``fastbn.reference``), so every transform works by construction. A backward that runs
under vmap (batched gradients: ``is_grads_batched=True``, ``jacobian(vectorize=True)``,
gradcheck's ``check_batched_grad``) gets a batched grad_out: it runs the reference
formulas too.
"""

import contextlib
from types import ModuleType
from typing import Any, Optional

import torch
import torch._prims_common
from torch import Tensor
from torch._C import _functorch

from fastbn import conventions, cpu, reference
from fastbn.backend import backend_at_run_time
from fastbn.conventions import BackwardInputs


def implementation(backend: str) -> ModuleType:
    """The module that implements a resolved backend name."""
    module = _IMPLEMENTATIONS.get(backend)
    if module is not None:
        return module
    if backend == "triton":
        from fastbn import launch  # imported on first use: it needs a working triton

        _IMPLEMENTATIONS["triton"] = launch
        return launch
    raise ValueError(f"unknown resolved backend {backend!r}; expected 'torch' or 'triton'")


_IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": cpu}


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
    return implementation(backend_at_run_time(backend, x)).batch_stats_(
        x, running_mean, running_var, num_batches_tracked, momentum
    )


@batch_stats_.register_fake
def _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, backend):
    channels = x.shape[1]
    return (x.new_empty(channels, dtype=conventions.STATS_DTYPE),
            x.new_empty(channels, dtype=conventions.STATS_DTYPE))


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
    use_batch_stats: bool,
    activation: str,
    negative_slope: float,
    save_mask: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    y, activation_mask = normalized(x, mean, var, weight, bias, residual, eps, use_batch_stats,
                                    activation, negative_slope, save_mask, backend)
    return y, mask_output(x, activation_mask)


def mask_output(x: Tensor, activation_mask: Optional[Tensor]) -> Tensor:
    """The activation mask as an op returns it: a tensor, empty (uint8, on x's device) where
    the backend saved none and says so with None (the Triton launchers do: an eager call
    then allocates nothing for it)."""
    return x.new_empty(0, dtype=torch.uint8) if activation_mask is None else activation_mask


def grads_output(x: Tensor, grads: tuple) -> tuple[Tensor, ...]:
    """Gradients as an op returns them: an empty tensor (x's dtype and device, as the fake
    implementations give) for each that was not asked for and came back None."""
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


def normalized(x, mean, var, weight, bias, residual, eps, use_batch_stats, activation,
               negative_slope, save_mask, backend):
    """The backend's normalize, its output in torch's memory format: the body of the op,
    of its eager autograd Function and of the eager call without a backward. With batch
    statistics the "torch" backend's is ``cpu.normalize_batch`` (the bits of the eager
    ``cpu.native_training_forward`` where that serves). The mask may be None where none is
    saved (see mask_output)."""
    backend = backend_at_run_time(backend, x)
    function = (cpu.normalize_batch if use_batch_stats and backend == "torch"
                else implementation(backend).normalize)
    y, activation_mask = function(
        x, mean, var, weight, bias, residual, eps, activation, negative_slope, save_mask
    )
    return in_output_format(y, x), activation_mask


@normalize.register_fake
def _normalize_fake(x, mean, var, weight, bias, residual, eps, use_batch_stats, activation,
                    negative_slope, save_mask, backend):
    shape = conventions.mask_shape(x) if save_mask else (0,)
    return in_output_format(torch.empty_like(x), x), x.new_empty(shape, dtype=torch.uint8)


def in_output_format(y: Tensor, x: Tensor) -> Tensor:
    """y (computed in x's layout) in the memory format torch's BatchNorm gives its output:
    x's own when x is contiguous in the standard, channels_last or channels_last_3d format,
    else the one x's strides suggest (``suggest_memory_format``: channels_last-like strides
    of a 4-D / 5-D tensor, otherwise contiguous). Only that last, odd case copies y."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
        x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return y
    return y.contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


def _normalize_setup_context(ctx, inputs, output):
    """What the backward keeps: x, the statistics and the affine parameters, plus
    - nothing more without an activation (d residual is then grad_out, in x's format: the
      residual itself is not kept, so it may change in place before the backward, as after
      torch's BatchNorm + add), or with one but no residual (u is recomputed);
    - the packed activation mask (1 bit per element) for relu/relu6/leaky_relu with a
      residual, which is then not kept;
    - the residual for silu/hardswish with a residual (their derivative needs u)."""
    (x, mean, var, weight, bias, residual, eps, use_batch_stats, activation, slope, save_mask,
     backend) = inputs
    ctx.mark_non_differentiable(output[1])
    _keep_for_backward(ctx, x, mean, var, weight, bias, residual, output[1], eps,
                       use_batch_stats, activation, slope, save_mask, backend)


def _keep_for_backward(ctx, x, mean, var, weight, bias, residual, activation_mask, eps,
                       use_batch_stats, activation, slope, save_mask, backend):
    """_normalize_setup_context's work on its arguments one by one (except marking the mask
    non-differentiable, which only a Function that returns it does): the eager Functions'
    forwards call it so, with no tuple built and taken apart per call. The options travel
    as one attribute (one store and one load per call instead of six)."""
    ctx.save_for_backward(x, mean, var, weight, bias,
                          kept_residual(residual, activation, save_mask),
                          activation_mask if save_mask else None, None)
    ctx.options = (residual is not None, eps, use_batch_stats, activation, slope, backend)


def _keep_output_for_backward(ctx, x, mean, var, weight, bias, residual, output, eps,
                              use_batch_stats, activation, slope, backend):
    """_keep_for_backward where the backward differentiates the activation from ``output``
    (``keeps_output``): that, x, the statistics and the affine parameters; neither the
    residual nor an activation mask."""
    ctx.save_for_backward(x, mean, var, weight, bias, None, None, output)
    ctx.options = (residual is not None, eps, use_batch_stats, activation, slope, backend)


def kept_residual(residual: Optional[Tensor], activation: str, save_mask: bool
                  ) -> Optional[Tensor]:
    """The residual as the backward keeps it: only where it recomputes u = BN(x) + residual
    with it (an activation, and no mask standing in for it); None otherwise."""
    return None if save_mask or activation == "none" else residual


def keeps_output(activation: str, backend: str) -> bool:
    """Whether an eager call's backward (``_Normalize``) differentiates the activation from
    the output it returned, as torch's F.relu differentiates its result: relu on the
    "torch" backend. There the output is what torch's unfused BatchNorm + (add +) ReLU
    keeps, so the backward is torch's: one threshold_backward of the output, no activation
    mask packed in the forward and unpacked in the backward (two extra passes on a CPU),
    no pre-activation recomputed; and, as after torch's F.relu, changing the output in
    place before the backward raises autograd's version error. The Triton backend keeps
    its 1-bit mask (GPU memory); the ops' route (traced calls) is unchanged."""
    return activation == "relu" and backend == "torch"


def _normalize_grads(ctx, grad_out, _grad_mask):
    # One gradient per op argument: x, mean, var, weight, bias, residual, then six non-tensors.
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias, grad_residual = _gradients(
        ctx, grad_out, needs[0], needs[3], needs[4], needs[5])
    return (grad_input, None, None, grad_weight, grad_bias, grad_residual,
            None, None, None, None, None, None)


def _gradients(ctx, grad_out, want_input, want_weight, want_bias, want_residual):
    """(d x, d weight, d bias, d residual) of normalize's backward, None for what autograd
    does not ask for (the ``want_*`` flags, from the caller's needs_input_grad): the
    gradients of the op's differentiable arguments, which are the eager Functions' tensor
    arguments (x, weight, bias, residual)."""
    x, mean, var, weight, bias, residual, activation_mask, output = ctx.saved_tensors
    # The eager Functions set_materialize_grads(False): autograd would otherwise zero-fill a
    # gradient for the non-differentiable mask on every call. y's gradient is then None
    # only when y's consumers gave it none: zero, as autograd would have made it.
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    has_residual, eps, use_batch_stats, activation, slope, backend = ctx.options
    if output is not None:  # keeps_output: d u from the output, then BN's backward of it
        grad_u = cpu.relu_grad_from_output(grad_out, output)
        grad_input, grad_weight, grad_bias, _ = call_normalize_backward(
            grad_u, x, mean, var, weight, bias, None, None, eps, use_batch_stats, "none",
            slope, [want_input, want_weight, want_bias, False], backend,
        )
        return (grad_input if want_input else None, grad_weight if want_weight else None,
                grad_bias if want_bias else None,
                grad_u if want_residual and has_residual else None)  # d residual = d u
    mask = [want_input, want_weight, want_bias, want_residual and has_residual]
    grad_input, grad_weight, grad_bias, grad_residual = call_normalize_backward(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, use_batch_stats,
        activation, slope, mask, backend,
    )
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
            grad_bias if mask[2] else None, grad_residual if mask[3] else None)


normalize.register_autograd(_normalize_grads, setup_context=_normalize_setup_context)


# ---------------------------------------------------------------------------------------------
# batch_norm_train_: the training forward in one op
# ---------------------------------------------------------------------------------------------


def trained(x, running_mean, running_var, num_batches_tracked, momentum, weight, bias,
            residual, eps, activation, negative_slope, save_mask, backend):
    """The backend's training forward, y in torch's output format: the body of the op and
    of the eager call. The kernels have one of their own (one launch where a channel
    block's slice fits one program); the torch backend runs its batch_stats_ then its
    normalize. The mask may be None where none is saved (see mask_output)."""
    backend = backend_at_run_time(backend, x)
    module = implementation(backend)
    if backend == "triton":
        y, mean, var, activation_mask = module.batch_norm_train_(
            x, running_mean, running_var, num_batches_tracked, momentum, weight, bias,
            residual, eps, activation, negative_slope, save_mask)
    else:
        mean, var = module.batch_stats_(x, running_mean, running_var, num_batches_tracked,
                                        momentum)
        # (normalize_batch: the eager native_training_forward's bits where that serves)
        y, activation_mask = module.normalize_batch(x, mean, var, weight, bias, residual, eps,
                                                    activation, negative_slope, save_mask)
    return in_output_format(y, x), mean, var, activation_mask


@torch.library.custom_op(
    "fastbn::batch_norm_train_",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def batch_norm_train_(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    activation: str,
    negative_slope: float,
    save_mask: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, var, activation_mask = trained(
        x, running_mean, running_var, num_batches_tracked, momentum, weight, bias, residual,
        eps, activation, negative_slope, save_mask, backend)
    return y, mean, var, mask_output(x, activation_mask)


@batch_norm_train_.register_fake
def _batch_norm_train_fake(x, running_mean, running_var, num_batches_tracked, momentum, weight,
                           bias, residual, eps, activation, negative_slope, save_mask, backend):
    mean, var = _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum,
                                  backend)
    y, activation_mask = _normalize_fake(x, mean, var, weight, bias, residual, eps, True,
                                         activation, negative_slope, save_mask, backend)
    return y, mean, var, activation_mask


# ---------------------------------------------------------------------------------------------
# normalize_backward: the gradients, differentiable again
# ---------------------------------------------------------------------------------------------


def _normalize_backward_eager(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                              eps, use_batch_stats, activation, negative_slope, output_mask,
                              backend):
    """normalize_backward's gradients, None for those the mask does not ask for where the
    backend says so (the Triton launchers do): the op's body, without the empty tensors an
    op must return, for eager calls (_call)."""
    inputs = BackwardInputs(grad_out, x, mean, var, weight, bias, residual, activation_mask, eps,
                            activation, negative_slope)
    return implementation(backend_at_run_time(backend, x)).normalize_backward(
        inputs, use_batch_stats, output_mask)


def _normalize_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation_mask: Optional[Tensor],
    eps: float,
    use_batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return grads_output(x, _normalize_backward_eager(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, use_batch_stats,
        activation, negative_slope, output_mask, backend))


normalize_backward = torch.library.custom_op(
    "fastbn::normalize_backward", _normalize_backward, mutates_args=()
)


@normalize_backward.register_fake
def _normalize_backward_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                             eps, use_batch_stats, activation, negative_slope, output_mask,
                             backend):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(weight) if output_mask[1] and weight is not None else x.new_empty(0),
        torch.empty_like(bias) if output_mask[2] and bias is not None else x.new_empty(0),
        torch.empty_like(x if residual is None else residual) if output_mask[3]
        else x.new_empty(0),
    )


def _normalize_backward_setup_context(ctx, inputs, output):
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, use_batch_stats,
     activation, slope, output_mask, backend) = inputs
    ctx.save_for_backward(grad_out, x, mean, var, weight, bias, residual, activation_mask)
    ctx.eps = eps
    ctx.use_batch_stats = use_batch_stats
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
        if ctx.use_batch_stats:
            batch_mean, batch_var = reference.batch_mean_var(args["x"])
        else:
            batch_mean, batch_var = mean, var
        inputs = BackwardInputs(
            args["grad_out"], args["x"], batch_mean, batch_var, args["weight"], args["bias"],
            args["residual"], activation_mask, ctx.eps, ctx.activation, ctx.negative_slope,
        )
        return reference.normalize_backward(inputs, ctx.use_batch_stats, ctx.output_mask)

    # The vector-Jacobian product by torch.autograd.grad, not torch.func.vjp, which refuses
    # to run while saved-tensor hooks are active (torch.autograd.graph.save_on_cpu around a
    # gradient-penalty step). The recomputation reads a view of each tensor that needs a
    # gradient: the derivatives are then the partial ones, through the recomputation only
    # (grad_out is itself a function of x, through a graph already differentiated), and
    # differentiable again through the views where grad mode is on (a third derivative).
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        wanted = {name: t.view_as(t) for name, t in present.items() if t.requires_grad}
        outputs = first_backward(*(wanted.get(name, t) for name, t in present.items()))
    pairs = [
        (out, grad.to(out.dtype))
        for out, grad in zip(
            outputs,
            (grad_grad_input, grad_grad_weight, grad_grad_bias, grad_grad_residual),
            strict=True,
        )
        if grad is not None and out.requires_grad
    ]
    grads = dict.fromkeys(names)
    if wanted and pairs:
        grads.update(zip(wanted, torch.autograd.grad(
            [out for out, _ in pairs], list(wanted.values()), [grad for _, grad in pairs],
            allow_unused=True, create_graph=create_graph), strict=True))
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


def _normalize_grad_sums_eager(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                               eps, activation, negative_slope, output_mask, backend):
    """normalize_grad_sums's results, None for a gradient not asked for (see
    _normalize_backward_eager)."""
    inputs = BackwardInputs(grad_out, x, mean, var, weight, bias, residual, activation_mask, eps,
                            activation, negative_slope)
    return implementation(backend_at_run_time(backend, x)).normalize_grad_sums(inputs,
                                                                              output_mask)


def _normalize_grad_sums(
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
    return grads_output(x, _normalize_grad_sums_eager(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
        negative_slope, output_mask, backend))


normalize_grad_sums = torch.library.custom_op(
    "fastbn::normalize_grad_sums", _normalize_grad_sums, mutates_args=()
)


@normalize_grad_sums.register_fake
def _normalize_grad_sums_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                              eps, activation, negative_slope, output_mask, backend):
    return (
        x.new_empty((2, x.shape[1]), dtype=conventions.compute_dtype(x.dtype)),
        torch.empty_like(weight) if output_mask[0] and weight is not None else x.new_empty(0),
        torch.empty_like(bias) if output_mask[1] and bias is not None else x.new_empty(0),
    )


def _normalize_grad_input_eager(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                                grad_means, eps, use_batch_stats, activation, negative_slope,
                                output_mask, backend):
    """normalize_grad_input's gradients, None for those not asked for (see
    _normalize_backward_eager)."""
    inputs = BackwardInputs(grad_out, x, mean, var, weight, bias, residual, activation_mask, eps,
                            activation, negative_slope)
    return implementation(backend_at_run_time(backend, x)).normalize_grad_input(
        inputs, grad_means, use_batch_stats, output_mask)


def _normalize_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation_mask: Optional[Tensor],
    grad_means: Optional[Tensor],
    eps: float,
    use_batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return grads_output(x, _normalize_grad_input_eager(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, grad_means, eps,
        use_batch_stats, activation, negative_slope, output_mask, backend))


normalize_grad_input = torch.library.custom_op(
    "fastbn::normalize_grad_input", _normalize_grad_input, mutates_args=()
)


@normalize_grad_input.register_fake
def _normalize_grad_input_fake(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                               grad_means, eps, use_batch_stats, activation, negative_slope,
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
    """Whether a call on x may skip the dispatcher: a plain tensor with data, outside
    torch.compile.

    Tracing (torch.compile, export, torch.jit.trace: its graph records each op as one
    call, where it could not record a Triton launch), tensor subclasses (fake tensors,
    DTensor, ...) and meta tensors see the custom ops, which is what they understand (the
    ops' fake implementations serve meta tensors on every backend); eager calls run the same
    implementation with the same autograd formulas, without the dispatcher's Python layers.
    """
    return not torch.compiler.is_compiling() and direct_uncompiled(x)


def direct_uncompiled(x: Tensor) -> bool:
    """``direct(x)`` for a caller that knows it is not compiling."""
    return (type(x) is Tensor and not x.is_meta
            and not torch._C._is_tracing())  # (torch.jit.is_tracing, without its script test)


_PLAIN = (Tensor, torch.nn.Parameter)


def plain(*tensors: Optional[Tensor]) -> bool:
    """Whether every tensor given (None aside) is a plain tensor or Parameter with data: what
    may go to the kernels beside a ``direct`` x."""
    for t in tensors:  # noqa: SIM110 (a loop: no generator on the hot path)
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


def transform_active() -> bool:
    """Whether a torch.func transform or a forward-AD dual level is active (see the module
    docstring): two cheap reads of interpreter state, for a caller that knows it is not
    compiling (never true while compiling)."""
    return (torch.autograd.forward_ad._current_level >= 0
            or _functorch.peek_interpreter_stack() is not None)


def call_batch_stats_(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    backend: str,
    for_normalize: bool = False,
    eager: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """``batch_stats_``: mean and var, running statistics updated in place. With
    ``for_normalize`` (the caller hands them to ``call_normalize`` only) an eager call on
    the "torch" backend gets them as ``cpu.batch_stats_as_computed_`` gives them, in the
    compute dtype where that is exact enough, instead of STATS_DTYPE. ``eager``: as
    call_normalize's."""
    if eager is None:
        eager = direct(x) and plain(running_mean, running_var, num_batches_tracked)
    if not eager:
        return batch_stats_(x, running_mean, running_var, num_batches_tracked, momentum,
                            backend)
    function = (cpu.batch_stats_as_computed_ if for_normalize and backend == "torch"
                else implementation(backend).batch_stats_)
    result = function(x, running_mean, running_var, num_batches_tracked, momentum)
    count_mutations(running_mean, running_var, num_batches_tracked)
    return result


def count_mutations(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor]) -> None:
    """Bump the version counters of the running statistics and step count after an eager
    call changed them, as the mutating ops' ADInplaceOrView kernels do (the Triton kernel
    counts num_batches_tracked too), in one call where they are given together."""
    if running_mean is not None and running_var is not None:
        torch.autograd.graph.increment_version(
            (running_mean, running_var) if num_batches_tracked is None
            else (running_mean, running_var, num_batches_tracked)
        )
    else:
        for mutated in (running_mean, running_var, num_batches_tracked):
            if mutated is not None:
                torch.autograd.graph.increment_version(mutated)


class _Normalize(torch.autograd.Function):
    """``normalize`` for eager calls: the op's implementation and autograd formula. (The
    forward takes ctx itself: with a separate setup_context, apply() binds the signature
    through inspect on every call. Its arguments are the tensors that may take a gradient,
    x, weight, bias and the residual; mean, var and the six non-tensor arguments travel as
    one tuple: apply walks its arguments one by one, and autograd its inputs per call.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, options):
        mean, var, eps, use_batch_stats, activation, negative_slope, save_mask, backend = options
        output = normalized(x, mean, var, weight, bias, residual, eps, use_batch_stats,
                            activation, negative_slope, save_mask, backend)
        if output[1] is not None:  # (None: the Triton launchers' way to say "no mask")
            ctx.mark_non_differentiable(output[1])
        if keeps_output(activation, backend):
            _keep_output_for_backward(ctx, x, mean, var, weight, bias, residual, output[0],
                                      eps, use_batch_stats, activation, negative_slope,
                                      backend)
        else:
            _keep_for_backward(ctx, x, mean, var, weight, bias, residual, output[1], eps,
                               use_batch_stats, activation, negative_slope, save_mask, backend)
        ctx.set_materialize_grads(False)  # see _gradients
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        return (*_eager_gradients(ctx, grad_out), None)  # x, weight, bias, residual; options


def _eager_gradients(ctx, grad_out):
    """_gradients for the eager Functions, whose first four arguments are x, weight, bias and
    the residual."""
    want_input, want_weight, want_bias, want_residual = ctx.needs_input_grad[:4]
    return _gradients(ctx, grad_out, want_input, want_weight, want_bias, want_residual)


def _eager_apply(function: type) -> Any:
    """``function.apply`` for eager calls: the C method that autograd.Function.apply ends in,
    without its Python layer (a check for functorch transforms, which an eager call is never
    under, and the unwrapping of dead functorch wrappers, which the eager callers do for their
    own arguments: ``_live``)."""
    return super(torch.autograd.Function, function).apply


def _live(t: Optional[Tensor]) -> Optional[Tensor]:
    """t, unwrapped when it is a dead functorch wrapper (one that outlived its transform),
    as autograd.Function.apply unwraps its arguments: such a tensor has no storage."""
    return t if t is None else _functorch.unwrap_if_dead(t)


_apply_normalize = _eager_apply(_Normalize)


def call_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    use_batch_stats: bool,
    activation: str,
    negative_slope: float,
    save_mask: bool,
    backend: str,
    eager: Optional[bool] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``normalize``: (y, activation mask; None for an eager call that saves none, the custom
    op's empty tensor otherwise). ``eager`` says whether the call may skip the
    dispatcher (``direct(x)`` and ``plain`` of the other tensors) where the caller knows."""
    if eager is None:
        eager = direct(x) and plain(mean, var, weight, bias, residual)
    if eager:
        if torch.is_grad_enabled() and requires_grad(x, weight, bias, residual):
            return _apply_normalize(
                _live(x), _live(weight), _live(bias), _live(residual),
                (_live(mean), _live(var), eps, use_batch_stats, activation, negative_slope,
                 save_mask, backend))
        # No backward can follow (inference, eval under no_grad): no autograd node to build.
        return normalized(x, mean, var, weight, bias, residual, eps, use_batch_stats,
                          activation, negative_slope, save_mask, backend)
    return normalize(x, mean, var, weight, bias, residual, eps, use_batch_stats, activation,
                     negative_slope, save_mask, backend)


class _TrainForward(torch.autograd.Function):
    """The training forward's autograd: ``batch_norm_train_`` (a mutating op, which
    torch.library gives no autograd formula) inside, normalize's backward with batch
    statistics outside, so gradients reach x, weight, bias and the residual only: its
    arguments, as _Normalize's, so normalize's context and formula serve as they are. The
    rest is one tuple, (running_mean, running_var, num_batches_tracked, momentum, eps,
    activation, negative_slope, save_mask, backend, eager) (fewer autograd inputs: a few
    microseconds per forward and backward), ``eager`` saying whether the forward runs the
    op's body (see ``direct``) or the op. It returns y alone:
    the activation mask is kept for the backward, and no caller wants it (an output more
    costs autograd work on every call, a few microseconds)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, options):
        (running_mean, running_var, num_batches_tracked, momentum, eps, activation,
         negative_slope, save_mask, backend, eager) = options
        y, mean, var, activation_mask = _train_forward(
            x, running_mean, running_var, num_batches_tracked, momentum, weight, bias, residual,
            eps, activation, negative_slope, save_mask, backend, eager)
        _keep_for_backward(ctx, x, mean, var, weight, bias, residual, activation_mask, eps, True,
                           activation, negative_slope, save_mask, backend)
        if eager:
            ctx.set_materialize_grads(False)  # see _gradients
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return (*_eager_gradients(ctx, grad_out), None)  # x, weight, bias, residual; options


_apply_train_forward = _eager_apply(_TrainForward)


def _train_forward(x, running_mean, running_var, num_batches_tracked, momentum, weight, bias,
                   residual, eps, activation, negative_slope, save_mask, backend, eager):
    """(y, mean, var, activation mask) by the op's body (``eager``: version counters bumped
    here) or by the op."""
    if not eager:
        return batch_norm_train_(x, running_mean, running_var, num_batches_tracked, momentum,
                                 weight, bias, residual, eps, activation, negative_slope,
                                 save_mask, backend)
    result = trained(x, running_mean, running_var, num_batches_tracked, momentum, weight, bias,
                     residual, eps, activation, negative_slope, save_mask, backend)
    count_mutations(running_mean, running_var, num_batches_tracked)
    return result


def call_batch_norm_train_(x: Tensor, running_mean, running_var, num_batches_tracked, momentum,
                           weight, bias, residual, eps, activation, negative_slope, save_mask,
                           backend, eager: Optional[bool] = None) -> Tensor:
    """The training forward with batch statistics, running statistics updated in place:
    y, differentiable as ``normalize``'s with use_batch_stats (its activation mask, when
    saved, only for the backward). An
    eager call on the "torch" backend is ``call_batch_stats_`` (its statistics as computed)
    then ``call_normalize``. ``eager``: as call_normalize's, of all the tensors."""
    if eager is None:
        eager = direct(x) and plain(running_mean, running_var, num_batches_tracked, weight,
                                    bias, residual)
    # A tensor subclass among weight, bias and the residual alone (a TwoTensor weight) runs
    # an op once per component: the running statistics would take the batch that often. Then
    # the statistics op sees the plain tensors only, as torch's own kernel would.
    # Under torch.jit.trace too: a trace records an autograd.Function as a node that reruns
    # its Python forward besides the op inside, which would update the running statistics
    # twice per replay; the separate ops have registered autograd formulas instead. And
    # under torch.export: its graph keeps the ops but not an autograd.Function's backward,
    # so the one mutating op (which torch.library lets have no autograd formula) would make
    # the exported program's output impossible to differentiate.
    # (An eager call is none of these: direct excludes tracing and compiling, plain every
    # subclass.)
    if (backend == "torch") if eager else (torch.compiler.is_exporting() or (
        not torch.compiler.is_compiling() and (
            torch._C._is_tracing()
            or (plain(x, running_mean, running_var, num_batches_tracked)
                and not plain(weight, bias, residual))
        ))):
        known = eager or None  # (else each call asks for its own tensors)
        mean, var = call_batch_stats_(x.detach(), running_mean, running_var,
                                      num_batches_tracked, momentum, backend,
                                      for_normalize=True, eager=known)
        return call_normalize(x, mean, var, weight, bias, residual, eps, True, activation,
                              negative_slope, save_mask, backend, known)[0]
    if torch.is_grad_enabled() and requires_grad(x, weight, bias, residual):
        if eager:
            return _apply_train_forward(
                _live(x), _live(weight), _live(bias), _live(residual),
                (_live(running_mean), _live(running_var), _live(num_batches_tracked), momentum,
                 eps, activation, negative_slope, save_mask, backend, eager))
        return _TrainForward.apply(
            x, weight, bias, residual,
            (running_mean, running_var, num_batches_tracked, momentum, eps, activation,
             negative_slope, save_mask, backend, eager))
    # No backward can follow: no autograd node to build.
    return _train_forward(
        x, running_mean, running_var, num_batches_tracked, momentum, weight, bias, residual,
        eps, activation, negative_slope, save_mask, backend, eager)[0]


def requires_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether some tensor given requires a gradient."""
    for t in tensors:  # noqa: SIM110 (a loop: no generator on the hot path)
        if t is not None and t.requires_grad:
            return True
    return False


def call_normalize_backward(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``normalize_backward(*args)``; the op itself when its result will be differentiated
    again (grad mode on inside a backward means create_graph=True). Under vmap (batched
    gradients) the reference formulas, which every transform can run, whatever the backend."""
    grad_out = args[0]
    # (Never while compiling, which traces this from _TrainForward.backward: dynamo cannot
    # trace the functorch queries, and a compiled region sees no functorch wrappers.)
    if torch.compiler.is_compiling():
        return normalize_backward(*args)
    if (transform_active() or _functorch.is_functorch_wrapped_tensor(grad_out)
            or _functorch.is_legacy_batchedtensor(grad_out)):  # autograd.grad(is_grads_batched)
        *tensors, eps, use_batch_stats, activation, negative_slope, output_mask, _ = args
        inputs = BackwardInputs(*tensors, eps, activation, negative_slope)
        return reference.normalize_backward(inputs, use_batch_stats, output_mask)
    if torch.is_grad_enabled():
        return normalize_backward(*args)
    return _call(normalize_backward, _normalize_backward_eager, args, 8, compiling=False)


def call_normalize_grad_sums(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``normalize_grad_sums(*args)``: (sums, d weight, d bias)."""
    return _call(normalize_grad_sums, _normalize_grad_sums_eager, args, 8)


def call_normalize_grad_input(*args: Any) -> tuple[Tensor, Tensor]:
    """``normalize_grad_input(*args)``: (d input, d residual)."""
    return _call(normalize_grad_input, _normalize_grad_input_eager, args, 9)


def _call(op: Any, body: Any, args: tuple, tensors: int, compiling: Optional[bool] = None
          ) -> Any:
    """op(*args), whose first ``tensors`` arguments are the (optional) tensors; for an eager
    call (see ``direct``) on plain tensors, the op's body ``body(*args)`` without the
    dispatcher. ``compiling=False``: the caller knows it is not compiling (asked once)."""
    x = args[0]
    eager = direct_uncompiled(x) if compiling is False else direct(x)
    if eager and plain(*args[1:tensors]):
        return body(*args)
    return op(*args)


# ---------------------------------------------------------------------------------------------
# The composite route: torch.func transforms and forward-mode AD
# ---------------------------------------------------------------------------------------------


def composite_batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    residual: Optional[Tensor],
    activation: str,
    negative_slope: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    """fastbn.batch_norm (arguments already checked) in differentiable torch operations: the
    reference's formulas, which vmap, grad, jvp, jacrev, jacfwd and forward-mode AD all
    transform. In training the running statistics are updated from the detached batch
    statistics, as torch's kernel does under these transforms (see ``_update_state_``)."""
    if training:
        mean, var = reference.batch_mean_var(x)
        _update_state_(running_mean, running_var, num_batches_tracked, mean, var,
                       conventions.reduced_count(x), momentum)
    else:
        mean, var = running_mean, running_var
    hi, _, _, scale, shift = reference.channel_constants(x, mean, var, weight, bias, eps)
    u = reference.pre_activation(x, hi, scale, shift, residual)
    y = reference.activation_forward(u, activation, negative_slope).to(x.dtype)
    if _functorch.is_functorch_wrapped_tensor(x):  # strides are the transform's business
        return y
    return in_output_format(y, x)


def _update_state_(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """reference.batch_stats_'s state update from detached statistics, under a transform.

    The statistics are brought down to the level of the state they update: grad / jvp
    wrappers peeled off (the update is not differentiated), while a vmap batch cannot be, so
    batched statistics need batched state (``torch.func.stack_module_state``), as torch's
    batch rule demands. That check raises before anything changes. State that no transform
    wrapped (a module's buffers captured by ``grad``) is updated with functorch set aside,
    like torch's own kernel writes its running statistics.
    """
    state = running_mean if running_mean is not None else num_batches_tracked
    if state is None:
        return
    mean, var = _at_level_of(mean.detach(), state), _at_level_of(var.detach(), state)
    guard = (contextlib.nullcontext() if _functorch.is_functorch_wrapped_tensor(state)
             else torch._C._DisableFuncTorch())
    with guard:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and running_var is not None:
            reference.update_running_stats_(running_mean, running_var, num_batches_tracked,
                                            mean, var, count, momentum)


def _at_level_of(value: Tensor, target: Tensor) -> Tensor:
    """value without the functorch wrappers above target's level (see _update_state_)."""
    level = _functorch.maybe_get_level(target)
    while _functorch.maybe_get_level(value) > level:
        if _functorch.is_batchedtensor(value):
            raise RuntimeError(
                "batch_norm: under vmap the input is batched but the running statistics it "
                "updates in place are not; batch them too (torch.func.stack_module_state), "
                "or use track_running_stats=False, or eval mode"
            )
        value = _functorch.get_unwrapped(value)
    return value
