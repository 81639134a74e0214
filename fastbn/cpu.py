"""Fast pure-PyTorch BatchNorm for CPU tensors: the "torch" backend's implementation.

The five functions here have the signatures of ``fastbn.reference`` (the explicit-formula
oracle, float64 statistics, which the tests and the double backward use) and give the
same results to the dtype's precision, by doing less work:

- statistics in one pass: per-channel sums of x - pilot (pilot = the channel's first
  element, so a large mean cancels exactly) and of its square, or torch's own CPU
  statistics kernel where it is fast (channels innermost: channels_last, (N, C); a small
  NCHW tensor, NATIVE_PLANES_MAX). An eager training forward gets them in float32 where
  float32 is exact enough (``batch_stats_as_computed_``; ``normalize`` and its backward
  take statistics in any float dtype), the ops' contract ``batch_stats_`` in STATS_DTYPE;
- normalization by torch's own kernels (``torch.native_batch_norm`` in eval form: one
  pass, ``x * scale + shift``; ``torch.addcmul`` when channels are innermost and the
  tensor has at least ADDCMUL_MIN elements, below which the eval kernel's one op costs
  less than addcmul's six), then the residual and the activation in place on the output;
- the backward by ``aten.native_batch_norm_backward``: one pass for the two sums, one for
  d input; an eager relu call's activation derivative from its output, as torch's F.relu
  takes it (``relu_grad_from_output``, where ``ops.keeps_output``);
- an eager training call where torch's kernel gives the statistics anyway, without
  activation or with one of NATIVE_ACTIVATIONS: one ``torch.native_batch_norm``, the
  residual and the activation in place on its output (``native_training_forward``: torch's
  own autograd nodes, no Python in the backward), with the ops' route computing the same
  bits (``kernel_batch_stats_``, ``normalize_batch``, ``kernel_invstd``).

The exactness rule. ``x * scale + shift`` with shift = bias - mean * scale, and torch's
statistics kernel, which rounds the mean to float32, both move the output by about
|mean| * invstd * eps(compute dtype) (in units of the output's spread). Per call, from the
C-element statistics (free on a CPU: no device to wait for), the cheap form runs when

    max over channels of |mean| * invstd  <=  FAST_RATIO[dtype]

(FAST_RATIO = ROUNDING_BUDGET[dtype] / eps(compute dtype): the extra error stays a small
fraction of the dtype's tolerance); otherwise the call takes the exact hi/lo path of
``fastbn.reference`` ((x - hi) * scale - lo * scale: large-mean inputs stay exact). A NaN
or Inf in the statistics fails the test too, so it takes the exact path, which propagates
it as torch does. Statistics from the one-pass sums fall back to the reference's two-pass
ones when the pilot lies far from the mean (mean(x - pilot)^2 > PILOT_CANCELLATION * var:
the subtraction E[t^2] - E[t]^2 would lose more than a few bits).

fp16/bf16 inputs are computed in float32 (statistics, scale and shift, sums), outputs in
the input dtype. Tensors not on the CPU, and strides other than contiguous or
channels-last, are served by ``fastbn.reference`` itself: reading the C-element
statistics back would be a device sync there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastbn import reference
from fastbn.conventions import (
    STATS_DTYPE,
    BackwardInputs,
    compute_dtype,
    reduced_count,
    unbiasing_factor,
)
from fastbn.reference import channel_view, derivative_is_one, like_input, reduced_dims

ROUNDING_BUDGET = {
    torch.float64: 2.0**-40,
    torch.float32: 2.0**-19,
    torch.float16: 2.0**-13,
    torch.bfloat16: 2.0**-10,
}
"""How far (in units of the output's spread) the cheap form may move the output: about a
fifth of the suite's tolerance for the dtype (tests/helpers.py TOLERANCES)."""

FAST_RATIO = {
    dtype: budget / torch.finfo(compute_dtype(dtype)).eps
    for dtype, budget in ROUNDING_BUDGET.items()
}
"""The largest max |mean| * invstd for which the cheap form runs (see the module docstring):
16 for float32, 1024 for float16, 8192 for bfloat16, 4096 for float64."""

PILOT_CANCELLATION = 16.0
"""One-pass sums are kept while mean(x - pilot)^2 <= this * var (at most ~4 bits lost)."""

_BITS_TO_BYTE = 0x0102040810204080
"""Multiplying 8 little-endian 0/1 bytes by this puts byte j's bit at bit 56 + j."""


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
"""The channels-innermost memory format of each rank that has one."""


def fast_layout(x: Tensor) -> str | None:
    """"planes" for contiguous (N, C, *S), "rows" when channels are innermost
    (channels_last, channels_last_3d, a contiguous (N, C) matrix), else None."""
    if not x.is_cpu or x.numel() == 0:  # (is_cpu: no device object built per call)
        return None
    if x.dim() == 2:
        return "rows" if x.is_contiguous() else None
    if x.is_contiguous():
        return "planes"
    channels_last = _CHANNELS_LAST.get(x.dim())
    if channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return "rows"
    return None


def within_ratio(mean: Tensor, var: Tensor, eps: float, ratio: float) -> bool:
    """max |mean| / sqrt(var + eps) <= ratio over the channels, as min(var - mean^2 / ratio^2)
    >= -eps in two C-element ops and a host read; False for NaN or Inf (min propagates NaN;
    the full reduction min(), cheaper per call than amin()).

    Reads C-element CPU tensors on the host: no device involved (fast_layout keeps every
    other device on the reference path). The read is ``host_scalar``'s."""
    return host_scalar(torch.addcmul(var, mean, mean, value=-1.0 / ratio**2).min()) >= -eps


def host_scalar(t: Tensor) -> float:
    """The value of a one-element CPU tensor as a Python number: ``t.tolist()``, the same
    value as ``t.item()``, read directly, without item's two dispatched ops (item,
    _local_scalar_dense). Dispatched ops cost most right after a large kernel has evicted
    the dispatcher's data from the caches, which is where a BatchNorm call's host reads
    run."""
    return t.tolist()


STATS_RATIO = FAST_RATIO[torch.float32]
"""Statistics whose float32 mean m satisfies |m| / std <= STATS_RATIO need no more than
float32: torch's statistics kernel (float32 sums, mean rounded to float32) is accepted
there, and the cheap form then holds for every eps and every dtype (FAST_RATIO >= this)."""


def pilot_sums(x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(pilot, mean(t), biased var) in the compute dtype from one pass of sums of
    t = x - pilot and t^2; or None when the pilot is too far from the mean for them
    (mean(t)^2 > PILOT_CANCELLATION * var(t))."""
    count = reduced_count(x)
    dtype = compute_dtype(x.dtype)
    # Non-finite pilots to 0: an inf pilot makes inf - inf.
    pilot = first_of_each_channel(x).nan_to_num(0.0, 0.0, 0.0)
    if x.dtype == dtype:
        shifted = x - channel_view(pilot, x)
    else:  # one conversion pass, then in place: faster than a mixed-dtype subtraction
        pilot = pilot.to(dtype)
        shifted = x.to(dtype).sub_(channel_view(pilot, x))
    first = channel_sums(shifted)
    second = channel_sums(shifted.square_())
    del shifted  # freed before the output is allocated, which then takes its memory
    # mean(t)^2 <= K var(t) = K (mean(t^2) - mean(t)^2)  <=>  sum(t^2) >= (K + 1) / K sum(t)^2 / M
    ratio = (1 + PILOT_CANCELLATION) / PILOT_CANCELLATION
    if not host_scalar(torch.addcmul(second, first, first, value=-ratio / count).amin()) >= 0:
        return None
    shifted_mean = first.div_(count)
    var = torch.addcmul(second.div_(count), shifted_mean, shifted_mean, value=-1).clamp_min_(0)
    return pilot, shifted_mean, var


def channel_sums(t: Tensor) -> Tensor:
    """Per-channel sums of a ``fast_layout`` t, in its dtype, each by reductions over one
    dimension, which torch's CPU sum accumulates in a cascade (error growing with the log
    of the count): a contiguous (N, C, *S) t over S, then over N; a channels-innermost t
    over its rows (one dimension in memory). torch's sum over N and S together accumulates
    along N one value at a time: at (524288, 2, 2) float32 it is 6.7e-6 off (relative to
    the sum of magnitudes), the two steps 1.6e-8, and faster (4.2 against 16.3 ms on two
    cores; no slower at (8, 64, 56, 56), (32, 256, 14, 14), (32, 2048, 7, 7))."""
    if fast_layout(t) == "planes":
        return t.view(t.shape[0], t.shape[1], -1).sum(2).sum(0)
    return t.sum(reduced_dims(t))


def first_of_each_channel(x: Tensor) -> Tensor:
    """x[0, :, 0, ..., 0] as one view op (indexing makes one select per dimension)."""
    return x.as_strided((x.shape[1],), (x.stride(1),))


def native_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """torch's CPU statistics kernel: float32 mean and biased variance (float32 sums). Given
    float32 running buffers (scratch here, left unchanged with momentum 0), it returns
    float32 statistics for float16/bfloat16 input too; float32 input needs none."""
    if x.dtype == torch.float32:
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    scratch = x.new_zeros(x.shape[1], dtype=torch.float32)
    return torch.batch_norm_update_stats(x, scratch, scratch, 0.0)


def mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, as exact as ``reference.batch_mean_var``, in the
    compute dtype where that is exact enough (|mean| / std <= STATS_RATIO, or float64
    input), else in STATS_DTYPE:

    - float32 with channels innermost, float16, bfloat16, a small float32 NCHW
      (``native_statistics``): torch's statistics kernel;
    - otherwise (a larger float32 NCHW, where torch's kernel is a slow scalar loop; float64;
      a large mean): one-pass pilot sums, whose mean pilot + mean(t) is exact in float64;
    - when neither holds (far pilot): the reference's two passes."""
    if fast_layout(x) is None or reduced_count(x) == 0:
        return reference.batch_mean_var(x)
    if native_statistics(x):
        mean, var = native_mean_var(x)
        if within_ratio(mean, var, 0.0, STATS_RATIO):
            return mean, var
    return exact_mean_var(x)


def exact_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_var`` without torch's statistics kernel (fast layouts, count > 0): one-pass
    pilot sums, else the reference's two passes."""
    sums = pilot_sums(x)
    if sums is None:
        return reference.batch_mean_var(x)
    pilot, shifted_mean, var = sums
    if x.dtype == torch.float64:
        return shifted_mean.add_(pilot), var
    mean = shifted_mean + pilot
    if within_ratio(mean, var, 0.0, STATS_RATIO):
        return mean, var
    return pilot.to(STATS_DTYPE) + shifted_mean.to(STATS_DTYPE), var.to(STATS_DTYPE)


NATIVE_PLANES_MAX = 1 << 16
"""Up to this many elements a contiguous (NCHW) float32 x takes torch's statistics kernel
(and so, in an eager training call, the one ``torch.native_batch_norm`` of
``native_training_forward``, differentiated by torch): that kernel is a scalar loop per
channel (float64 sums), slower than the pilot sums' vectorized passes on larger planes, but
on a small tensor the per-call cost of the pilot sums' dozen small ops and of the Python
backward dominates. Measured on 1 thread (training forward / forward+backward, time of the
pilot route over the native one): (4, 8, 4, 4) 2.4 / 2.2, (8, 64, 8, 8) 1.7 / 1.7,
(16, 64, 8, 8) 1.3-1.5 / 1.4-1.5, (4, 64, 16, 16) 1.3 / 1.5; at 2^17 elements the forward
ties or loses where the planes are large ((4, 32, 32, 32) 0.88, (2, 16, 64, 64) 0.93)."""


def native_statistics(x: Tensor) -> bool:
    """Whether ``mean_var`` takes x's statistics from torch's kernel when the rule holds:
    float16/bfloat16 of a fast layout, float32 with channels innermost, float32 NCHW of at
    most NATIVE_PLANES_MAX elements."""
    layout = fast_layout(x)
    return layout is not None and x.dtype != torch.float64 and (
        layout == "rows" or x.dtype != torch.float32 or x.numel() <= NATIVE_PLANES_MAX)


def kernel_per_channel(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether torch's kernels take every per-channel tensor given (None aside) beside a
    ``native_statistics`` x as float32, which their mixed-type form needs for float16/
    bfloat16 x: float32 tensors as they are, tensors of x's float16/bfloat16 dtype
    converted to float32 (exactly; ``as_kernel_parameter``)."""
    for t in tensors:  # noqa: SIM110 (a loop: no generator on the hot path)
        if t is not None and t.dtype != torch.float32 and t.dtype != x.dtype:
            return False
    return True


def as_kernel_parameter(t: Tensor | None) -> Tensor | None:
    """A ``kernel_per_channel`` tensor as torch's kernels take it: float32 (a float16/
    bfloat16 weight or bias converted, a step autograd records: its gradient comes back
    rounded once to the tensor's dtype, as the ops' route rounds it)."""
    return cast(t, torch.float32)


def kernel_running_scratch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroed float32 running buffers (mean, var) for torch's statistics kernel: with
    momentum 1 it writes x's float32 mean into the first and the unbiased variance into the
    second (sum / (count - 1), rounded once), exactly: 1 * v + 0 * 0 = v. Fresh per call
    (a reused one could hold a NaN from the last call, and 0 * NaN is NaN); two
    allocations, cheaper per call than the rows of one (2, C) tensor (unbind is an op)."""
    channels = x.shape[1]
    return (x.new_zeros(channels, dtype=torch.float32),
            x.new_zeros(channels, dtype=torch.float32))


def accept_kernel_statistics_(
    scratch: tuple[Tensor, Tensor], running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, momentum: float | None,
) -> bool:
    """Whether the statistics torch's kernel wrote into ``kernel_running_scratch`` pass the
    rule, max |mean| / std <= STATS_RATIO (std unbiased); if so, the state changes as
    ``update_state_`` changes it, from the scratch rows. Nothing changes otherwise.

    The one acceptance test and state update of both routes that use torch's kernel (the
    eager ``native_training_forward`` and the ops' ``kernel_batch_stats_``): given the same
    scratch they accept alike and write the same bits."""
    mean, unbiased_var = scratch
    if not within_ratio(mean, unbiased_var, 0.0, STATS_RATIO):
        return False
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None and running_var is not None:
        if running_mean.dtype == torch.float32:
            lerp_running_stats_(running_mean, running_var, num_batches_tracked, mean,
                                unbiased_var, momentum)
        else:  # (float16/bfloat16 buffers: rounded once, as on the other routes)
            update_rounded_running_stats_(running_mean, running_var, num_batches_tracked,
                                          mean, unbiased_var, 1.0, momentum)
    return True


def kernel_batch_stats_(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, momentum: float | None,
) -> tuple[Tensor, Tensor] | None:
    """``batch_stats_as_computed_`` by torch's statistics kernel, for a
    ``native_statistics`` input with float32 running buffers (or none): float32 (mean, var),
    the state changed by ``accept_kernel_statistics_``; None with nothing changed when the
    rule fails."""
    scratch = kernel_running_scratch(x)
    mean, var = torch.batch_norm_update_stats(x, *scratch, 1.0)
    if not accept_kernel_statistics_(scratch, running_mean, running_var, num_batches_tracked,
                                     momentum):
        return None
    return mean, var


def kernel_invstd(var: Tensor, eps: float) -> Tensor:
    """1 / sqrt(var + eps) as torch's CPU training kernel computes it (save_invstd): in
    float64, rounded once to var's dtype. (torch's float64 rsqrt on a CPU is 1 / sqrt,
    both correctly rounded, vectorized or not: the same bits as sqrt_ then reciprocal_,
    one op fewer.)"""
    return (var.double() + eps).rsqrt_().to(var.dtype)


def native_training_forward(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    activation: str = "none",
    negative_slope: float = 0.0,
) -> Tensor | None:
    """activation(BatchNorm(x) + residual) with batch statistics for an eager call that
    ``serves_natively``: one ``torch.native_batch_norm``, the residual added and the
    activation applied in place on its output (``epilogue_``), each step recorded by
    torch's autograd (NativeBatchNormBackward0, AddBackward0, then ReluBackward0 from the
    output or LeakyReluBackward0 from its input: no Python in the backward, no mask and no
    recomputation).

    The same bits as the ops' route (batch_stats_, normalize_batch, normalize_backward),
    which for these calls runs the same kernels on the same values: its statistics and
    state update are ``kernel_batch_stats_``'s (one acceptance test and update,
    ``accept_kernel_statistics_``), its output ``kernel_training_output``'s with the same
    epilogue, its backward the activation's backward and torch's backward kernel with
    ``kernel_invstd`` on the gradient in x's format (what a traced call's backward
    receives). A float16/bfloat16 call's gradient is converted to x's format at the first
    node (``grad_in_format_hook``, where ``converts_gradient_format``); a float32 call's
    goes to torch's nodes as it comes, as in torch's own model. None, with nothing changed,
    when the statistics fail the rule: the caller takes the exact path."""
    scratch = kernel_running_scratch(x)
    y, _, _ = torch.native_batch_norm(x, as_kernel_parameter(weight), as_kernel_parameter(bias),
                                      *scratch, True, 1.0, eps)
    if not accept_kernel_statistics_(scratch, running_mean, running_var, num_batches_tracked,
                                     momentum):
        return None
    y = same_format(y, x)  # (torch's strides differ from empty_like's on size-1 dimensions)
    if activation == "leaky_relu":  # out of place, as NATIVE_ACTIVATIONS says why
        y, _ = epilogue_(y, x, residual, "none", negative_slope, False)
        y = torch.nn.functional.leaky_relu(y, negative_slope)
    else:
        y, _ = epilogue_(y, x, residual, activation, negative_slope, False)
    if y.requires_grad and converts_gradient_format(x):  # (a pre-hook on y's node: cheaper
        y.grad_fn.register_prehook(grad_in_format_hook(x))  # than Tensor.register_hook)
    return y


def converts_gradient_format(x: Tensor) -> bool:
    """Whether a backward of x hands torch's kernels the output's gradient in x's memory
    format: for float16/bfloat16 x only, whose sums torch's mixed-format BatchNorm backward
    takes in their own dtype. A float32/float64 gradient goes to them as it comes, as
    torch's own layer hands it over: in another format than x's (the expanded gradient of
    a global average pool, a contiguous one for a channels_last x) torch's kernel then takes
    its mixed-format path, whose float64 sums are as exact as torch's layer's, where x's
    format would give its channels-last float32 row sums. (A traced call's backward
    receives x's format from AOTAutograd either way.)"""
    return x.dtype != param_dtype(x)


def epilogue_(
    y: Tensor, x: Tensor, residual: Tensor | None, activation: str, negative_slope: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    """y + residual, then the activation, in place on the normalized y (x's dtype), and the
    packed activation mask of the pre-activation when save_mask (else None): the one
    epilogue of ``normalize``, ``normalize_batch`` and ``native_training_forward`` (where
    autograd records its in-place steps)."""
    if residual is not None:
        y.add_(residual)
    mask = pack_bits(positive(y, activation)) if save_mask else None
    return same_format(activation_(y, activation, negative_slope), x), mask


def grad_in_format_hook(
    x: Tensor,
) -> Callable[[tuple[Tensor | None, ...]], tuple[Tensor | None, ...] | None]:
    """A pre-hook for the autograd node of an output shaped like x (a ``fast_layout`` x)
    that hands the node its output's gradient in x's memory format (None: unchanged where
    it has it already)."""
    strides = x.stride()
    memory_format = memory_format_of(x)

    def hook(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...] | None:
        grad = grads[0]
        if grad is None or grad.stride() == strides:
            return None
        return (in_memory_format(grad, memory_format), *grads[1:])

    return hook


def relu_grad_from_output(grad_out: Tensor, output: Tensor) -> Tensor:
    """relu's backward from its output y, as torch's F.relu computes it (threshold_backward
    of its result): grad_out where y > 0 or is NaN, 0 elsewhere; in y's memory format
    (x's, for a ``fast_layout`` x) where ``converts_gradient_format``, which the backward
    kernel after it then reads; as it comes otherwise, as torch's F.relu takes it."""
    if grad_out.stride() != output.stride() and converts_gradient_format(output) and (
            fast_layout(output) is not None):
        grad_out = in_memory_format(grad_out, memory_format_of(output))
    return torch.ops.aten.threshold_backward.default(grad_out, output, 0.0)


def in_memory_format(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A copy of t in memory_format, by empty_like and copy_, which vmap batches (a batched
    gradient, autograd.grad(..., is_grads_batched=True), can neither be copied into an
    unbatched tensor nor asked ``is_contiguous`` in a channels-last format)."""
    return torch.empty_like(t, memory_format=memory_format).copy_(t)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format of a ``fast_layout`` x: channels_last(_3d) for a 4-D/5-D x with
    channels innermost, else contiguous (a 2-D "rows" x is contiguous)."""
    if x.dim() in _CHANNELS_LAST and not x.is_contiguous():
        return _CHANNELS_LAST[x.dim()]
    return torch.contiguous_format


NATIVE_ACTIVATIONS = ("none", "relu", "leaky_relu")
"""Activations ``native_training_forward`` applies after torch's kernel, as torch's own
modules do, torch's autograd differentiating them: relu in place (relu_: threshold_backward
from the output, zero where it is <= 0; an in-place change of the output before the
backward then raises autograd's version error, as after torch's F.relu, which saves its
output too), leaky_relu with negative_slope >= 0 out of place (leaky_relu_backward from
the pre-activation, the slope where it is not > 0, as torch's F.leaky_relu: its output
may be changed in place before the backward, as torch's may; leaky_relu_ would save its
output and refuse that). Both give ``reference.activation_derivative`` at 0, -0.0,
+-inf and on subnormals; leaky_relu's also at NaN. At a NaN pre-activation (u is NaN only
when the residual, the weight or the bias holds a NaN or an inf: the rule has x's
statistics finite) relu's passes the gradient (NaN <= 0 is false) where
``reference.derivative_is_one`` is False: torch's convention, which this module's backward
without a residual (threshold_backward on the recomputed u) already follows.

Not relu6: torch's hardtanh_backward at NaN depends on where the element lies (the
gradient passes in the kernel's scalar tail, not in its vectorized body), no convention
at all. silu and hardswish need u in their backward. Those stay on the ops' route.

The ops' route of a call the native route could serve (traced, or eager when the rule
fails) keeps the residual rather than the activation mask (functional.batch_norm decides),
so its backward differentiates the activation by the same torch kernels at the recomputed
pre-activation: the same gradient at NaN of either sign, where the mask's sign test
(``positive``) would differ."""


def serves_natively(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, activation: str = "none",
    negative_slope: float = 0.0,
) -> bool:
    """Whether a training call on x may be ``native_training_forward``: an activation of
    NATIVE_ACTIVATIONS that runs after the output's one rounding (ROUNDING_COMMUTES for
    float16/bfloat16 input; leaky_relu with negative_slope >= 0), torch's statistics kernel
    for x, every per-channel tensor in float32 or x's float16/bfloat16 dtype
    (``kernel_per_channel``: the weight and bias go to torch's kernel converted to float32,
    float16/bfloat16 running buffers take the update rounded once from float64)."""
    if activation not in NATIVE_ACTIVATIONS or (
        activation not in ROUNDING_COMMUTES and x.dtype != torch.float32
    ) or (activation == "leaky_relu" and not negative_slope >= 0):
        return False
    return native_statistics(x) and kernel_per_channel(x, running_mean, running_var, weight,
                                                        bias)


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.batch_mean_var``'s contract (STATS_DTYPE) from ``mean_var``."""
    mean, var = mean_var(x)
    return as_dtype(mean, STATS_DTYPE), as_dtype(var, STATS_DTYPE)


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """``reference.update_running_stats_`` (same factor, momentum or 1 / num_batches_tracked
    on the device) in float32, by torch's formula (statistics of any value: this is also the
    exact path's update); float16/bfloat16 (and float64) buffers by
    ``update_rounded_running_stats_``, which rounds once from float64."""
    if running_mean.dtype != torch.float32 or running_var.dtype != torch.float32:
        update_rounded_running_stats_(running_mean, running_var, num_batches_tracked, mean,
                                      var, unbiasing_factor(count), momentum)
        return
    update_float32_running_stats_(running_mean, running_var, num_batches_tracked, mean.float(),
                                  var.float() * reference.unbiasing_factor(count), momentum)


def update_rounded_running_stats_(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, var_scale: float, momentum: float | None,
) -> None:
    """Running buffers of a dtype other than float32 (float16/bfloat16; float64, for float64
    input) moved by torch's formula (1 - factor) * running + factor * batch (the batch's
    unbiased variance var * var_scale: M / (M - 1) for a biased var, 1 for an unbiased
    one), evaluated in float64 from the buffers' and the statistics'
    values (whatever their dtype) and rounded once into each buffer, as
    ``reference.update_running_stats_`` does: in place, four ops per buffer and no Python
    operators, whose wrappers cost more than the ops on these C-element tensors. (The
    reference multiplies float32 statistics by the factor in float32 first, one rounding
    more; torch rounds from float32.)"""
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = num_batches_tracked.to(STATS_DTYPE).reciprocal_()  # (1 / n, rounded once)
        keep = torch.rsub(factor, 1.0)
    for running, batch, scale in ((running_mean, mean, 1.0), (running_var, var, var_scale)):
        moved = running.to(STATS_DTYPE)  # (float64 buffers: the buffer itself, changed in place)
        if momentum is None:
            moved.mul_(keep).addcmul_(batch, factor, value=scale)
        else:
            moved.mul_(1.0 - momentum).add_(batch, alpha=momentum * scale)
        if moved is not running:
            running.copy_(moved)


def update_float32_running_stats_(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, unbiased_var: Tensor, momentum: float | None,
) -> None:
    """The float32 running buffers moved towards float32 batch statistics of any value by
    the factor momentum, or 1 / num_batches_tracked (on the device) for momentum=None, by
    torch's formula (1 - factor) * running + factor * batch: an inf batch statistic gives an
    inf running value for every factor, as in torch's kernels (``lerp_running_stats_``
    gives NaN there for a factor >= 0.5: inf - inf)."""
    # Each buffer by its own ops, not one _foreach_ op per step: on a CPU that runs the same
    # per-buffer ops inside its own dispatch (the same bits), one op more per step.
    if momentum is not None:
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            running.mul_(1.0 - momentum).add_(batch, alpha=momentum)
        return
    factor = momentum_none_factor(num_batches_tracked)
    keep = 1.0 - factor
    for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
        running.mul_(keep).addcmul_(batch, factor)


def lerp_running_stats_(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, unbiased_var: Tensor, momentum: float | None,
) -> None:
    """``update_float32_running_stats_`` for finite batch statistics (those the exactness
    rule accepted, which fails on NaN and inf) in one op per buffer, lerp: running +
    factor * (batch - running), the same value up to rounding. (An inf running value then
    becomes NaN, where torch's formula keeps it inf: a limit the README states.)"""
    # Two lerp_ calls, not one _foreach_lerp_: on a CPU that runs the same two lerp_ inside
    # its own dispatch (the same bits), one op more per call.
    factor = momentum if momentum is not None else momentum_none_factor(num_batches_tracked)
    running_mean.lerp_(mean, factor)
    running_var.lerp_(unbiased_var, factor)


def momentum_none_factor(num_batches_tracked: Tensor | None) -> Tensor:
    """1 / num_batches_tracked in float32, on the device: momentum=None's update factor."""
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return num_batches_tracked.reciprocal().to(torch.float32)


def batch_stats_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """``reference.batch_stats_`` (STATS_DTYPE statistics) from ``batch_stats_as_computed_``."""
    mean, var = batch_stats_as_computed_(x, running_mean, running_var, num_batches_tracked,
                                         momentum)
    return as_dtype(mean, STATS_DTYPE), as_dtype(var, STATS_DTYPE)


def batch_stats_as_computed_(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """``batch_stats_`` with the statistics as ``mean_var`` gives them (the compute dtype
    where that is exact enough), for a caller that hands them to ``normalize`` only (an
    eager training forward): no conversions to float64 and back. Where torch's kernel
    gives the statistics and the running buffers (or none) are ``kernel_per_channel``, by
    ``kernel_batch_stats_`` (as the eager ``native_training_forward`` does)."""
    if native_statistics(x) and kernel_per_channel(x, running_mean, running_var):
        stats = kernel_batch_stats_(x, running_mean, running_var, num_batches_tracked,
                                    momentum)
        if stats is not None:
            return stats
        mean, var = exact_mean_var(x)
    else:
        mean, var = mean_var(x)
    update_state_(x, running_mean, running_var, num_batches_tracked, momentum, mean, var)
    return mean, var


def update_state_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    mean: Tensor,
    var: Tensor,
) -> None:
    """``reference.batch_stats_``'s state changes from x's statistics: the step counter, then
    the running statistics."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None and running_var is not None and reduced_count(x) > 0:
        update_running_stats_(
            running_mean, running_var, num_batches_tracked, mean, var, reduced_count(x), momentum
        )


def param_dtype(x: Tensor) -> torch.dtype:
    """The dtype torch's kernels take statistics and parameters in for input x."""
    return compute_dtype(x.dtype)


def native_constants(
    x: Tensor, mean: Tensor, var: Tensor, eps: float, ratio: float | None = None
) -> tuple[Tensor, Tensor] | None:
    """(mean, var) in param_dtype(x) for torch's kernels, or None when the call must take
    the exact path (another layout or device, or the exactness rule fails: the bound is
    FAST_RATIO[x.dtype], or ``ratio`` where given)."""
    if fast_layout(x) is None:
        return None
    dtype = param_dtype(x)
    mean, var = as_dtype(mean, dtype), as_dtype(var, dtype)
    bound = FAST_RATIO[x.dtype] if ratio is None else ratio
    return (mean, var) if within_ratio(mean, var, eps, bound) else None


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype) (t itself when it has that dtype), without the dispatcher's cost per call
    where no conversion is needed (the common case on the hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else as_dtype(t, dtype)


ADDCMUL_MIN = 1 << 16
"""From this many elements on, ``affine_output`` of a channels-innermost float32/float64 x
is addcmul's: measured on 1 thread (float32, eval kernel / addcmul time), (1024, 256)
1.55, (16, 256, 14, 14) channels_last 1.82, (8, 64, 56, 56) channels_last 1.23, and
2^17 elements 1.3 in every shape tried; at 2^16 ((256, 256)) the two tie (0.84-1.04), and
below it the eval kernel's one op wins: (64, 64) 0.33, (4, 8) 0.30 (3.8 against 12.9 us)."""


def affine_output(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> Tensor:
    """x * scale + shift (scale = weight / sqrt(var + eps), shift = bias - mean * scale) in
    x's dtype and memory format, by the faster of torch's kernels for the tensor: addcmul
    (five small ops for the constants, then one pass) for a float32/float64 x of at least
    ADDCMUL_MIN elements with channels innermost, else torch's eval-mode BatchNorm kernel
    (one op; it takes float16/bfloat16 input with float32 statistics)."""
    dtype = param_dtype(x)
    if x.numel() >= ADDCMUL_MIN and x.dtype == dtype and fast_layout(x) == "rows":
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale.mul_(weight)
        shift = torch.mul(mean, scale).neg_() if bias is None else torch.addcmul(
            as_dtype(bias, dtype), mean, scale, value=-1)
        return torch.addcmul(channel_view(shift, x), x, channel_view(scale, x))
    return torch.native_batch_norm(x, cast(weight, dtype), cast(bias, dtype), mean, var, False,
                                   0.0, eps)[0]


def activation_(y: Tensor, activation: str, negative_slope: float) -> Tensor:
    """act(y) in place."""
    functional = torch.nn.functional
    if activation == "relu":
        return y.relu_()
    if activation == "relu6":
        return y.clamp_(0.0, 6.0)
    if activation == "leaky_relu":
        return functional.leaky_relu_(y, negative_slope)
    if activation == "silu":
        return functional.silu(y, inplace=True)
    if activation == "hardswish":
        return functional.hardswish(y, inplace=True)
    return y


ROUNDING_COMMUTES = ("none", "relu", "relu6")
"""Activations for which act(round(u)) == round(act(u)): on a low-precision output they run
in place after the normalization's one rounding without adding another. A residual is
added there too, as torch's eager add does (one more rounding of the input dtype, within
the dtype's tolerance); other activations on low-precision input take the exact path."""


ROWS_MASK_MIN = 1 << 15
"""From this many elements on, a channels-innermost tensor's mask is packed and unpacked in
its own layout (``pack_rows``, ``unpack_rows``): 16 small ops on 1/8 of the bytes and one
transpose of the packed bytes, instead of a transposing copy of every byte, about twice as
fast on a (8, 64, 56, 56) channels_last input; below it their per-op cost dominates."""


def rows_view(t: Tensor) -> Tensor:
    """The (rows, positions, C) view of a channels-innermost t (``fast_layout`` "rows"): the
    layout of ``mask_positions`` with its last two dimensions swapped, contiguous."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    return t.permute(0, *range(2, t.dim()), 1).flatten(1, -2)


def pack_rows(bits: Tensor) -> Tensor:
    """``reference.pack_bits`` of a channels-innermost bits, bit for bit: byte k of a channel
    is the sum of its positions 8k + j times 2^j (one copy and seven adds of the strided
    (rows, bytes, C) slices of positions j, j + 8, ..., contiguous along C; a last byte
    short of 8 positions takes only the slices that reach it, so no padded copy), then one
    transpose of the packed bytes to the mask's layout."""
    view = rows_view(bits).view(torch.uint8)
    rows, positions, channels = view.shape
    packed = view.new_empty((rows, -(-positions // 8), channels))
    packed.copy_(view[:, 0::8])
    for j in range(1, min(8, positions)):
        source = view[:, j::8]
        packed[:, :source.shape[1]].add_(source, alpha=1 << j)
    return packed.transpose(1, 2).contiguous()


def unpack_rows(mask: Tensor, x: Tensor) -> Tensor:
    """``mask_indicator`` for a channels-innermost x: the packed bytes transposed to
    (rows, bytes, C), eight shifts into a (rows, bytes, 8, C) buffer (x's layout), one
    converting copy."""
    rows, channels, _ = mask.shape
    words = mask.transpose(1, 2).contiguous()
    flags = words.new_empty((rows, words.shape[1], 8, channels))
    for j in range(8):
        torch.bitwise_right_shift(words, j, out=flags[:, :, j])
    flags = flags.bitwise_and_(1).flatten(1, 2)[:, :rows_view(x).shape[1]]
    if x.dim() == 2:
        flags = flags[0]
    else:
        flags = flags.unflatten(1, x.shape[2:]).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return torch.empty_like(x).copy_(flags)


def pack_bits(bits: Tensor) -> Tensor:
    """``reference.pack_bits``, bit for bit: ``pack_rows`` for a large channels-innermost
    bits; else by one multiply per 8 positions: the packed byte
    is the top byte of each product, read out as a strided view (little-endian). In place on
    ``bits`` (a temporary of the caller's, which this consumes) when its positions are
    contiguous and a multiple of 8; else after one copy into a padded buffer."""
    if bits.numel() >= ROWS_MASK_MIN and fast_layout(bits) == "rows":
        return pack_rows(bits)
    view = reference.mask_positions(bits)
    rows, channels, positions = view.shape
    padding = -positions % 8
    if padding or not view.is_contiguous():
        padded = view.new_empty((rows, channels, positions + padding))
        padded[..., positions:] = False
        padded[..., :positions] = view
        view = padded
    words = view.view(torch.uint8).view(torch.int64).mul_(_BITS_TO_BYTE)
    return words.view(torch.uint8)[..., 7::8].contiguous()


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def positive(u: Tensor, activation: str) -> Tensor:
    """``derivative_is_one(u)``; for relu and leaky_relu (u > 0) from u's bits read as a
    signed integer of its width: clamped at 0, then nonzero (integer > 0 <=> nonzero after
    the clamp), two vectorized passes; torch's compares that write bool are a scalar loop
    on a CPU, for a float and an integer compare alike (about 5x slower for float32, 9x for
    bfloat16). Same result except a NaN with the sign bit clear, which counts as positive,
    as in torch's threshold_backward (NaN <= 0 is false: the gradient passes)."""
    if activation == "relu6":
        return derivative_is_one(u, activation)
    return u.view(_SAME_WIDTH_INT[u.dtype]).clamp_min(0).bool()


def same_format(t: Tensor, x: Tensor) -> Tensor:
    """``like_input`` for a t of x's dtype from torch's kernels, which keep a fast layout's
    strides: a stride comparison, without like_input's allocation, on the fast path."""
    return t if t.stride() == x.stride() else like_input(t, x)


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
) -> tuple[Tensor, Tensor | None]:
    """``reference.normalize``: the cheap form by torch's kernels, the residual and the
    activation in place on the output, when the exactness rule holds. The mask is None
    without ``save_mask`` (as the Triton launchers say it; the op layer makes the empty
    tensor an op must return, ``ops.mask_output``): no allocation per call for it."""
    constants = native_constants(x, mean, var, eps)
    low_precision = x.dtype != param_dtype(x)
    if constants is None or (low_precision and activation not in ROUNDING_COMMUTES):
        return reference.normalize(x, mean, var, weight, bias, residual, eps, activation,
                                   negative_slope, save_mask)
    return epilogue_(affine_output(x, *constants, weight, bias, eps), x, residual, activation,
                     negative_slope, save_mask)


def kernel_statistics_ratio(x: Tensor) -> float:
    """The rule's bound on max |mean| / sqrt(biased var) that holds for every statistics
    ``kernel_batch_stats_`` accepts from x: it tests the unbiased variance, var * M / (M - 1),
    against STATS_RATIO, so the biased ratio may reach sqrt(M / (M - 1)) times that (sqrt(2)
    at M = 2); widened by more than rounding moves either. What the ops' route tests those
    statistics against where it must give the native route's bits (``kernel_training_output``,
    and the backward of such a call), so that none the native route took misses it."""
    return STATS_RATIO * math.sqrt(unbiasing_factor(reduced_count(x))) * (1 + 2.0**-16)


def kernel_training_output(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """x normalized by torch's CPU training kernel, when (mean, var) are bit for bit the
    statistics that kernel takes from x (what ``kernel_batch_stats_`` returned): then its
    output is that of these statistics, ``native_training_forward``'s bits (torch's
    training kernel rounds its constants differently from its eval kernel). None
    otherwise (other statistics, e.g. SyncBatchNorm's global ones). It recomputes the
    statistics: one pass more than ``normalize``, paid on the ops' route only (traced
    calls), which must give the eager route's bits."""
    if not within_ratio(mean, var, 0.0, kernel_statistics_ratio(x)):
        return None  # never statistics kernel_batch_stats_ accepted: no pass spent
    y, kernel_mean, kernel_invstd_ = torch.native_batch_norm(
        x, as_kernel_parameter(weight), as_kernel_parameter(bias), None, None, True, 0.0, eps)
    mean, var = as_dtype(mean, torch.float32), as_dtype(var, torch.float32)
    if not (torch.equal(kernel_mean, mean) and torch.equal(kernel_invstd_,
                                                            kernel_invstd(var, eps))):
        return None
    return same_format(y, x)


def normalize_batch(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, eps: float, activation: str, negative_slope: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor | None]:
    """``normalize`` where (mean, var) are x's batch statistics (``use_batch_stats``): for a
    call ``native_training_forward`` could serve, ``batch_output`` and the same epilogue,
    its bits; else ``normalize``."""
    y = batch_output(x, mean, var, weight, bias, eps, activation, negative_slope)
    if y is None:
        return normalize(x, mean, var, weight, bias, residual, eps, activation, negative_slope,
                         save_mask)
    return epilogue_(y, x, residual, activation, negative_slope, save_mask)


def batch_output(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, activation: str, negative_slope: float,
) -> Tensor | None:
    """``kernel_training_output`` for a call ``native_training_forward`` could serve (its
    normalized output, before the epilogue), else None: what ``normalize_batch``
    normalizes with, and what the backward recomputes u with for these calls."""
    if not serves_natively(x, None, None, weight, bias, activation, negative_slope):
        return None
    return kernel_training_output(x, mean, var, weight, bias, eps)


_BYTE_TO_WORD = 0x0101010101010101
"""Multiplying a byte (< 256, so without carries) by this copies it into all 8 bytes."""
_BIT_J_OF_BYTE_J = 0x8040201008040201 - (1 << 64)
"""Keeps bit j of byte j (as a signed int64): with little-endian bytes, the 8 positions
of a mask byte, each 0 or 2^j."""


def mask_indicator(mask: Tensor, x: Tensor) -> Tensor:
    """The packed activation mask unpacked to x's dtype and memory format: positive where the
    bit is set (derivative_is_one), 0 elsewhere. Each mask byte becomes an int64 holding its
    8 positions as bytes (two in-place integer ops), then one converting copy; for a large
    channels-innermost x, ``unpack_rows``."""
    if x.numel() >= ROWS_MASK_MIN and fast_layout(x) == "rows":
        return unpack_rows(mask, x)
    words = mask.to(torch.int64).mul_(_BYTE_TO_WORD).bitwise_and_(_BIT_J_OF_BYTE_J)
    indicator = torch.empty_like(x)
    positions = reference.mask_positions(indicator)  # a view of it (a fast layout's)
    # Converted straight from the padded bytes' strided view: a reshape of that view
    # would copy every byte once more where the positions are no multiple of 8 (7x7, 14x14).
    positions.copy_(words.view(torch.uint8)[..., :positions.shape[-1]])
    return indicator


ACTIVATION_BACKWARD = {
    "relu": lambda grad, u, slope: torch.ops.aten.threshold_backward.grad_input(
        grad, u, 0.0, grad_input=u),
    "relu6": lambda grad, u, slope: torch.ops.aten.hardtanh_backward.grad_input(
        grad, u, 0.0, 6.0, grad_input=u),
    "leaky_relu": lambda grad, u, slope: torch.ops.aten.leaky_relu_backward.grad_input(
        grad, u, slope, False, grad_input=u),
}
"""torch's own backward of the SIGN_ACTIVATIONS at u: grad where derivative_is_one(u), else
0 (negative_slope * grad for leaky_relu), in one pass, written over u (a temporary): one
full-size allocation fewer, which on a CPU means fewer fresh pages to fault in. Called
through ``activation_backward``."""

ACTIVATION_BACKWARD_OUT_OF_PLACE = {
    "relu": lambda grad, u, slope: torch.ops.aten.threshold_backward.default(grad, u, 0.0),
    "relu6": lambda grad, u, slope: torch.ops.aten.hardtanh_backward.default(
        grad, u, 0.0, 6.0),
    "leaky_relu": lambda grad, u, slope: torch.ops.aten.leaky_relu_backward.default(
        grad, u, slope, False),
}
"""ACTIVATION_BACKWARD's results in a new tensor (the same values)."""


def activation_backward(activation: str, grad: Tensor, u: Tensor, slope: float) -> Tensor:
    """ACTIVATION_BACKWARD[activation](grad, u, slope); out of place while a
    TorchDispatchMode is active, which sees those out= overloads: they name their output
    grad_input, and torch's own torch.autograd.graph.allow_mutation_on_saved_tensors mode
    looks an output up as "out" (a KeyError in the backward)."""
    table = (ACTIVATION_BACKWARD if torch._C._len_torch_dispatch_stack() == 0
             else ACTIVATION_BACKWARD_OUT_OF_PLACE)
    return table[activation](grad, u, slope)


def output_grad(
    grad_out: Tensor,
    x: Tensor,
    constants: tuple[Tensor, Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    activation_mask: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    use_batch_stats: bool,
) -> Tensor | None:
    """g = grad_out * act'(u) in x's dtype (grad_out itself without an activation), or None
    when it cannot be formed exactly there (silu/hardswish/leaky_relu on low-precision
    input: act'(u) * dy would round to x's dtype). u, where the mask does not stand in for
    it, is recomputed as the forward computed it (``batch_output`` with batch statistics:
    the same side of every kink)."""
    if activation == "none":
        return grad_out
    low_precision = x.dtype != param_dtype(x)
    if low_precision and activation not in ("relu", "relu6"):
        return None
    if activation_mask is not None:  # the indicator is > 0 exactly where u was
        indicator = mask_indicator(activation_mask, x)
        if activation == "leaky_relu":
            return activation_backward("leaky_relu", grad_out, indicator, negative_slope)
        return activation_backward("relu", grad_out, indicator, negative_slope)
    u = batch_output(x, *constants, weight, bias, eps, activation, negative_slope
                     ) if use_batch_stats else None
    if u is None:
        u = affine_output(x, *constants, weight, bias, eps)
    if residual is not None:
        u.add_(residual)
    if activation in ACTIVATION_BACKWARD:
        return activation_backward(activation, grad_out, u, negative_slope)
    return grad_out * reference.activation_derivative(u, activation, negative_slope)


def native_backward(
    g: Tensor, x: Tensor, constants: tuple[Tensor, Tensor], weight: Tensor | None,
    use_batch_stats: bool, eps: float, mask: list[bool], torch_bits: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's CPU BatchNorm backward of g: (d input, sum(g * x_hat), sum(g)) where ``mask``
    asks for them. With ``use_batch_stats`` d input includes the statistics' dependence on x,
    through 1 / sqrt(var + eps): ``kernel_invstd`` where ``torch_bits`` asks for the bits of
    torch's own backward (a call ``batch_output`` serves, whose eager forward may be
    ``native_training_forward``, differentiated by torch), else rsqrt in var's dtype, two ops
    instead of four (float64 for float64 input, where the two agree)."""
    mean, var = constants
    weight = cast(weight, param_dtype(x))
    # g in x's memory format for float16/bfloat16 x (given mixed formats, torch's kernel
    # takes a generic path that sums in their dtype); as it comes otherwise, as torch's own
    # layer hands it over (``converts_gradient_format``).
    if converts_gradient_format(x):
        g = g if g.stride() == x.stride() and g.dtype == x.dtype else like_input(g, x)
    else:
        g = as_dtype(g, x.dtype)
    if use_batch_stats:
        invstd = kernel_invstd(var, eps) if torch_bits else torch.rsqrt(var + eps)
        return torch.ops.aten.native_batch_norm_backward.default(
            g, x, weight, None, None, mean, invstd, True, eps, mask
        )
    return torch.ops.aten.native_batch_norm_backward.default(
        g, x, weight, mean, var, None, None, False, eps, mask
    )


def grad_in_x_format(inputs: BackwardInputs) -> BackwardInputs:
    """inputs with grad_out in the memory format of a ``fast_layout`` x (the output's): what
    the traced route's backward receives from AOTAutograd, so an eager backward given a
    gradient in another format sums in the same order and gives the same bits where its
    precision does not depend on the format (the exact path's float64 formulas) or where
    torch's mixed-format kernel would lose it (float16/bfloat16 sums). The fast path of a
    float32/float64 call hands torch's kernel the gradient as it came instead
    (``converts_gradient_format``), for torch's own layer's precision."""
    grad_out, x = inputs.grad_out, inputs.x
    if grad_out.stride() == x.stride() or fast_layout(x) is None:
        return inputs
    return inputs._replace(grad_out=in_memory_format(grad_out, memory_format_of(x)))


def grad_residual_from(g: Tensor, grad_out: Tensor, x: Tensor, residual: Tensor | None) -> Tensor:
    """d residual = g, in the residual's format (x's when the mask stood in for it), never
    aliasing grad_out."""
    grad_residual = like_input(g, x if residual is None else residual)
    return grad_out.clone() if grad_residual is grad_out else grad_residual


def normalize_backward(
    inputs: BackwardInputs, use_batch_stats: bool, output_mask: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``reference.normalize_backward`` by torch's CPU backward kernel on g = dy * act'(u)
    when the exactness rule holds: one pass for the sums, one for d input. A gradient
    ``output_mask`` does not ask for is None there (the reference's empty tensor where it
    serves)."""
    given = inputs.grad_out
    inputs = grad_in_x_format(inputs)
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
     negative_slope) = inputs
    if not converts_gradient_format(x):  # torch's kernels below take it as it came
        grad_out = given
    want_input, want_weight, want_bias, want_residual = output_mask
    # A call the native route serves: torch's backward (the native route's) wherever that
    # route took the statistics, which it accepts by kernel_statistics_ratio's bound.
    torch_bits = use_batch_stats and serves_natively(x, None, None, weight, bias, activation,
                                                     negative_slope)
    constants = native_constants(x, mean, var, eps, max(
        FAST_RATIO[x.dtype], kernel_statistics_ratio(x)) if torch_bits else None)
    g = None if constants is None else output_grad(
        grad_out, x, constants, weight, bias, residual, activation_mask, eps, activation,
        negative_slope, use_batch_stats,
    )
    if g is None:
        if activation == "relu" and activation_mask is None:
            return relu_backward_beyond_the_rule(inputs, use_batch_stats, output_mask)
        return reference.normalize_backward(inputs, use_batch_stats, output_mask)
    want_weight = want_weight and weight is not None
    want_bias = want_bias and bias is not None
    grads = native_backward(g, x, constants, weight, use_batch_stats, eps,
                            [want_input, want_weight, want_bias], torch_bits
                            ) if want_input or want_weight or want_bias else (None,) * 3
    # None for each gradient not asked for, as the Triton launchers return it (the op layer
    # makes the empty tensors an op must return, ``ops.grads_output``).
    return (
        same_format(grads[0], x) if want_input else None,
        as_dtype(grads[1], weight.dtype) if want_weight else None,
        as_dtype(grads[2], bias.dtype) if want_bias else None,
        grad_residual_from(g, grad_out, x, residual) if want_residual else None,
    )


def relu_backward_beyond_the_rule(
    inputs: BackwardInputs, use_batch_stats: bool, output_mask: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``normalize_backward`` of a relu call whose statistics fail the rule (the exact path)
    and that kept no mask, as the eager call's backward computes it from the output it keeps
    (``ops.keeps_output``): relu's gradient by torch's threshold_backward at u, the exact
    path's pre-activation in x's dtype (the output's signs and NaNs: the gradient passes at
    a NaN, torch's convention, where the reference's u > 0 stops it), then BatchNorm's
    backward of that gradient (the reference's, as for the eager call: the same statistics
    fail the rule without an activation too), which is also d residual. So the ops' route
    (a traced call, which keeps no output) gives the eager call's bits, NaN statistics
    included."""
    (grad_out, x, mean, var, weight, bias, residual, _, eps, _, negative_slope) = inputs
    u, _ = reference.normalize(x, mean, var, weight, bias, residual, eps, "none",
                               negative_slope, False)
    grad_u = relu_grad_from_output(grad_out, u)
    want_input, want_weight, want_bias, want_residual = output_mask
    grad_input, grad_weight, grad_bias, _ = reference.normalize_backward(
        BackwardInputs(grad_u, x, mean, var, weight, bias, None, None, eps, "none",
                       negative_slope),
        use_batch_stats, [want_input, want_weight, want_bias, False])
    return grad_input, grad_weight, grad_bias, (grad_u if want_residual else None)


def normalize_grad_sums(
    inputs: BackwardInputs, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.normalize_grad_sums``: [sum(g), sum(g * x_hat)] (compute dtype) by one
    pass of torch's backward kernel, and d weight, d bias from them."""
    inputs = grad_in_x_format(inputs)
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
     negative_slope) = inputs
    constants = native_constants(x, mean, var, eps)
    g = None if constants is None else output_grad(
        grad_out, x, constants, weight, bias, residual, activation_mask, eps, activation,
        negative_slope, True,
    )
    if g is None:
        return reference.normalize_grad_sums(inputs, output_mask)
    _, sum_g_xhat, sum_g = native_backward(g, x, constants, None, True, eps,
                                           [False, True, True], False)  # (global statistics)
    sums = torch.stack([sum_g, sum_g_xhat]).to(compute_dtype(x.dtype))
    grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
    if output_mask[0] and weight is not None:
        grad_weight = sums[1].to(weight.dtype, copy=True)
    if output_mask[1] and bias is not None:
        grad_bias = sums[0].to(bias.dtype, copy=True)
    return sums, grad_weight, grad_bias


def normalize_grad_input(
    inputs: BackwardInputs, grad_means: Tensor | None, use_batch_stats: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """``reference.normalize_grad_input``: d input = a * g + b * x + c per channel (the
    cheap form of ``reference.normalize_backward``'s d input), two passes."""
    inputs = grad_in_x_format(inputs)
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
     negative_slope) = inputs
    constants = native_constants(x, mean, var, eps)
    g = None if constants is None else output_grad(
        grad_out, x, constants, weight, bias, residual, activation_mask, eps, activation,
        negative_slope, use_batch_stats,
    )
    if g is None or x.dtype != param_dtype(x):
        return reference.normalize_grad_input(inputs, grad_means, use_batch_stats, output_mask)
    grad_input, grad_residual = x.new_empty(0), x.new_empty(0)
    if output_mask[0]:
        invstd = torch.rsqrt(var.to(STATS_DTYPE) + eps)
        scale = invstd if weight is None else invstd * weight.to(STATS_DTYPE)
        if use_batch_stats:
            mean_g, mean_g_xhat = grad_means.to(STATS_DTYPE)
            slope = -scale * invstd * mean_g_xhat
            offset = scale * (invstd * mean.to(STATS_DTYPE) * mean_g_xhat - mean_g)
            dtype = x.dtype
            grad_input = torch.addcmul(channel_view(offset.to(dtype), x), x,
                                       channel_view(slope.to(dtype), x))
            grad_input.addcmul_(g, channel_view(scale.to(dtype), x))
        else:
            grad_input = g * channel_view(scale.to(x.dtype), x)
        grad_input = like_input(grad_input, x)
    if output_mask[1]:
        grad_residual = grad_residual_from(g, grad_out, x, residual)
    return grad_input, grad_residual
