"""Host side of the Triton kernels: views, tiles, grids, workspaces, heuristics.

The five public functions have the signatures of their twins in ``fastbn.reference``.
Nothing here synchronises with the device: shapes, strides and flags decide every grid
and kernel variant, and the workspaces come from torch's caching allocator.

Views, not copies: a tensor (N, C, *spatial) is read as [N, C, S] through its strides when
its spatial dimensions flatten to one stride (NCHW, channels_last, 2-D, and most slices);
channels-innermost layouts fold the batch into S. Each tensor of a call keeps its own
strides, so x in channels_last and grad_out in NCHW still need no copy. The copies that
do happen: a tensor whose spatial dimensions cannot be flattened (for example a slice
with a step along H) is made contiguous, and so are per-channel vectors (C elements)
that are not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from fastbn.kernels import backward as backward_kernels
from fastbn.kernels import forward as forward_kernels
from fastbn.reference import (
    STATS_DTYPE,
    compute_dtype,
    mask_shape,
    reduced_count,
    unbiasing_factor,
)

ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "silu": 4, "hardswish": 5}

# ---------------------------------------------------------------------------------------------
# Heuristics. The kernels are memory-bound; what matters is that every SM has work and
# that each thread moves several 16-byte vectors per loop iteration.
# - Tiles hold about TILE_ELEMENTS values, and each thread holds ELEMENTS_PER_THREAD of
#   them: enough loads in flight, and registers low enough for several programs per SM
#   and no spills (tests/test_kernel_compile.py checks with ptxas). float64 values take
#   two registers, so float64 tiles and per-thread counts are halved.
#   The reductions keep two accumulators of tile size, so their tiles are smaller.
# - The contiguous axis gets the long side of the tile: up to 1024 positions of S (NCHW),
#   or up to 128 channels (channels_last), so loads vectorise.
# - The reductions split each channel block's tiles into chunks so that about
#   WAVES * SMs programs run (small C still fills an H100's 132 SMs), but never fewer than
#   MIN_TILES_PER_CHUNK tiles per program, which keeps the partial-sum workspace and the
#   finalize pass small. One chunk means one launch: the program finishes the statistics.
# ---------------------------------------------------------------------------------------------
REDUCTION_TILE_ELEMENTS = 2048
ELEMENTWISE_TILE_ELEMENTS = 4096
ELEMENTS_PER_THREAD = 16
MAX_BLOCK_S = 1024
MAX_BLOCK_C = 128
WAVES = 4
MIN_TILES_PER_CHUNK = 4
FINALIZE_BLOCK_C = 128
FINALIZE_NUM_WARPS = 4
# Triton's CPU interpreter has no SMs; a small count makes small test shapes take the
# chunked path too.
INTERPRETER_SM_COUNT = 2


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b. (triton.cdiv does the same through a JIT-callable
    wrapper that costs microseconds per call on the launch path.)"""
    return -(-a // b)


def kernel_compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """COMPUTE_DTYPE of the kernels for an input dtype (see reference.compute_dtype)."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1)."""
    return isinstance(forward_kernels.normalize_kernel, InterpretedFunction)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (INTERPRETER_SM_COUNT off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------
_ANY = -1  # spatial stride of a tensor whose spatial size is 1: any stride will do

# A tensor's shape and strides: everything the view planning depends on. Planning runs on
# every call, so its results are cached per geometry.
Geometry = tuple[tuple[int, ...], tuple[int, ...]]


def geometry(t: Tensor) -> Geometry:
    return tuple(t.shape), t.stride()


@functools.lru_cache(maxsize=4096)
def _spatial_stride(g: Geometry) -> int | None:
    """The one stride of the flattened spatial dimensions; None when they do not flatten."""
    shape, strides = g
    dims = [(size, stride) for size, stride in zip(shape[2:], strides[2:], strict=True)
            if size != 1]
    if not dims:
        return _ANY
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:], strict=False):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1]


@functools.lru_cache(maxsize=4096)
def _view_strides(g: Geometry, folded: bool) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) in the [N, C, S] view, or with folded in [1, C, N * S];
    None when the tensor does not fit that view."""
    stride_s = _spatial_stride(g)
    if stride_s is None:
        return None
    shape, strides = g
    n = shape[0]
    positions = math.prod(shape[2:])
    if not folded:
        return strides[0], strides[1], 1 if stride_s == _ANY else stride_s
    if stride_s == _ANY:
        stride_s = strides[0] if n > 1 else 1
    elif n > 1 and strides[0] != positions * stride_s:
        return None
    return 0, strides[1], stride_s


@dataclass(frozen=True)
class View:
    """How the kernels read every tensor of a call shaped like x: [batch, C, positions].

    With ``folded`` the batch is folded into the positions ([1, C, N * S]), which needs
    stride_n == S * stride_s in every tensor (channels-innermost layouts, 2-D input).
    """

    batch: int
    channels: int
    positions: int
    folded: bool

    def strides(self, t: Tensor) -> tuple[int, int, int]:
        """(stride_n, stride_c, stride_s) of t under this view."""
        strides = _view_strides(geometry(t), self.folded)
        if strides is None:
            raise AssertionError("tensor does not fit the view; plan_view should have copied it")
        return strides


def fits_view(t: Tensor) -> bool:
    """Whether the kernels can read t through its strides (no copy needed)."""
    return _spatial_stride(geometry(t)) is not None


def plan_view(tensors: list[Tensor], activation_mask: bool = False) -> View:
    """The view shared by same-shaped tensors that all fit_view: folded when all allow it.

    With an activation mask the view must match the mask's packing (reference.mask_shape):
    unfolded [N, C, S], except 2-D input, which is always folded into [1, C, N].
    """
    return _plan_view(tuple(geometry(t) for t in tensors), activation_mask)


@functools.lru_cache(maxsize=4096)
def _plan_view(geometries: tuple[Geometry, ...], activation_mask: bool) -> View:
    shape = geometries[0][0]
    n, channels, positions = shape[0], shape[1], math.prod(shape[2:])
    if activation_mask:
        folded = len(shape) == 2
    else:
        folded = n == 1 or all(_view_strides(g, True) is not None for g in geometries)
    if folded:
        return View(1, channels, n * positions, True)
    return View(n, channels, positions, False)


def mask_strides(view: View) -> tuple[int, int]:
    """(stride_n, stride_c) of the contiguous [rows, C, cdiv(S, 8)] uint8 activation mask."""
    bytes_per_row = cdiv(view.positions, 8)
    return view.channels * bytes_per_row, bytes_per_row


def readable(t: Tensor | None) -> Tensor | None:
    """t itself when the kernels can read it through its strides, else a contiguous copy."""
    if t is None or fits_view(t):
        return t
    return t.contiguous()


def writable(out: Tensor) -> Tensor:
    """out when the kernels can write it through its strides, else a contiguous stand-in
    whose values the caller copies into out afterwards."""
    return out if fits_view(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)


def per_channel(t: Tensor | None) -> Tensor | None:
    """A per-channel vector as the kernels read it: contiguous."""
    return None if t is None else t.contiguous()


def needs_int64(tensors: list[Tensor]) -> bool:
    """Whether some element offset of these tensors reaches 2**31 (then offsets are int64)."""
    return any(_needs_int64(geometry(t)) for t in tensors)


@functools.lru_cache(maxsize=4096)
def _needs_int64(g: Geometry) -> bool:
    shape, strides = g
    numel = math.prod(shape)
    span = sum((size - 1) * abs(stride) for size, stride in zip(shape, strides, strict=True))
    return numel > 0 and max(span, numel) >= 2**31


# ---------------------------------------------------------------------------------------------
# Tiles and chunks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiling:
    """Tile shape, warps and grid of one kernel launch over a View."""

    block_s: int
    block_c: int
    num_warps: int
    tiles_per_n: int
    num_tiles: int  # tiles of one channel block: batch * tiles_per_n
    channel_blocks: int


def _power_of_two_at_most(value: int, limit: int) -> int:
    """The smallest power of two >= value (at least 1), capped at limit."""
    return min(1 << (max(value, 1) - 1).bit_length(), limit)


@functools.lru_cache(maxsize=4096)
def tiling(view: View, stride_s: int, elements: int, per_thread: int,
           min_block_s: int = 1) -> Tiling:
    """Tiles of at most ``elements`` values, the long side on x's contiguous axis, with
    warps for ``per_thread`` values per thread; at least ``min_block_s`` positions long."""
    if stride_s == 1 and view.positions > 1:
        block_s = _power_of_two_at_most(view.positions, min(MAX_BLOCK_S, elements))
        block_c = _power_of_two_at_most(view.channels, max(elements // block_s, 1))
    else:
        block_c = _power_of_two_at_most(view.channels, min(MAX_BLOCK_C, elements))
        block_s = _power_of_two_at_most(view.positions, max(elements // block_c, 1))
    block_s = max(block_s, min_block_s)
    tiles_per_n = cdiv(view.positions, block_s)
    return Tiling(
        block_s=block_s,
        block_c=block_c,
        num_warps=_power_of_two_at_most(block_s * block_c // (32 * per_thread), 8),
        tiles_per_n=tiles_per_n,
        num_tiles=view.batch * tiles_per_n,
        channel_blocks=cdiv(view.channels, block_c),
    )


def reduction_tiling(view: View, stride_s: int, dtype: torch.dtype) -> Tiling:
    return tiling(view, stride_s, *_register_budget(REDUCTION_TILE_ELEMENTS, dtype))


def elementwise_tiling(view: View, stride_s: int, dtype: torch.dtype,
                       min_block_s: int = 1) -> Tiling:
    return tiling(view, stride_s, *_register_budget(ELEMENTWISE_TILE_ELEMENTS, dtype),
                  min_block_s)


def _register_budget(elements: int, dtype: torch.dtype) -> tuple[int, int]:
    """(tile elements, elements per thread), halved for float64."""
    if dtype == torch.float64:
        return elements // 2, ELEMENTS_PER_THREAD // 2
    return elements, ELEMENTS_PER_THREAD


def tiles_per_chunk(tiles: Tiling, sms: int) -> int:
    """Tiles each reduction program sums; one chunk when this equals tiles.num_tiles."""
    wanted_chunks = cdiv(WAVES * sms, tiles.channel_blocks)
    most_chunks = cdiv(tiles.num_tiles, MIN_TILES_PER_CHUNK)
    chunks = max(1, min(wanted_chunks, most_chunks))
    return cdiv(tiles.num_tiles, chunks)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def batch_stats_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance (STATS_DTYPE); running statistics updated in place."""
    channels = x.shape[1]
    count = reduced_count(x)
    mean = torch.empty(channels, dtype=STATS_DTYPE, device=x.device)
    var = torch.empty(channels, dtype=STATS_DTYPE, device=x.device)
    # num_batches_tracked goes up by one: in the first kernel when no kernel reads it (a
    # float momentum), else here first, since the cumulative factor 1 / num_batches_tracked
    # reads the incremented value.
    increment_in_kernel = num_batches_tracked is not None and momentum is not None and count > 0
    if num_batches_tracked is not None and not increment_in_kernel:
        num_batches_tracked.add_(1)
    if count == 0:
        return mean.zero_(), var.zero_()
    x = readable(x)
    view = plan_view([x])
    stride_n, stride_c, stride_s = view.strides(x)
    tiles = reduction_tiling(view, stride_s, x.dtype)
    per_chunk = tiles_per_chunk(tiles, sm_count(x.device))
    chunks = cdiv(tiles.num_tiles, per_chunk)
    update = running_mean is not None and running_var is not None
    running = [writable_vector(running_mean), writable_vector(running_var)] if update else [x, x]
    cumulative = update and momentum is None
    common = dict(
        COMPUTE_DTYPE=kernel_compute_dtype(x.dtype), UPDATE_RUNNING=update,
        CUMULATIVE=cumulative, USE_INT64=needs_int64([x]),
    )
    nbt = num_batches_tracked if cumulative or increment_in_kernel else x
    factor = 0.0 if momentum is None else float(momentum)
    unbias = unbiasing_factor(count)
    if chunks == 1:
        forward_kernels.partial_stats_kernel[(1, tiles.channel_blocks)](
            x, mean, mean, mean, var, running[0], running[1], nbt,
            channels, view.positions, stride_n, stride_c, stride_s,
            tiles.tiles_per_n, tiles.num_tiles, per_chunk, factor, unbias,
            BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, FINALIZE=True,
            INCREMENT_STEP=increment_in_kernel, num_warps=tiles.num_warps, **common,
        )
    else:
        summary = torch.empty((2, chunks, channels), dtype=compute_dtype(x.dtype),
                              device=x.device)
        counts = torch.empty(chunks, dtype=torch.int64, device=x.device)
        forward_kernels.partial_stats_kernel[(chunks, tiles.channel_blocks)](
            x, summary, counts, mean, var, running[0], running[1], nbt,
            channels, view.positions, stride_n, stride_c, stride_s,
            tiles.tiles_per_n, tiles.num_tiles, per_chunk, factor, unbias,
            BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, FINALIZE=False,
            INCREMENT_STEP=increment_in_kernel, num_warps=tiles.num_warps, **common,
        )
        finalize_block_c = _power_of_two_at_most(channels, FINALIZE_BLOCK_C)
        forward_kernels.finalize_stats_kernel[(cdiv(channels, finalize_block_c),)](
            x, summary, counts, mean, var, running[0], running[1], nbt,
            channels, stride_c, chunks, factor, unbias,
            BLOCK_C=finalize_block_c, num_warps=FINALIZE_NUM_WARPS, **common,
        )
    if update:
        copy_back(running[0], running_mean)
        copy_back(running[1], running_var)
    return mean, var


def writable_vector(t: Tensor) -> Tensor:
    """A per-channel buffer the kernels update in place: t if contiguous, else a copy that
    ``copy_back`` writes into t afterwards."""
    return t if t.is_contiguous() else t.contiguous()


def copy_back(written: Tensor, target: Tensor) -> None:
    """Copy a stand-in's values into the tensor it stood in for (nothing when they are one)."""
    if written is not target:
        target.copy_(written)


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
    """y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), x's dtype and format,
    and the packed activation mask when ``save_mask`` (else an empty uint8 tensor)."""
    out = torch.empty_like(x)
    activation_mask = x.new_empty(mask_shape(x) if save_mask else (0,), dtype=torch.uint8)
    if x.numel() == 0:
        return out, activation_mask.zero_()
    x, residual = readable(x), readable(residual)
    y = writable(out)
    tensors = [x, y] + ([residual] if residual is not None else [])
    view = plan_view(tensors, activation_mask=save_mask)
    x_strides = view.strides(x)
    # The mask packs 8 positions per byte, so tiles hold whole bytes of it.
    tiles = elementwise_tiling(view, x_strides[2], x.dtype, min_block_s=8 if save_mask else 1)
    forward_kernels.normalize_kernel[(tiles.num_tiles, tiles.channel_blocks)](
        x, y, x if residual is None else residual,
        per_channel(mean), per_channel(var), _or(per_channel(weight), x), _or(per_channel(bias), x),
        activation_mask if save_mask else x,
        view.channels, view.positions,
        *x_strides, *view.strides(y), *(x_strides if residual is None else view.strides(residual)),
        *mask_strides(view),
        tiles.tiles_per_n, eps, negative_slope,
        BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, COMPUTE_DTYPE=kernel_compute_dtype(x.dtype),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=ACTIVATION_CODES[activation],
        WRITE_MASK=save_mask, USE_INT64=needs_int64(tensors), num_warps=tiles.num_warps,
    )
    copy_back(y, out)
    return out, activation_mask


def _or(t: Tensor | None, placeholder: Tensor) -> Tensor:
    """t, or a placeholder pointer for a kernel argument that a constexpr flag disables."""
    return placeholder if t is None else t


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
def normalize_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    activation_mask: Tensor | None,
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (d input, d weight, d bias, d residual) of ``normalize``: the sums of
    ``normalize_grad_sums`` (which write d weight and d bias), then the elementwise
    gradients of ``normalize_grad_input``; see the kernels' module docstring for the formulas.
    Unrequested gradients come back empty; d residual comes in the residual's format, or
    x's when the activation mask stood in for it."""
    want_input, want_weight, want_bias, want_residual = output_mask
    # grad_out copied once, if the kernels cannot read it, for both pieces; x and the
    # residual stay as given, since the gradients take their memory formats.
    grad_out = readable(grad_out)
    sums, grad_weight, grad_bias = None, x.new_empty(0), x.new_empty(0)
    if want_weight or want_bias or (want_input and batch_stats):
        sums, grad_weight, grad_bias = normalize_grad_sums(
            grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
            negative_slope, [want_weight, want_bias],
        )
    grad_input, grad_residual = normalize_grad_input(
        grad_out, x, mean, var, weight, bias, residual, activation_mask, sums, reduced_count(x),
        eps, batch_stats, activation, negative_slope, [want_input, want_residual],
    )
    return grad_input, grad_weight, grad_bias, grad_residual


@dataclass(frozen=True)
class BackwardCall:
    """What both backward launchers pass their kernels: the tensors as the kernels read
    them, the view they share, and the constexpr flags."""

    grad_out: Tensor
    x: Tensor
    residual: Tensor  # x when the kernels do not read a residual
    mean: Tensor
    var: Tensor
    weight: Tensor  # x when there is none
    bias: Tensor  # x when there is none
    activation_mask: Tensor  # x when there is none
    view: View
    strides: tuple[int, ...]  # grad_out's, x's and the residual's (stride_n, stride_c, stride_s)
    flags: dict


def _backward_call(
    grad_out: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, residual: Tensor | None, activation_mask: Tensor | None,
    activation: str, outputs: list[Tensor],
) -> BackwardCall:
    """The kernels' view of a backward call whose gradients are written to ``outputs``."""
    # The residual matters to the gradients only through the activation's derivative, and
    # not at all when the mask records that derivative.
    use_mask = activation_mask is not None
    residual_read = readable(residual) if activation != "none" and not use_mask else None
    x, grad_out = readable(x), readable(grad_out)
    tensors = [x, grad_out, *([] if residual_read is None else [residual_read]), *outputs]
    view = plan_view(tensors, activation_mask=use_mask)
    x_strides = view.strides(x)
    r_strides = x_strides if residual_read is None else view.strides(residual_read)
    return BackwardCall(
        grad_out=grad_out, x=x, residual=_or(residual_read, x),
        mean=per_channel(mean), var=per_channel(var),
        weight=_or(per_channel(weight), x), bias=_or(per_channel(bias), x),
        activation_mask=activation_mask if use_mask else x,
        view=view, strides=(*view.strides(grad_out), *x_strides, *r_strides),
        flags=dict(
            COMPUTE_DTYPE=kernel_compute_dtype(x.dtype),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual_read is not None, ACTIVATION=ACTIVATION_CODES[activation],
            USE_MASK=use_mask, USE_INT64=needs_int64(tensors),
        ),
    )


def normalize_grad_sums(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    activation_mask: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """[sum(g), sum(g * x_hat)] per channel ([2, C], compute dtype), and d weight / d bias,
    written by the same launch that writes the sums, where ``output_mask`` (weight, bias)
    asks for them (else empty)."""
    acc = compute_dtype(x.dtype)
    channels = x.shape[1]
    want_weight = output_mask[0] and weight is not None
    want_bias = output_mask[1] and bias is not None
    # Custom-op outputs must not alias each other: a fresh empty tensor for each.
    grad_weight = torch.zeros_like(weight) if want_weight else x.new_empty(0)
    grad_bias = torch.zeros_like(bias) if want_bias else x.new_empty(0)
    sums = torch.empty((2, channels), dtype=acc, device=x.device)
    if x.numel() == 0:
        return sums.zero_(), grad_weight, grad_bias
    call = _backward_call(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                          activation, [])
    tiles = reduction_tiling(call.view, call.strides[5], x.dtype)
    per_chunk = tiles_per_chunk(tiles, sm_count(x.device))
    chunks = cdiv(tiles.num_tiles, per_chunk)
    partial = sums if chunks == 1 else torch.empty((2, chunks, channels), dtype=acc,
                                                   device=x.device)
    parameter_grads = dict(WRITE_GRAD_WEIGHT=want_weight, WRITE_GRAD_BIAS=want_bias)
    backward_kernels.partial_grad_sums_kernel[(chunks, tiles.channel_blocks)](
        call.grad_out, call.x, call.residual, call.mean, call.var, call.weight, call.bias,
        call.activation_mask, partial, sums, _or_empty(grad_weight, x), _or_empty(grad_bias, x),
        channels, call.view.positions, *call.strides, *mask_strides(call.view),
        tiles.tiles_per_n, tiles.num_tiles, per_chunk, eps, negative_slope,
        BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, FINALIZE=chunks == 1,
        num_warps=tiles.num_warps, **call.flags, **parameter_grads,
    )
    if chunks > 1:
        finalize_block_c = _power_of_two_at_most(channels, FINALIZE_BLOCK_C)
        backward_kernels.finalize_grad_sums_kernel[(cdiv(channels, finalize_block_c),)](
            partial, sums, _or_empty(grad_weight, x), _or_empty(grad_bias, x),
            channels, chunks, BLOCK_C=finalize_block_c, COMPUTE_DTYPE=call.flags["COMPUTE_DTYPE"],
            USE_INT64=call.flags["USE_INT64"], num_warps=FINALIZE_NUM_WARPS, **parameter_grads,
        )
    return sums, grad_weight, grad_bias


def normalize_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    activation_mask: Tensor | None,
    sums: Tensor | None,
    count: float,
    eps: float,
    batch_stats: bool,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """d input and d residual in one launch, from ``normalize_grad_sums``'s sums over
    ``count`` values per channel (read for d input with ``batch_stats``). ``output_mask`` is
    (input, residual); what it does not ask for comes back empty."""
    want_input, want_residual = output_mask
    grad_input = torch.empty_like(x) if want_input else x.new_empty(0)
    grad_residual = (torch.empty_like(x if residual is None else residual) if want_residual
                     else x.new_empty(0))
    if x.numel() == 0 or not (want_input or want_residual):
        return grad_input, grad_residual
    gi = writable(grad_input) if want_input else None
    gr = writable(grad_residual) if want_residual else None
    call = _backward_call(grad_out, x, mean, var, weight, bias, residual, activation_mask,
                          activation, [t for t in (gi, gr) if t is not None])
    x_strides = call.strides[3:6]
    read_sums = want_input and batch_stats
    tiles = elementwise_tiling(call.view, x_strides[2], x.dtype)
    backward_kernels.grad_input_kernel[(tiles.num_tiles, tiles.channel_blocks)](
        call.grad_out, call.x, call.residual, _or(gi, x), _or(gr, x),
        call.mean, call.var, call.weight, call.bias, call.activation_mask,
        per_channel(sums) if read_sums else x,
        x.shape[1], call.view.positions, *call.strides,
        *(x_strides if gi is None else call.view.strides(gi)),
        *(x_strides if gr is None else call.view.strides(gr)),
        *mask_strides(call.view),
        tiles.tiles_per_n, eps, negative_slope, 1.0 / count,
        BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, BATCH_STATS=batch_stats,
        WRITE_GRAD_INPUT=want_input, WRITE_GRAD_RESIDUAL=want_residual,
        num_warps=tiles.num_warps, **call.flags,
    )
    if gi is not None:
        copy_back(gi, grad_input)
    if gr is not None:
        copy_back(gr, grad_residual)
    return grad_input, grad_residual


def _or_empty(t: Tensor, placeholder: Tensor) -> Tensor:
    """t, or a placeholder pointer when t is the empty 'not asked for' gradient."""
    return t if t.numel() else placeholder
