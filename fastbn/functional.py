"""fastbn.batch_norm: torch.nn.functional.batch_norm's contract, plus fused residual/activation.

Every check runs before anything changes: a bad call raises the exception type torch raises
for the same mistake, with a message that names it, and leaves the running statistics and
``num_batches_tracked`` as they were.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastbn import cpu, ops
from fastbn.backend import recorded_backend, resolve_backend
from fastbn.conventions import ACTIVATIONS, SIGN_ACTIVATIONS
from fastbn.reference import activation_forward

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMBERS = (float, int)


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

    input: (N, C, *S) of any rank >= 2 (like F.batch_norm), any memory format;
    float16/bfloat16 (parameters and buffers in float32 or the input's dtype), float32,
    float64. The output has the input's dtype, and the memory format torch's BatchNorm
    gives (the input's when it is contiguous in some format, else the one its strides
    suggest). An input with no elements is served as torch serves it (its empty-input
    shortcut: input * weight[0] + bias[0], nothing else checked or changed but
    num_batches_tracked).

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
    compiling = torch.compiler.is_compiling()  # (asked once: the calls below are told)
    if check_arguments(
        input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
        activation_name, num_batches_tracked, negative_slope=negative_slope,
        compiling=compiling,
    ):
        return _empty_batch_norm(
            input, running_mean, running_var, weight, bias, training, eps, residual,
            activation_name, negative_slope, num_batches_tracked,
        )
    if not compiling:  # (tracing sees the custom ops and plain tensors)
        negative = _negative(input, weight, bias, residual, running_mean, running_var,
                             num_batches_tracked)  # (one test for the common case: none)
        if ops.transform_active() or (
            negative and _negative(running_mean, running_var, num_batches_tracked)
        ):
            return ops.composite_batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps,
                residual, activation_name, negative_slope, num_batches_tracked,
            )
        # Negative-bit views (torch._neg_view) hold their values negated in memory, and the
        # kernels read memory: such a tensor is resolved first, the one copy made for it.
        if negative and _negative(input, weight, bias, residual):
            input, weight, bias, residual = (
                None if t is None else t.resolve_neg() for t in (input, weight, bias, residual)
            )
    backend = resolve_backend(input, compiling)
    native = training and backend == "torch" and cpu.serves_natively(
        input, running_mean, running_var, weight, bias, activation_name, negative_slope
    )
    eager = not compiling and ops.direct_uncompiled(input) and ops.plain(
        running_mean, running_var, weight, bias, residual, num_batches_tracked)
    if native and eager:
        output = cpu.native_training_forward(input, running_mean, running_var, weight, bias,
                                             residual, momentum, eps, num_batches_tracked,
                                             activation_name, negative_slope)
        if output is not None:  # (its in-place updates bumped the state's versions)
            return output
    # A call the native route could serve keeps its residual, not the mask, on the ops'
    # route too: the backward then recomputes the pre-activation and differentiates the
    # activation by torch's kernels, as the native route's autograd nodes do (the same
    # gradient at a NaN pre-activation of either sign, where the mask's sign test differs).
    # An eager relu call on the "torch" backend keeps its output instead (ops.keeps_output).
    save_mask = not native and not (eager and ops.keeps_output(activation_name, backend)) and (
        saves_activation_mask(activation_name, input, weight, bias, residual))
    if not eager:  # a traced call: an exported or traced program picks it when it runs
        backend = recorded_backend(backend, compiling)
    if training:
        output = ops.call_batch_norm_train_(
            input, running_mean, running_var, num_batches_tracked, momentum, weight, bias,
            residual, eps, activation_name, negative_slope, save_mask, backend, eager,
        )
    else:
        output, _ = ops.call_normalize(
            input, running_mean, running_var, weight, bias, residual, eps, False,
            activation_name, negative_slope, save_mask, backend, eager,
        )
    return output


def _negative(*tensors: Tensor | None) -> bool:
    """Whether some tensor given is a negative-bit view."""
    for t in tensors:  # noqa: SIM110 (a loop: no generator on the hot path)
        if t is not None and t.is_neg():
            return True
    return False


def _empty_batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, training: bool, eps: float,
    residual: Tensor | None, activation: str, negative_slope: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """batch_norm of an input without elements: torch's own (its empty-input shortcut, which
    reads neither the statistics nor the shapes of the per-channel tensors), then the fused
    residual and activation; a training step still counts in num_batches_tracked, as in
    torch's module."""
    output = torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, 0.0, eps
    )
    if residual is not None:
        output = output + residual
    output = activation_forward(output, activation, negative_slope)
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return output


def saves_activation_mask(
    activation: str, input: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None,
) -> bool:
    """Whether the forward keeps the activation's bit mask for the backward instead of the
    residual: relu-family activations with a residual, when a backward can follow. Never
    under torch.jit.trace: the trace would record a choice that its check run, and later calls
    of the traced module, can make differently (the residual is kept instead). Nor under
    torch.export: the mask's packed size, ceil(positions / 8), is 1 for up to 8 positions,
    and its contiguity check then adds a guard that a dynamic range reaching that far
    violates (a late stage's 2 x 2 maps, a BatchNorm1d batch of up to 8), where torch's own
    BatchNorm exports."""
    return (
        activation in SIGN_ACTIVATIONS
        and residual is not None
        and torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_exporting()
        and ops.requires_grad(input, weight, bias, residual)
    )


def check_arguments(
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
    negative_slope: float = 0.01,
    compiling: bool | None = None,
) -> bool:
    """Raise for a call batch_norm cannot serve; change nothing. Returns whether input has no
    elements: torch serves that through its empty-input shortcut, which checks no more than
    was checked here. ``whole_batch=False`` says input is one rank's share of a synchronised
    batch, which may hold one value per channel (or none). ``compiling``: whether
    torch.compile is tracing, where the caller already asked (None: asked here)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    for value in (running_mean, running_var, weight, bias, residual, num_batches_tracked):
        if value is not None and not isinstance(value, Tensor):
            _raise_not_tensor(running_mean, running_var, weight, bias, residual,
                              num_batches_tracked)
    if type(training) is not bool:  # torch's argument parser takes a bool only
        raise TypeError(f"batch_norm: training must be a bool, got {type(training).__name__}")
    if type(momentum) is not float and momentum is not None:  # (the common case, fast)
        _check_number("momentum", momentum, none_allowed=True)
    if type(eps) is not float:
        _check_number("eps", eps)
    if type(negative_slope) is not float:  # (checked whatever the activation, as the others)
        _check_number("negative_slope", negative_slope)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"batch_norm: unknown activation {activation!r}; expected None or one of "
            f"{ACTIVATIONS[1:]}"
        )
    shape = input.shape
    numel = input.numel()
    if training and whole_batch and len(shape) >= 1 and (
        numel == shape[1] if len(shape) >= 2 and shape[1] > 0
        else shape[0] * math.prod(shape[2:]) == 1
    ):  # torch's test: N * prod(spatial) == 1, on the shape (so also for a 1 x 0 input)
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()}"
        )
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    device = input.device
    if residual is not None:
        _check_same_device("residual", residual, device)
        if residual.shape != shape or residual.dtype != input.dtype:
            raise RuntimeError(
                f"batch_norm: residual must match the input's shape {tuple(shape)} and "
                f"dtype {input.dtype}, got {tuple(residual.shape)} and {residual.dtype}"
            )
    if num_batches_tracked is not None:
        _check_same_device("num_batches_tracked", num_batches_tracked, device)
        if num_batches_tracked.numel() != 1 or num_batches_tracked.is_floating_point():
            raise ValueError(
                "batch_norm: num_batches_tracked must be a one-element integer tensor, got "
                f"shape {tuple(num_batches_tracked.shape)} and dtype {num_batches_tracked.dtype}"
            )
    if numel == 0:
        return True
    if len(shape) < 2:
        raise ValueError(f"batch_norm: expected 2D or higher input (got {len(shape)}D input)")
    dtype = input.dtype
    if dtype not in _FLOATING:
        raise NotImplementedError(
            f"batch_norm: input dtype {dtype} is not supported; "
            "expected float16, bfloat16, float32 or float64"
        )
    channels = shape[1]
    allowed = _PARAMETER_DTYPES[dtype]
    per_channel_shape = (channels,)
    dtypes = set()  # float16/bfloat16 input: its dtype or float32, one for all
    for tensor in (weight, bias, running_mean, running_var):
        if tensor is None:
            continue
        tensor_dtype = tensor.dtype
        if (tensor.device != device or tensor.shape != per_channel_shape
                or tensor_dtype not in allowed):
            _raise_per_channel(weight, bias, running_mean, running_var, device, channels, dtype,
                               allowed)
        dtypes.add(tensor_dtype)
    if len(dtypes) > 1:  # (after every tensor's own checks, which name the first mistake)
        _raise_mixed_dtypes(weight, bias, running_mean, running_var, dtype)
    if not training:
        if running_mean is None or running_var is None:  # torch names it, a RuntimeError
            name = "running_mean" if running_mean is None else "running_var"
            raise RuntimeError(
                f"batch_norm: {name} must be defined in evaluation mode (pass "
                "training=True to normalize with batch statistics)"
            )
    elif (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must be given together or both be None"
        )
    elif running_mean is not None and channels > 1 and (
        running_mean.stride(0) == 0 or running_var.stride(0) == 0
    ):  # (the in-place update would raise part-way, after changing the other tensors)
        name = "running_mean" if running_mean.stride(0) == 0 else "running_var"
        raise RuntimeError(
            f"batch_norm: {name} is updated in place in training, but it is an expanded view "
            "(stride 0: its elements share one memory location); pass a tensor of its own"
        )
    if torch.is_grad_enabled() and (
        (running_mean is not None and running_mean.requires_grad)
        or (running_var is not None and running_var.requires_grad)
    ):
        # torch's autograd refuses them (no derivative is defined)
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is not None and tensor.requires_grad:
                raise RuntimeError(
                    f"batch_norm is not differentiable with respect to {name}: it cannot "
                    "have requires_grad=True"
                )
    if training and compiling is None:
        compiling = torch.compiler.is_compiling()
    if training and not compiling and (  # (dynamo cannot trace is_inference)
        _any_inference(running_mean, running_var, num_batches_tracked, input)
    ) and not torch.is_inference_mode_enabled():
        _raise_inference_state(running_mean, running_var, num_batches_tracked)
        if torch.is_grad_enabled() and ops.requires_grad(input, weight, bias, residual):
            raise RuntimeError(  # (torch's message; raised before the running update)
                "batch_norm: Inference tensors cannot be saved for backward: the input is an "
                "inference tensor (made under torch.inference_mode) and the backward needs "
                "it; to work around you can make a clone to get a normal tensor and use it "
                "in autograd"
            )
    if training and momentum is None and running_mean is not None and num_batches_tracked is None:
        raise TypeError(  # F.batch_norm's type for momentum=None: it takes floats only
            "batch_norm: momentum=None (a cumulative moving average) needs num_batches_tracked"
        )
    return False


def _any_inference(*tensors: Tensor | None) -> bool:
    """Whether some tensor given (None aside) is an inference tensor (made under
    torch.inference_mode)."""
    for tensor in tensors:  # noqa: SIM110 (a loop: no generator on the hot path)
        if tensor is not None and tensor.is_inference():
            return True
    return False


def _raise_inference_state(running_mean, running_var, num_batches_tracked) -> None:
    """torch's RuntimeError for an in-place update of an inference tensor outside inference
    mode, naming the first state tensor a training call would update: raised before any of
    them changes (the update itself would raise part-way, after the counter's)."""
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                         ("num_batches_tracked", num_batches_tracked)):
        if _any_inference(tensor):
            raise RuntimeError(
                f"batch_norm: {name} is updated in place in training, but it is an inference "
                "tensor (made under torch.inference_mode), and an inplace update to an "
                "inference tensor outside InferenceMode is not allowed"
            )


# The dtypes a per-channel tensor may have, per input dtype.
_PARAMETER_DTYPES = {
    dtype: frozenset((dtype, torch.float32) if dtype in _FLOATING[:2] else (dtype,))
    for dtype in _FLOATING
}


def _raise_not_tensor(running_mean, running_var, weight, bias, residual,
                      num_batches_tracked) -> None:
    """The TypeError for the first optional argument that is neither a Tensor nor None."""
    optional = {
        "running_mean": running_mean, "running_var": running_var, "weight": weight,
        "bias": bias, "residual": residual, "num_batches_tracked": num_batches_tracked,
    }
    for name, value in optional.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(
                f"batch_norm: {name} must be a Tensor or None, got {type(value).__name__}"
            )


def _per_channel(weight, bias, running_mean, running_var) -> dict:
    """The per-channel arguments by name, in the order the checks name them."""
    return {"weight": weight, "bias": bias, "running_mean": running_mean,
            "running_var": running_var}


def _raise_per_channel(weight, bias, running_mean, running_var, device: torch.device,
                       channels: int, dtype: torch.dtype, allowed: frozenset) -> None:
    """The RuntimeError for the first per-channel tensor that is not a 1-D tensor of
    ``channels`` elements on ``device`` in one of the ``allowed`` dtypes (those of an input
    of ``dtype``): its device, then its shape, then its dtype."""
    for name, tensor in _per_channel(weight, bias, running_mean, running_var).items():
        if tensor is None:
            continue
        _check_same_device(name, tensor, device)
        if tensor.dim() != 1 or tensor.numel() != channels:
            raise RuntimeError(
                f"batch_norm: {name} should be a 1-D tensor of {channels} elements (the "
                f"input's channel count), got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype not in allowed:
            raise RuntimeError(
                f"batch_norm: {name} has dtype {tensor.dtype}, but a {dtype} input needs "
                f"it in {' or '.join(sorted(str(d) for d in allowed))}"
            )


def _raise_mixed_dtypes(weight, bias, running_mean, running_var, dtype: torch.dtype) -> None:
    """The RuntimeError torch raises for per-channel tensors of a float16/bfloat16 input that
    mix the input's dtype and float32 (its kernels take one or the other for all of them),
    naming the first given and the first that differs from it."""
    given = [(name, t.dtype) for name, t in
             _per_channel(weight, bias, running_mean, running_var).items() if t is not None]
    first_name, first_dtype = given[0]
    for name, other in given[1:]:
        if other != first_dtype:
            raise RuntimeError(
                f"batch_norm: {first_name} has dtype {first_dtype} but {name} has dtype "
                f"{other}; with a {dtype} input the per-channel tensors must all be {dtype} "
                "or all be torch.float32"
            )


def _check_number(name: str, value: object, none_allowed: bool = False) -> None:
    """A TypeError naming the argument unless value is a number torch's argument parser
    takes as a float (a Python float, int or bool, a NumPy real scalar), or an allowed
    None. Other real numbers (fractions.Fraction) are refused here, as torch refuses them:
    they would fail in the running update, after the step counter changed."""
    if type(value) in _NUMBERS or (value is None and none_allowed):
        return
    if value is None or not isinstance(value, numbers.Real) or not (
        isinstance(value, _NUMBERS) or type(value).__module__ == "numpy"
    ):
        expected = "a float or None" if none_allowed else "a float"
        raise TypeError(f"batch_norm: {name} must be {expected}, got {type(value).__name__}")


def _check_same_device(name: str, tensor: Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise RuntimeError(
            f"batch_norm: expected all tensors on the input's device {device}, "
            f"but {name} is on {tensor.device}"
        )
