"""Host side of the Triton kernels: views, tiles, grids, workspaces, heuristics.

The five public functions have the signatures of their twins in ``fastbn.reference``;
a sixth, ``batch_norm_train_``, is the training forward in one call (the torch backend
runs its batch_stats_ then its normalize instead: ``fastbn.ops.trained``).
Nothing here synchronises with the device: shapes, strides and flags decide every grid
and kernel variant, and the workspaces come from torch's caching allocator.

Views, not copies: a tensor (N, C, *spatial) is read as [N, C, S] through its strides when
its spatial dimensions flatten to one stride (NCHW, channels_last, 2-D, and most slices);
channels-innermost layouts fold the batch into S. Each tensor of a call keeps its own
strides, so x in channels_last and grad_out in NCHW still need no copy. The copies that
do happen: a tensor whose spatial dimensions cannot be flattened (for example a slice
with a step along H) is made contiguous, and so are per-channel vectors (C elements)
that are not.

Launch plans: everything a call's launches depend on besides the tensors' addresses and
the float arguments (views, strides, tiles, grids, constexprs, workspace sizes) is a
``KernelLaunch`` computed once per call signature (shapes, strides, dtypes, flags) and
cached; a launcher allocates its outputs and workspace, then launches. The ``plan_*``
functions take shapes and strides, not tensors, so launches can be planned for any shape
without memory or a GPU (``python -m fastbn.bench --plan``, the grid-limit tests).

Launches per call: training statistics 1, normalize 1, backward 2 (sums, then d input),
or 1 where a channel block's slice fits one program; the training forward
(``batch_norm_train_``) 1 where the slice fits, else those 2; no fills. Each launch runs on its
tensors' device (``device_guard``) and that device's current stream, which is where Triton
launches.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from fastbn import direct_launch
from fastbn.conventions import (
    ACTIVATION_CODES,
    STATS_DTYPE,
    BackwardInputs,
    compute_dtype,
    mask_shape,
    reduced_count,
    unbiasing_factor,
)
from fastbn.kernels import backward as backward_kernels
from fastbn.kernels import forward as forward_kernels

# ---------------------------------------------------------------------------------------------
# Heuristics. The kernels are memory-bound; what matters is that every SM has work and
# that each thread moves several 16-byte vectors per loop iteration.
# - Tiles hold about TILE_ELEMENTS values, and each thread holds ELEMENTS_PER_THREAD of
#   them: enough loads in flight, and registers low enough for several programs per SM
#   and no spills (tests/test_kernel_compile.py checks with ptxas). float64 values take
#   two registers, so float64 tiles and per-thread counts are halved.
#   The reductions keep two accumulators of tile size, so their tiles are smaller.
# - The contiguous axis gets the long side of the tile: up to 1024 positions of S (NCHW),
#   or up to 128 channels (channels_last), so loads vectorise. Reductions take at most
#   32 channels per program: more channel blocks, so fewer chunks per block to merge
#   (a 64-byte run of bf16 channels still loads as 16-byte vectors).
# - Elementwise calls whose tensors are all contiguous NCHW with S not a multiple of 16
#   (14x14, 7x7: rows carry no 16-byte alignment, so tiles would load scalars) walk the
#   flat range instead (FLAT): FLAT_ELEMENTS per program, FLAT_ELEMENTS_PER_THREAD per
#   thread (each element also holds its channel's constants). The mask-writing
#   normalize cannot (a byte of bits holds 8 positions of one row): it reads rows through
#   windows (VECTOR, below) at 4096-value tiles, 70-89 registers at 8 warps (sm_90,
#   triton 3.6 and 3.9). Where neither applies (mixed layouts), tiles of rows that load
#   element by element (scalar_rows) are half as large, in half the warps: every element
#   has its own addresses, and triton 3.6 gave the 7x7 mask-writing normalize 146
#   registers at 16 elements per thread, too many for two 8-warp programs per SM.
# - Tile kernels over rows of S contiguous elements in every tensor, S even but not a
#   multiple of 16 (14x14: 196), get S as the constexpr ROW (known_row): the compiler then
#   knows the rows' alignment (4 elements at 196: 8-byte bfloat16, 16-byte float32
#   vectors), which Triton's hints (multiples of 16 only) do not give. Odd rows (7x7)
#   align to nothing.
# - Where every tensor of a call is contiguous and S is not a multiple of a 16-byte
#   vector, the mask-writing normalize, the backward sums and the one-launch kernels read
#   each row through a window from the aligned offset below its start (VECTOR, see
#   row_vector and tiling.row_windows): 16-byte loads, and 16-byte stores of the vectors
#   inside a row (its ragged ends element by element), at 7x7 and 14x14 too; the
#   statistics load runs of rows instead (RUN). Windows need a tile as long as a row plus
#   a vector (64 positions at 7x7, 256 at 14x14), and cost no registers over tiles of
#   rows: a row's elements share one aligned address.
# - The reductions split each channel block's tiles into chunks so that about
#   REDUCTION_PROGRAMS programs run: the chunking depends on the shape only, not on the
#   GPU, so results are bitwise the same on every GPU model. 512 programs are about four
#   per SM on an H100/H200 (132 SMs), so even C = 16 fills the machine. A chunk has at
#   least MIN_TILES_PER_CHUNK tiles, which keeps the workspace and the merge small. One
#   chunk means no workspace: the program finishes the statistics. The merge takes
#   MERGE_ELEMENTS summaries (at most MAX_MERGE_CHUNKS chunks) per tree step: more spilled
#   registers with triton 3.6's ptxas in the partial_stats_kernel's merge.
# - The backward is one launch (slice_backward_kernel) where a channel block's whole
#   [N, S] slice, each axis padded to a power of two, fits SLICE_ELEMENTS values (one
#   program holds g and x_hat of each in registers: ELEMENTS_PER_THREAD per thread, at
#   most MAX_SLICE_WARPS warps, so two programs still share an SM; the compile test checks
#   registers and spills). That is for two tensors read per element; the budget is
#   SLICE_ELEMENTS * 2 / streams, where a third tensor (the residual, or activation bits)
#   and a channels-innermost view (channels_last, 2-D input) each count as a stream: ptxas
#   gives the 16 values of a thread 78-100 registers then (64 otherwise), too many for
#   two 16-warp programs per SM. A block takes one
#   channel, or on a channels-innermost view a VECTOR_BYTES run of channels, and more
#   channels while its tile has fewer than SLICE_MIN_ELEMENTS values.
# - CUDA grids: one axis of at most MAX_PROGRAMS programs.
# ---------------------------------------------------------------------------------------------
REDUCTION_TILE_ELEMENTS = 2048
ELEMENTWISE_TILE_ELEMENTS = 4096
ELEMENTS_PER_THREAD = 16
FLAT_ELEMENTS = 2048
FLAT_ELEMENTS_PER_THREAD = 8
FLAT_MAX_POSITIONS = 2**20  # flat_tile's float32 row arithmetic is exact below 2**24
MAX_BLOCK_S = 1024
MAX_BLOCK_C = 128
MAX_REDUCTION_BLOCK_C = 32
REDUCTION_PROGRAMS = 512
MIN_TILES_PER_CHUNK = 4
MERGE_ELEMENTS = 1024
MAX_MERGE_CHUNKS = 32
SLICE_ELEMENTS = 8192
SLICE_MIN_ELEMENTS = 2048
MAX_SLICE_WARPS = 16
VECTOR_BYTES = 16
MAX_PROGRAMS = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b. (triton.cdiv does the same through a JIT-callable
    wrapper that costs microseconds per call on the launch path.)"""
    return -(-a // b)


def kernel_compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """COMPUTE_DTYPE of the kernels for an input dtype (see conventions.compute_dtype)."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1)."""
    return isinstance(forward_kernels.normalize_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------
_ANY = -1  # spatial stride of a tensor whose spatial size is 1: any stride will do

# A tensor's shape and strides: everything the view planning depends on. Planning runs on
# every call, so its results are cached per geometry.
Geometry = tuple[tuple[int, ...], tuple[int, ...]]


def geometry(t: Tensor) -> Geometry:
    return t.shape, t.stride()  # (a torch.Size is a tuple: tuple() of it would cost more)


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


def plan_view(tensors: list[Tensor], act_bits: bool = False) -> View:
    """The view shared by same-shaped tensors that all fit_view: folded when all allow it.

    With activation bits (the activation mask) the view must match their packing
    (conventions.mask_shape): unfolded [N, C, S], except 2-D input, which is always folded
    into [1, C, N].
    """
    return _plan_view(tuple(geometry(t) for t in tensors), act_bits)


@functools.lru_cache(maxsize=4096)
def _plan_view(geometries: tuple[Geometry, ...], act_bits: bool) -> View:
    shape = geometries[0][0]
    n, channels, positions = shape[0], shape[1], math.prod(shape[2:])
    if act_bits:
        folded = len(shape) == 2
    else:
        folded = n == 1 or all(_view_strides(g, True) is not None for g in geometries)
    if folded:
        return View(1, channels, n * positions, True)
    return View(n, channels, positions, False)


def act_bits_strides(view: View) -> tuple[int, int]:
    """(stride_n, stride_c) of the contiguous [rows, C, cdiv(S, 8)] uint8 activation bits."""
    bytes_per_row = cdiv(view.positions, 8)
    return view.channels * bytes_per_row, bytes_per_row


def readable(t: Tensor | None) -> Tensor | None:
    """t itself when the kernels can read it through its strides, else a contiguous copy."""
    return _readable(t)[0]


def _readable(t: Tensor | None) -> tuple[Tensor | None, Geometry | None]:
    """readable(t) and its geometry (None for None), each computed once."""
    if t is None:
        return None, None
    copy, g = kernel_geometry(geometry(t))
    return (t.contiguous() if copy else t), g


@functools.lru_cache(maxsize=4096)
def kernel_geometry(g: Geometry) -> tuple[bool, Geometry]:
    """(whether the kernels need a contiguous copy or stand-in of a tensor of geometry g,
    the geometry they see): g itself when they can use its strides."""
    if _spatial_stride(g) is not None:
        return False, g
    return True, (g[0], torch.empty(g[0], device="meta").stride())


@functools.lru_cache(maxsize=4096)
def output_geometry(g: Geometry) -> tuple[bool, Geometry]:
    """kernel_geometry of ``torch.empty_like`` of a tensor of geometry g (its strides are
    those of g where g is dense, else of the format g suggests)."""
    like = torch.empty_like(torch.empty_strided(g[0], g[1], device="meta"))
    return kernel_geometry(geometry(like))


def writable(out: Tensor) -> Tensor:
    """out when the kernels can write it through its strides, else a contiguous stand-in
    whose values the caller copies into out afterwards."""
    standin, _ = kernel_geometry(geometry(out))
    return stand_in(out) if standin else out


def stand_in(out: Tensor) -> Tensor:
    """The contiguous tensor the kernels write in out's place (see writable)."""
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


def per_channel(t: Tensor | None) -> Tensor | None:
    """A per-channel vector as the kernels read it: contiguous."""
    return None if t is None else t.contiguous()


def needs_int64(geometries) -> bool:
    """Whether some element offset of tensors of these geometries reaches 2**31 (then
    offsets are int64). The plans call it, so a test that patches it clears them."""
    return any(_needs_int64(g) for g in geometries if g is not None)


@functools.lru_cache(maxsize=4096)
def _needs_int64(g: Geometry) -> bool:
    shape, strides = g
    numel = math.prod(shape)
    span = sum((size - 1) * abs(stride) for size, stride in zip(shape, strides, strict=True))
    # A flat slice's offsets run up to FLAT_ELEMENTS past the last element (masked).
    return numel > 0 and max(span, numel) + FLAT_ELEMENTS >= 2**31


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


def _power_of_two_covering(value: int, limit: int) -> int:
    """The smallest power of two >= value (at least 1), capped at limit: a block covering
    value elements where the limit allows."""
    return min(1 << (max(value, 1) - 1).bit_length(), limit)


@functools.lru_cache(maxsize=4096)
def tiling(view: View, stride_s: int, elements: int, per_thread: int,
           min_block_s: int = 1, max_block_c: int = MAX_BLOCK_C) -> Tiling:
    """Tiles of at most ``elements`` values, the long side on x's contiguous axis, with
    warps for ``per_thread`` values per thread; at least ``min_block_s`` positions long,
    at most ``max_block_c`` channels wide."""
    if stride_s == 1 and view.positions > 1:
        block_s = _power_of_two_covering(view.positions, min(MAX_BLOCK_S, elements))
        block_c = _power_of_two_covering(view.channels, max(elements // block_s, 1))
    else:
        block_c = _power_of_two_covering(view.channels, min(max_block_c, elements))
        block_s = _power_of_two_covering(view.positions, max(elements // block_c, 1))
    block_s = max(block_s, min_block_s)
    tiles_per_n = cdiv(view.positions, block_s)
    return Tiling(
        block_s=block_s,
        block_c=block_c,
        num_warps=_power_of_two_covering(block_s * block_c // (32 * per_thread), 8),
        tiles_per_n=tiles_per_n,
        num_tiles=view.batch * tiles_per_n,
        channel_blocks=cdiv(view.channels, block_c),
    )


def reduction_tiling(view: View, stride_s: int, dtype: torch.dtype) -> Tiling:
    return tiling(view, stride_s, *_register_budget(REDUCTION_TILE_ELEMENTS, dtype),
                  max_block_c=MAX_REDUCTION_BLOCK_C)


def elementwise_tiling(view: View, stride_s: int, dtype: torch.dtype,
                       min_block_s: int = 1, scalar_rows: bool = False) -> Tiling:
    elements, per_thread = _register_budget(ELEMENTWISE_TILE_ELEMENTS, dtype)
    return tiling(view, stride_s, elements // 2 if scalar_rows else elements, per_thread,
                  min_block_s)


def scalar_rows(view: View, strides: tuple[int, ...], row: int, vector: bool = False) -> bool:
    """Whether a tile kernel's rows load element by element: rows along S whose length
    and strides carry no alignment (not a multiple of 16, no ROW, no windows)."""
    return (not view.folded and strides[2] == 1 and row == 0 and not vector
            and any(stride % 16 for stride in strides[1::3]))


def _register_budget(elements: int, dtype: torch.dtype) -> tuple[int, int]:
    """(tile elements, elements per thread), halved for float64."""
    if dtype == torch.float64:
        return elements // 2, ELEMENTS_PER_THREAD // 2
    return elements, ELEMENTS_PER_THREAD


def tiles_per_chunk(tiles: Tiling) -> int:
    """Tiles each reduction program sums; one chunk when this equals tiles.num_tiles.
    Depends on the shapes only (see the heuristics above)."""
    wanted_chunks = cdiv(REDUCTION_PROGRAMS, tiles.channel_blocks)
    most_chunks = cdiv(tiles.num_tiles, MIN_TILES_PER_CHUNK)
    chunks = max(1, min(wanted_chunks, most_chunks))
    return cdiv(tiles.num_tiles, chunks)


def merge_chunks(tiles: Tiling, chunks: int) -> int:
    """MERGE_CHUNKS: chunk summaries per tree step of the merge (1 without a merge). It
    follows the tile alone, not the chunk count, so shapes share compiled kernels; a
    masked-off part of a step costs only its predicated loads, once per channel block."""
    if chunks == 1:
        return 1
    return max(min(MERGE_ELEMENTS // tiles.block_c, MAX_MERGE_CHUNKS), 2)


def known_row(view: View, strides: tuple[int, ...]) -> int:
    """ROW of a tile kernel over ``view`` whose tensors have these (stride_n, stride_c,
    stride_s): S where every tensor's rows are S contiguous elements and S is even but
    not a multiple of 16 (Triton hints multiples of 16 itself; odd rows align no wider
    than one element), at most MAX_BLOCK_S (each such S compiles its own kernels); else 0.
    """
    positions = view.positions
    if view.folded or positions % 16 == 0 or positions % 2 or positions > MAX_BLOCK_S:
        return 0
    triples = zip(strides[0::3], strides[1::3], strides[2::3], strict=True)
    return positions if all(c == positions and s == 1 for _, c, s in triples) else 0


def rows_as_run(view: View, strides: tuple[int, int, int], tiles: Tiling) -> int:
    """RUN of the statistics launch: a power of two covering the BLOCK_C rows of a tile
    where x's rows follow each other (stride_c == S, stride_s == 1), one tile holds a
    whole row, and S is not a multiple of 16 (else the rows load as vectors anyway);
    else 0 (see tiling.load_rows_as_run)."""
    _, stride_c, stride_s = strides
    positions = view.positions
    if (view.folded or positions % 16 == 0 or stride_s != 1 or stride_c != positions
            or tiles.tiles_per_n != 1):
        return 0
    return _power_of_two_covering(tiles.block_c * positions, MAX_PROGRAMS)


def row_vector(view: View, geometries: tuple[Geometry, ...], dtype: torch.dtype,
               block_s: int) -> int:
    """VECTOR of a tile kernel whose tiles are BLOCK_S positions long: the elements of a
    16-byte vector where every tensor of the call is contiguous, rows are unfolded and
    S is not a multiple of it (7x7, 14x14 in bfloat16: the rows carry no 16-byte
    alignment), and a window of BLOCK_S elements from the aligned offset below a row's
    start covers the row (S + VECTOR - 1 <= BLOCK_S: one tile per row); else 0 (see
    tiling.row_windows)."""
    vector = VECTOR_BYTES // _element_size(dtype)
    positions = view.positions
    if (view.folded or positions % vector == 0 or positions + vector - 1 > block_s
            or not all(_contiguous(g) for g in geometries if g is not None)):
        return 0
    return vector


def check_grid(programs: int) -> tuple[int]:
    """The 1-D grid of ``programs`` programs, which CUDA must allow."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{programs} programs exceed CUDA's grid limit of {MAX_PROGRAMS}")
    return (programs,)


# ---------------------------------------------------------------------------------------------
# Launches: plans, devices, tickets
# ---------------------------------------------------------------------------------------------
KERNEL_MODULES = {"forward": forward_kernels, "backward": backward_kernels}


@dataclass(frozen=True)
class KernelLaunch:
    """One planned launch: the kernel, its grid, the integer arguments that follow its
    tensors, and its constexprs; the call adds the tensors and the float arguments."""

    module: str  # key of KERNEL_MODULES
    kernel: str  # the @triton.jit function's name in that module
    grid: tuple[int]
    ints: tuple[int, ...]
    constexprs: dict = field(hash=False)  # including num_warps
    bytes_read: int = 0  # bytes the launch moves, for --plan (O(C) vectors included)
    bytes_written: int = 0
    # The compiled kernels of this plan's specialisations, for fastbn.direct_launch.
    direct: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

    def __call__(self, tensors: tuple, floats: tuple) -> None:
        """Launch on the current device's current stream: ``kernel[grid](tensors, ints,
        floats, **constexprs)``, or its direct equivalent (fastbn.direct_launch)."""
        if _recorded is not None:
            _recorded.append((self, tensors, floats))
            return
        direct_launch.launch(self, getattr(KERNEL_MODULES[self.module], self.kernel),
                             tensors, floats)

    def arguments(self, tensors: tuple, floats: tuple) -> tuple[tuple, dict]:
        """(args, kwargs) of the kernel call for these tensors and floats."""
        return (*tensors, *self.ints, *floats), self.constexprs

    @property
    def tile(self) -> tuple[int, int]:
        """(BLOCK_C, BLOCK_S) of the launch (FLAT: 1 and the slice length; the one-launch
        backward: BLOCK_C and BLOCK_N * BLOCK_S, a channel block's whole slice)."""
        return (self.constexprs["BLOCK_C"],
                self.constexprs.get("BLOCK_N", 1) * self.constexprs["BLOCK_S"])


_recorded: list | None = None


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Inside, launches are recorded instead of run, as (KernelLaunch, tensors, floats):
    everything else of a call (planning, allocation, device choice) runs as usual. For
    --plan, the host-cost suite, and the compile test (on meta tensors: no memory)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for the launches inside (Triton launches on the current
    device's current stream); nothing to do when it already is, or off CUDA."""
    if device.type != "cuda" or device.index is None or device.index == _current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


_NO_GUARD = contextlib.nullcontext()  # stateless, so one serves every call


def _current_device() -> int:
    return torch.cuda.current_device()


# Ticket counters (int32 zeros) per (device, stream): a chunked reduction's programs
# count themselves here, and the last one resets its counter to 0, so one zeroed buffer
# serves every later call on that stream (calls on one stream never overlap).
_COUNTERS: dict[tuple, Tensor] = {}


def counters(device: torch.device, count: int) -> Tensor:
    """``count`` ticket counters at 0 for a launch on the current stream of ``device``."""
    if device.type != "cuda":
        key: tuple = (device.type,)
    else:
        if torch.cuda.is_current_stream_capturing():
            # A graph replays the memset it captured; a cached buffer would be filled by
            # nothing outside the graph.
            return torch.zeros(count, dtype=torch.int32, device=device)
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(_power_of_two_covering(count, 2**62), dtype=torch.int32,
                             device=device)
        _COUNTERS[key] = buffer
    return buffer


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _contiguous(g: Geometry) -> bool:
    """Whether the geometry is that of a contiguous tensor."""
    shape, strides = g
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _flat(geometries: tuple[Geometry, ...], view: View) -> bool:
    """Whether an elementwise call walks the flat range (see the heuristics above)."""
    s = view.positions
    return (not view.folded and s > 1 and s % 16 != 0 and s <= FLAT_MAX_POSITIONS
            and view.channels * s >= FLAT_ELEMENTS + s
            and all(_contiguous(g) for g in geometries))


def clear_plans() -> None:
    """Forget every cached plan (after a heuristic changed)."""
    for plan in (plan_batch_stats, plan_normalize, plan_train_forward, plan_backward, tiling,
                 slice_tiling, normalize_setup, train_forward_setup, backward_setup):
        plan.cache_clear()


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsPlan:
    launch: KernelLaunch
    workspace: int  # elements of the [2, chunks, C] COMPUTE_DTYPE workspace (0: none)
    counters: int  # ticket counters the launch needs (0: none)


@functools.lru_cache(maxsize=4096)
def plan_batch_stats(x: Geometry, dtype: torch.dtype, update_running: bool,
                     cumulative: bool, increment_step: bool) -> StatsPlan:
    """The statistics launch for an x of this geometry (see partial_stats_kernel)."""
    use_int64 = needs_int64((x,))
    view = _plan_view((x,), False)
    stride_n, stride_c, stride_s = _view_strides(x, view.folded)
    tiles = reduction_tiling(view, stride_s, dtype)
    per_chunk = tiles_per_chunk(tiles)
    chunks = cdiv(tiles.num_tiles, per_chunk)
    channels = view.channels
    acc_size = _element_size(compute_dtype(dtype))
    workspace = 2 * chunks * channels if chunks > 1 else 0
    launch = KernelLaunch(
        "forward", "partial_stats_kernel", check_grid(chunks * tiles.channel_blocks),
        (channels, view.positions, stride_n, stride_c, stride_s, tiles.tiles_per_n,
         tiles.num_tiles, per_chunk, chunks),
        dict(BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c,
             COMPUTE_DTYPE=kernel_compute_dtype(dtype), CHUNKED=chunks > 1,
             MERGE_CHUNKS=merge_chunks(tiles, chunks), UPDATE_RUNNING=update_running,
             CUMULATIVE=cumulative, INCREMENT_STEP=increment_step,
             ROW=known_row(view, (stride_n, stride_c, stride_s)),
             RUN=rows_as_run(view, (stride_n, stride_c, stride_s), tiles), USE_INT64=use_int64,
             num_warps=tiles.num_warps),
        bytes_read=math.prod(x[0]) * _element_size(dtype) + 2 * workspace * acc_size
        + (16 * channels if update_running else 0),
        bytes_written=workspace * acc_size + 16 * channels
        + (16 * channels if update_running else 0),
    )
    needs_counters = chunks > 1 or (cumulative and increment_step)
    return StatsPlan(launch, workspace, tiles.channel_blocks + 1 if needs_counters else 0)


def batch_stats_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance (STATS_DTYPE); running statistics updated in place,
    num_batches_tracked incremented, all by one launch."""
    channels = x.shape[1]
    count = reduced_count(x)
    mean = torch.empty(channels, dtype=STATS_DTYPE, device=x.device)
    var = torch.empty(channels, dtype=STATS_DTYPE, device=x.device)
    if count == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return mean.zero_(), var.zero_()
    x, gx = _readable(x)
    update = running_mean is not None and running_var is not None
    plan = plan_batch_stats(gx, x.dtype, update, update and momentum is None,
                            num_batches_tracked is not None)
    running = (writable_vector(running_mean), writable_vector(running_var)) if update else (
        None, None)
    workspace = (torch.empty(plan.workspace, dtype=compute_dtype(x.dtype), device=x.device)
                 if plan.workspace else None)
    with device_guard(x.device):
        tickets = counters(x.device, plan.counters) if plan.counters else None
        plan.launch(
            (x, workspace, tickets, mean, var, *running, num_batches_tracked),
            (0.0 if momentum is None else float(momentum), unbiasing_factor(count)),
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


def _elementwise_launch(kernel: str, module: str, geometries: tuple[Geometry, ...],
                        view: View, strides: tuple[int, ...], dtype: torch.dtype,
                        min_block_s: int, flat_ok: bool, act_bits_bytes: int, bytes_read: int,
                        bytes_written: int, constexprs: dict,
                        windows: bool = False) -> KernelLaunch:
    """An elementwise launch over ``view``: flat slices (where ``flat_ok`` and the
    heuristics say so) or 2-D tiles at least ``min_block_s`` long, whose rows the kernel
    reads through windows where ``windows`` (it takes VECTOR) and row_vector allows;
    ``strides`` are the views' (stride_n, stride_c, stride_s) in kernel order."""
    channels, positions = view.channels, view.positions
    numel = view.batch * channels * positions
    bits_strides = (channels * act_bits_bytes, act_bits_bytes)
    if flat_ok and _flat(geometries, view):
        per_thread = FLAT_ELEMENTS_PER_THREAD // (2 if dtype == torch.float64 else 1)
        grid = check_grid(cdiv(numel, FLAT_ELEMENTS))
        ints = (channels, positions, numel, *strides, *bits_strides, 1, grid[0])
        constexprs = dict(constexprs, BLOCK_S=FLAT_ELEMENTS, BLOCK_C=1, FLAT=True, ROW=0,
                          num_warps=_power_of_two_covering(FLAT_ELEMENTS // (32 * per_thread),
                                                          8), **({"VECTOR": 0} if windows else {}))
    else:
        row = known_row(view, strides)
        tiles = elementwise_tiling(view, strides[2], dtype, min_block_s)
        vector = row_vector(view, geometries, dtype, tiles.block_s) if windows else 0
        if scalar_rows(view, strides, row, bool(vector)):
            tiles = elementwise_tiling(view, strides[2], dtype, min_block_s, True)
        grid = check_grid(tiles.num_tiles * tiles.channel_blocks)
        ints = (channels, positions, numel, *strides, *bits_strides, tiles.tiles_per_n,
                tiles.num_tiles)
        constexprs = dict(constexprs, BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c,
                          FLAT=False, ROW=row, num_warps=tiles.num_warps,
                          **({"VECTOR": vector} if windows else {}))
    return KernelLaunch(module, kernel, grid, ints, constexprs, bytes_read, bytes_written)


@functools.lru_cache(maxsize=4096)
def plan_normalize(x: Geometry, y: Geometry, residual: Geometry | None, dtype: torch.dtype,
                   residual_dtype: torch.dtype | None, has_weight: bool, has_bias: bool,
                   activation: str, save_mask: bool) -> KernelLaunch:
    """The normalize launch for tensors of these geometries (see normalize_kernel)."""
    geometries = (x, y) if residual is None else (x, y, residual)
    use_int64 = needs_int64(geometries)
    view = _plan_view(geometries, save_mask)
    strides = tuple(s for g in (x, y, residual or x) for s in _view_strides(g, view.folded))
    numel = math.prod(x[0])
    size = _element_size(dtype)
    bits_bytes = cdiv(view.positions, 8)
    read = numel * size + (numel * _element_size(residual_dtype) if residual else 0)
    written = numel * size + (view.batch * view.channels * bits_bytes if save_mask else 0)
    return _elementwise_launch(
        "normalize_kernel", "forward", geometries, view, strides, dtype,
        # A byte of activation bits holds 8 positions of one row: a flat slice could split one.
        8 if save_mask else 1, not save_mask, bits_bytes, read + 32 * view.channels, written,
        dict(COMPUTE_DTYPE=kernel_compute_dtype(dtype), HAS_WEIGHT=has_weight,
             HAS_BIAS=has_bias, HAS_RESIDUAL=residual is not None,
             ACTIVATION=ACTIVATION_CODES[activation], WRITE_ACT_BITS=save_mask,
             USE_INT64=use_int64),
        windows=True,
    )


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
    and the packed activation mask when ``save_mask`` (else None: the op layer makes the
    empty tensor an op must return, ``ops.normalize``)."""
    out = torch.empty_like(x)
    activation_mask = x.new_empty(mask_shape(x), dtype=torch.uint8) if save_mask else None
    if x.numel() == 0:
        return out, None if activation_mask is None else activation_mask.zero_()
    copy_x, copy_residual, standin, launch = normalize_setup(
        geometry(x), None if residual is None else geometry(residual), x.dtype,
        None if residual is None else residual.dtype, weight is not None, bias is not None,
        activation, save_mask,
    )
    x = x.contiguous() if copy_x else x
    residual = residual.contiguous() if copy_residual else residual
    y = stand_in(out) if standin else out
    with device_guard(x.device):
        launch(
            (x, y, residual, per_channel(mean), per_channel(var), per_channel(weight),
             per_channel(bias), activation_mask),
            (eps, negative_slope),
        )
    copy_back(y, out)
    return out, activation_mask


@functools.lru_cache(maxsize=4096)
def normalize_setup(x: Geometry, residual: Geometry | None, dtype: torch.dtype,
                    residual_dtype: torch.dtype | None, has_weight: bool, has_bias: bool,
                    activation: str, save_mask: bool) -> tuple[bool, bool, bool, KernelLaunch]:
    """normalize's work per call signature, done once: whether x and the residual are read
    through contiguous copies and y written through a stand-in (see readable, writable),
    and the launch for the geometries the kernel then sees."""
    (copy_x, gx), (copy_residual, gr), (standin, gy) = forward_geometries(x, residual)
    return copy_x, copy_residual, standin, plan_normalize(
        gx, gy, gr, dtype, residual_dtype, has_weight, has_bias, activation, save_mask)


def forward_geometries(x: Geometry, residual: Geometry | None
                       ) -> tuple[tuple[bool, Geometry], ...]:
    """kernel_geometry of x and of the residual ((False, None) without one), and
    output_geometry of y = empty_like(x): what a forward's kernels read and write."""
    return (kernel_geometry(x),
            (False, None) if residual is None else kernel_geometry(residual),
            output_geometry(x))


@functools.lru_cache(maxsize=4096)
def train_forward_setup(x: Geometry, residual: Geometry | None, dtype: torch.dtype,
                        has_weight: bool, has_bias: bool, activation: str, save_mask: bool,
                        update_running: bool, cumulative: bool, increment_step: bool
                        ) -> tuple[bool, bool, bool, StatsPlan | None]:
    """batch_norm_train_'s work per call signature, as normalize_setup's, with
    plan_train_forward's plan (None also for an x without elements)."""
    (copy_x, gx), (copy_residual, gr), (standin, gy) = forward_geometries(x, residual)
    plan = None if math.prod(x[0]) == 0 else plan_train_forward(
        gx, gy, gr, dtype, has_weight, has_bias, activation, save_mask, update_running,
        cumulative, increment_step)
    return copy_x, copy_residual, standin, plan


@functools.lru_cache(maxsize=4096)
def plan_train_forward(x: Geometry, y: Geometry, residual: Geometry | None, dtype: torch.dtype,
                       has_weight: bool, has_bias: bool, activation: str, save_mask: bool,
                       update_running: bool, cumulative: bool,
                       increment_step: bool) -> StatsPlan | None:
    """The one-launch training forward (slice_forward_kernel) for tensors of these
    geometries, or None where a channel block's slice does not fit one program (the rule
    of slice_tiling, the backward's), or where activation bits are written and a sample's
    row is shorter than a byte's 8 positions: then the statistics launch and normalize's."""
    geometries = (x, y) if residual is None else (x, y, residual)
    view = _plan_view(geometries, save_mask)
    strides = tuple(s for g in (x, y, residual or x) for s in _view_strides(g, view.folded))
    tiles = slice_tiling(view, strides[2], dtype, 2 + (residual is not None) + save_mask)
    if tiles is None or (save_mask and tiles.block_s < 8):
        return None
    numel = math.prod(x[0])
    size = _element_size(dtype)
    bits_stride_n, bits_stride_c = act_bits_strides(view)
    running_bytes = 16 * view.channels if update_running else 0
    launch = KernelLaunch(
        "forward", "slice_forward_kernel", check_grid(tiles.channel_blocks),
        (view.channels, view.positions, view.batch, numel, *strides, bits_stride_n,
         bits_stride_c),
        dict(BLOCK_N=tiles.block_n, BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c,
             COMPUTE_DTYPE=kernel_compute_dtype(dtype), UPDATE_RUNNING=update_running,
             CUMULATIVE=cumulative, INCREMENT_STEP=increment_step, HAS_WEIGHT=has_weight,
             HAS_BIAS=has_bias, HAS_RESIDUAL=residual is not None,
             ACTIVATION=ACTIVATION_CODES[activation], WRITE_ACT_BITS=save_mask,
             ROW=known_row(view, strides),
             VECTOR=row_vector(view, geometries, dtype, tiles.block_s),
             USE_INT64=needs_int64(geometries), num_warps=tiles.num_warps),
        bytes_read=numel * size * (2 if residual is not None else 1) + 16 * view.channels
        + running_bytes,
        bytes_written=numel * size + 16 * view.channels + running_bytes
        + (view.batch * view.channels * bits_stride_c if save_mask else 0),
    )
    return StatsPlan(launch, 0, tiles.channel_blocks + 1 if cumulative and increment_step
                     else 0)


def batch_norm_train_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The training forward, (y, mean, var, activation mask) of ``batch_stats_`` then
    ``normalize`` with the running statistics and num_batches_tracked updated as
    ``batch_stats_`` updates them: in one launch where a channel block's slice fits one
    program (plan_train_forward; its statistics by an exact two-pass, so not bitwise
    those of the statistics launch), else in those two. The mask is None without
    ``save_mask``, as normalize's."""
    update = running_mean is not None and running_var is not None
    copy_x, copy_residual, standin, plan = train_forward_setup(
        geometry(x), None if residual is None else geometry(residual), x.dtype,
        weight is not None, bias is not None, activation, save_mask, update,
        update and momentum is None, num_batches_tracked is not None)
    x_read = x.contiguous() if copy_x else x
    residual_read = residual.contiguous() if copy_residual else residual
    out = torch.empty_like(x)
    y = stand_in(out) if standin else out
    if plan is None:
        mean, var = batch_stats_(x, running_mean, running_var, num_batches_tracked, momentum)
        out, activation_mask = normalize(x, mean, var, weight, bias, residual, eps, activation,
                                         negative_slope, save_mask)
        return out, mean, var, activation_mask
    channels = x.shape[1]
    count = reduced_count(x)
    device = x.device  # (a new torch.device per read)
    mean = torch.empty(channels, dtype=STATS_DTYPE, device=device)
    var = torch.empty(channels, dtype=STATS_DTYPE, device=device)
    activation_mask = x.new_empty(mask_shape(x), dtype=torch.uint8) if save_mask else None
    running = (writable_vector(running_mean), writable_vector(running_var)) if update else (
        None, None)
    with device_guard(device):
        tickets = counters(device, plan.counters) if plan.counters else None
        plan.launch(
            (x_read, y, residual_read, mean, var, *running, num_batches_tracked, tickets,
             per_channel(weight), per_channel(bias), activation_mask),
            (0.0 if momentum is None else float(momentum), unbiasing_factor(count),
             float(count), eps, negative_slope),
        )
    if update:
        copy_back(running[0], running_mean)
        copy_back(running[1], running_var)
    copy_back(y, out)
    return out, mean, var, activation_mask


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackwardPlan:
    """The launches of one backward call and its workspace: the sums launch and the d input
    launch, or the one launch that does both (``one_launch``)."""

    sums: KernelLaunch | None
    grad_input: KernelLaunch | None
    workspace: int  # elements of the [2, chunks, C] partial-sum workspace (0: none)
    counters: int
    one_launch: KernelLaunch | None = None  # slice_backward_kernel (then no other launch)


def _backward_geometries(grad_out: Geometry, x: Geometry, residual: Geometry | None,
                         outputs: tuple[Geometry, ...], use_act_bits: bool
                         ) -> tuple[View, tuple[int, ...]]:
    """The view the backward's tensors share, and grad_out's, x's and the residual's
    (stride_n, stride_c, stride_s)."""
    geometries = (x, grad_out, *(() if residual is None else (residual,)), *outputs)
    view = _plan_view(geometries, use_act_bits)
    strides = tuple(s for g in (grad_out, x, residual or x)
                    for s in _view_strides(g, view.folded))
    return view, strides


@dataclass(frozen=True)
class SliceTiling:
    """The one-program tile [BLOCK_C, BLOCK_N * BLOCK_S] of slice_backward_kernel."""

    block_n: int
    block_s: int
    block_c: int
    num_warps: int
    channel_blocks: int


@functools.lru_cache(maxsize=4096)
def slice_tiling(view: View, stride_s: int, dtype: torch.dtype,
                 streams: int) -> SliceTiling | None:
    """The tile holding a channel block's whole [batch, positions] slice in one program
    that reads ``streams`` tensors (see the heuristics above), or None when it would not
    fit."""
    channels_innermost = stride_s != 1
    elements, per_thread = _register_budget(
        SLICE_ELEMENTS * 2 // (streams + channels_innermost), dtype)
    block_n = _power_of_two_covering(view.batch, MAX_PROGRAMS)
    block_s = _power_of_two_covering(view.positions, MAX_PROGRAMS)
    slice_elements = block_n * block_s
    # Channels-innermost: a run of channels as wide as a 16-byte vector, where C allows.
    block_c = 1 if not channels_innermost else _power_of_two_covering(
        view.channels, max(VECTOR_BYTES // _element_size(dtype), 1))
    if block_c * slice_elements > elements:
        return None
    block_c = max(block_c, _power_of_two_covering(
        view.channels, max(SLICE_MIN_ELEMENTS // slice_elements, 1)))
    return SliceTiling(block_n, block_s, block_c, _power_of_two_covering(
        block_c * slice_elements // (32 * per_thread), MAX_SLICE_WARPS),
        cdiv(view.channels, block_c))


@functools.lru_cache(maxsize=4096)
def plan_backward(
    grad_out: Geometry, x: Geometry, residual: Geometry | None, grad_input: Geometry | None,
    grad_residual: Geometry | None, dtype: torch.dtype, has_weight: bool, has_bias: bool,
    activation: str, use_act_bits: bool, use_batch_stats: bool, want_sums: bool,
    write_grad_weight: bool, write_grad_bias: bool,
) -> BackwardPlan:
    """The backward's launches for tensors of these geometries: the sums (when
    ``want_sums``) and d input / d residual (when either geometry is given), in one launch
    when both are wanted and a channel block's slice fits one program (slice_tiling)."""
    outputs = tuple(g for g in (grad_input, grad_residual) if g is not None)
    use_int64 = needs_int64((grad_out, x, residual, *outputs))
    numel = math.prod(x[0])
    size = _element_size(dtype)
    acc_size = _element_size(compute_dtype(dtype))
    flags = dict(
        COMPUTE_DTYPE=kernel_compute_dtype(dtype), HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
        HAS_RESIDUAL=residual is not None, ACTIVATION=ACTIVATION_CODES[activation],
        USE_ACT_BITS=use_act_bits, USE_INT64=use_int64,
    )
    reads = 2 * numel * size + (numel * size if residual is not None else 0)
    reads += numel // 8 if use_act_bits else 0
    outputs_flags = dict(BATCH_STATS=grad_input is not None and use_batch_stats,
                         WRITE_GRAD_INPUT=grad_input is not None,
                         WRITE_GRAD_RESIDUAL=grad_residual is not None)
    sums = grad = None
    workspace = counters_ = 0
    if want_sums and outputs:
        view, strides = _backward_geometries(grad_out, x, residual, outputs, use_act_bits)
        tiles = slice_tiling(view, strides[5], dtype,
                             2 + (residual is not None) + use_act_bits)
        if tiles is not None:
            bits_stride_n, bits_stride_c = act_bits_strides(view)
            out_strides = tuple(s for g in (grad_input or x, grad_residual or x)
                                for s in _view_strides(g, view.folded))
            one_launch = KernelLaunch(
                "backward", "slice_backward_kernel", check_grid(tiles.channel_blocks),
                (view.channels, view.positions, view.batch, numel, *strides, *out_strides,
                 bits_stride_n, bits_stride_c),
                dict(flags, **outputs_flags, BLOCK_N=tiles.block_n, BLOCK_S=tiles.block_s,
                     BLOCK_C=tiles.block_c, WRITE_GRAD_WEIGHT=write_grad_weight,
                     WRITE_GRAD_BIAS=write_grad_bias, ROW=known_row(view, (*strides, *out_strides)),
                     VECTOR=row_vector(view, (grad_out, x, residual, *outputs), dtype,
                                       tiles.block_s),
                     num_warps=tiles.num_warps),
                bytes_read=reads + 32 * view.channels,
                bytes_written=len(outputs) * numel * size + 8 * view.channels,
            )
            return BackwardPlan(None, None, 0, 0, one_launch)  # (its sums stay in registers)
    if want_sums:
        view, strides = _backward_geometries(grad_out, x, residual, (), use_act_bits)
        bits_stride_n, bits_stride_c = act_bits_strides(view)
        tiles = reduction_tiling(view, strides[5], dtype)
        per_chunk = tiles_per_chunk(tiles)
        chunks = cdiv(tiles.num_tiles, per_chunk)
        workspace = 2 * chunks * view.channels if chunks > 1 else 0
        counters_ = tiles.channel_blocks if chunks > 1 else 0
        sums = KernelLaunch(
            "backward", "partial_grad_sums_kernel", check_grid(chunks * tiles.channel_blocks),
            (view.channels, view.positions, numel, *strides, bits_stride_n, bits_stride_c,
             tiles.tiles_per_n, tiles.num_tiles, per_chunk, chunks),
            dict(flags, BLOCK_S=tiles.block_s, BLOCK_C=tiles.block_c, CHUNKED=chunks > 1,
                 MERGE_CHUNKS=merge_chunks(tiles, chunks), WRITE_GRAD_WEIGHT=write_grad_weight,
                 WRITE_GRAD_BIAS=write_grad_bias, ROW=known_row(view, strides),
                 VECTOR=row_vector(view, (grad_out, x, residual), dtype, tiles.block_s),
                 num_warps=tiles.num_warps),
            bytes_read=reads + workspace * acc_size + 32 * view.channels,
            bytes_written=workspace * acc_size + 16 * view.channels,
        )
    if outputs:
        view, strides = _backward_geometries(grad_out, x, residual, outputs, use_act_bits)
        out_strides = tuple(s for g in (grad_input or x, grad_residual or x)
                            for s in _view_strides(g, view.folded))
        geometries = (grad_out, x, *(() if residual is None else (residual,)), *outputs)
        grad = _elementwise_launch(
            "grad_input_kernel", "backward", geometries, view, (*strides, *out_strides), dtype,
            8 if use_act_bits else 1, True, act_bits_strides(view)[1], reads + 48 * view.channels,
            len(outputs) * numel * size, dict(flags, **outputs_flags),
        )
    return BackwardPlan(sums, grad, workspace, counters_)


@functools.lru_cache(maxsize=4096)
def backward_setup(
    grad_out: Geometry, x: Geometry, residual: Geometry | None, read_residual: bool,
    want_input: bool, want_residual: bool, dtype: torch.dtype, has_weight: bool, has_bias: bool,
    activation: str, use_act_bits: bool, use_batch_stats: bool, want_sums: bool,
    write_grad_weight: bool, write_grad_bias: bool,
) -> tuple[tuple[bool, ...], BackwardPlan]:
    """The backward's work per call signature, done once: whether grad_out, x and the
    residual (read where ``read_residual``) are read through contiguous copies, whether d
    input and d residual (``torch.empty_like`` of x, and of the residual or x) are written
    through stand-ins (see readable, writable), and plan_backward's plan for the geometries
    the kernels then see."""
    copy_grad_out, g = kernel_geometry(grad_out)
    copy_x, gx = kernel_geometry(x)
    copy_residual, gr = kernel_geometry(residual) if read_residual else (False, None)
    standin_input, gi = output_geometry(x) if want_input else (False, None)
    standin_residual, gres = (output_geometry(x if residual is None else residual)
                              if want_residual else (False, None))
    plan = plan_backward(g, gx, gr, gi, gres, dtype, has_weight, has_bias, activation,
                         use_act_bits, use_batch_stats, want_sums, write_grad_weight,
                         write_grad_bias)
    return (copy_grad_out, copy_x, copy_residual, standin_input, standin_residual), plan


def normalize_backward(
    inputs: BackwardInputs, use_batch_stats: bool, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (d input, d weight, d bias, d residual) of ``normalize``: the sums (which
    write d weight and d bias), then the elementwise gradients, two launches sharing one
    plan and one workspace (or in one launch); the formulas are
    ``reference.normalize_backward``'s. Unrequested gradients come back None (the op layer
    makes the empty tensors an op must return, ``ops._normalize_backward``); d residual
    comes in the residual's format, or x's when the activation mask stood in for it."""
    want_input, want_weight, want_bias, want_residual = output_mask
    want_weight = want_weight and inputs.weight is not None
    want_bias = want_bias and inputs.bias is not None
    want_sums = want_weight or want_bias or (want_input and use_batch_stats)
    grads = _backward(inputs, None, 1.0 / max(reduced_count(inputs.x), 1), use_batch_stats,
                      want_input, want_residual, want_sums, want_weight, want_bias)
    return grads[:4]


def _backward(inputs, sums, inv_count, use_batch_stats, want_input, want_residual, want_sums,
              want_weight, want_bias, standalone_sums=False):
    """Every backward entry point: the sums (want_sums; else ``sums`` given or unneeded)
    and d input / d residual, which reads the means ``sums * inv_count``. Returns
    (d input, d weight, d bias, d residual, sums), None for what was not asked for; the
    sums are [2, C] with ``standalone_sums``, else the flat allocation they head (the
    workspace follows them), which the kernels read alike, and None after the one-launch
    backward, which keeps them in registers."""
    (grad_out, x, mean, var, weight, bias, residual, activation_mask, eps, activation,
     negative_slope) = inputs
    # Custom-op outputs must not alias each other: a fresh tensor for each; ``empty``
    # where the kernels write every element.
    grad_weight = torch.empty_like(weight) if want_weight else None
    grad_bias = torch.empty_like(bias) if want_bias else None
    grad_input = torch.empty_like(x) if want_input else None
    grad_residual = (torch.empty_like(x if residual is None else residual) if want_residual
                     else None)
    acc = compute_dtype(x.dtype)
    device = x.device  # (a new torch.device per read)
    if x.numel() == 0:
        if want_sums:
            sums = torch.zeros((2, x.shape[1]), dtype=acc, device=device)
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return grad_input, grad_weight, grad_bias, grad_residual, sums
    # The residual matters only through the activation's derivative, and not at all when
    # the activation bits record that derivative.
    use_act_bits = activation_mask is not None
    read_residual = residual is not None and activation != "none" and not use_act_bits
    copies, plan = backward_setup(
        geometry(grad_out), geometry(x), None if residual is None else geometry(residual),
        read_residual, want_input, want_residual, x.dtype, weight is not None, bias is not None,
        activation, use_act_bits, use_batch_stats, want_sums, want_weight, want_bias,
    )
    copy_grad_out, copy_x, copy_residual, standin_input, standin_residual = copies
    grad_out = grad_out.contiguous() if copy_grad_out else grad_out
    x_read = x.contiguous() if copy_x else x
    residual_read = None if not read_residual else (
        residual.contiguous() if copy_residual else residual)
    gi = stand_in(grad_input) if standin_input else grad_input  # (None where unwanted)
    gr = stand_in(grad_residual) if standin_residual else grad_residual
    mean, var = per_channel(mean), per_channel(var)
    weight, bias = per_channel(weight), per_channel(bias)
    act_bits = activation_mask if use_act_bits else None
    with device_guard(device):
        if plan.one_launch is not None:
            plan.one_launch(
                (grad_out, x_read, residual_read, mean, var, weight, bias, act_bits, gi, gr,
                 grad_weight, grad_bias),
                (eps, negative_slope, inv_count),
            )
        if plan.sums is not None:
            if standalone_sums:
                sums = torch.empty((2, x.shape[1]), dtype=acc, device=device)
                partial = (torch.empty(plan.workspace, dtype=acc, device=device)
                           if plan.workspace else None)
            else:  # one allocation: the [2, C] sums (flat), then the partial-sum workspace
                sums = torch.empty(2 * x.shape[1] + plan.workspace, dtype=acc, device=device)
                partial = sums[2 * x.shape[1]:] if plan.workspace else None
            tickets = counters(device, plan.counters) if plan.counters else None
            plan.sums(
                (grad_out, x_read, residual_read, mean, var, weight, bias, act_bits, partial,
                 tickets, sums, grad_weight, grad_bias),
                (eps, negative_slope),
            )
        if plan.grad_input is not None:
            plan.grad_input(
                (grad_out, x_read, residual_read, gi, gr, mean, var, weight, bias, act_bits,
                 per_channel(sums) if plan.grad_input.constexprs["BATCH_STATS"] else None),
                (eps, negative_slope, inv_count),
            )
    if gi is not None:
        copy_back(gi, grad_input)
    if gr is not None:
        copy_back(gr, grad_residual)
    return grad_input, grad_weight, grad_bias, grad_residual, sums


def normalize_grad_sums(
    inputs: BackwardInputs, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """[sum(g), sum(g * x_hat)] per channel ([2, C], compute dtype), and d weight / d bias,
    written by the same launch that writes the sums, where ``output_mask`` (weight, bias)
    asks for them (else None)."""
    want_weight = output_mask[0] and inputs.weight is not None
    want_bias = output_mask[1] and inputs.bias is not None
    _, grad_weight, grad_bias, _, sums = _backward(
        inputs, None, 1.0, True, False, False, True, want_weight, want_bias,
        standalone_sums=True)  # the op's output: not a view of a workspace
    return sums, grad_weight, grad_bias


def normalize_grad_input(
    inputs: BackwardInputs, grad_means: Tensor | None, use_batch_stats: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """d input and d residual in one launch, from the per-channel [mean(g), mean(g * x_hat)]
    (read for d input with ``use_batch_stats``). ``output_mask`` is (input, residual); what it
    does not ask for comes back None."""
    want_input, want_residual = output_mask
    if not (want_input or want_residual):
        return None, None
    grad_input, _, _, grad_residual, _ = _backward(
        inputs, grad_means, 1.0, use_batch_stats, want_input, want_residual, False, False, False)
    return grad_input, grad_residual
