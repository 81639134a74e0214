"""How every fastbn kernel walks a tensor: [N, C, S] views, 2-D tiles, element offsets.

A tensor (N, C, *spatial) is read as [N, C, S] through three strides (stride_n, stride_c,
stride_s). NCHW-like layouts have stride_s == 1; channels_last-like layouts have
stride_c == 1 and are usually folded by the launcher into [1, C, N * S]. Triton
specialises a stride equal to 1, so loads vectorise along whichever axis is contiguous.

A tile is BLOCK_C channels by BLOCK_S positions of S, at one n; per-channel reductions run
along axis 1. Tiles of one channel block are numbered t = n * tiles_per_n + (s // BLOCK_S).
Grids are one-dimensional (CUDA allows 2**31 - 1 programs on axis 0, only 65535 on the
others): program p works on channel block p // per_block and item p % per_block of it,
an item being a tile (elementwise kernels) or a chunk of tiles (reductions).

``slice_tile`` is the one-program walk: a channel block's whole [N, S] slice as one tile
(the one-launch backward, whose program keeps it in registers).

``row_windows`` reads rows that carry no alignment (NCHW at 7x7 or 14x14: S = 49, 196)
with full-width vectors: each row through the window of BLOCK_S elements that starts at
the VECTOR-aligned offset at or below the row's start, every tensor of the call being
contiguous (so the window's other elements are the neighbouring rows', valid memory).
Columns outside the row are masked off after the load; stores write the vectors that lie
wholly inside the row as vectors and the row's ragged ends element by element
(store_rows).

``flat_tile`` is the other walk, for elementwise kernels whose tensors are all contiguous
[N, C, S]: BLOCK consecutive elements, each with its channel computed, so loads and stores
are full-width vectors whatever S is (S = 49 rows carry no alignment).
"""

import triton
import triton.language as tl


@triton.jit
def tile_start(t, tiles_per_n, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr):
    """The batch index n and the first spatial position s0 of tile t."""
    n = t // tiles_per_n
    s0 = (t % tiles_per_n) * BLOCK_S
    if USE_INT64:
        n = n.to(tl.int64)
        s0 = s0.to(tl.int64)
    return n, s0


@triton.jit
def tile_offsets(n, s, c, stride_n, stride_c, stride_s):
    """Element offsets [BLOCK_C, BLOCK_S] of positions (n, c, s) in one tensor's view."""
    return n * stride_n + c[:, None] * stride_c + s[None, :] * stride_s


@triton.jit
def known_row(value, ROW: tl.constexpr):
    """ROW where the launcher found every tensor's rows to be ROW contiguous elements
    (ROW > 0: for S and the channel strides), else value. A constant tells the compiler
    how the rows align, so that they load as vectors: Triton knows only which integer
    arguments are multiples of 16, and S = 196 is not one."""
    if ROW > 0:
        value = ROW
    return value


@triton.jit
def load_values(ptr, offsets, mask, COMPUTE_DTYPE: tl.constexpr):
    """The elements of one tensor at offsets (0 where masked), in COMPUTE_DTYPE."""
    return tl.load(ptr + offsets, mask=mask, other=0).to(COMPUTE_DTYPE)


@triton.jit
def load_x_and_residual(x_ptr, residual_ptr, x_offsets, r_offsets, mask,
                        HAS_RESIDUAL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """x, and the residual (HAS_RESIDUAL; else x again, as a stand-in nobody reads), at
    their offsets: what the pre-activation u is computed from."""
    x = load_values(x_ptr, x_offsets, mask, COMPUTE_DTYPE)
    residual = x
    if HAS_RESIDUAL:
        residual = load_values(residual_ptr, r_offsets, mask, COMPUTE_DTYPE)
    return x, residual


@triton.jit
def load_rows_as_run(ptr, n, c0, C, S, stride_n, mask, BLOCK_S: tl.constexpr,
                     BLOCK_C: tl.constexpr, RUN: tl.constexpr):
    """The [BLOCK_C, BLOCK_S] tile of rows c0.. of sample n (0 where masked) of a tensor
    whose rows follow each other (stride_c == S, stride_s == 1), loaded as the one
    contiguous run of BLOCK_C * S elements they form (RUN, a power of two, covers it):
    full-width vectors whatever S is, then moved into the tile's layout by a gather."""
    j = tl.arange(0, RUN)
    run = tl.load(ptr + n * stride_n + c0 * S + j,
                  mask=j < tl.minimum(C - c0, BLOCK_C) * S, other=0)
    s = tl.arange(0, BLOCK_S)
    index = tl.arange(0, BLOCK_C)[:, None] * S + tl.where(s < S, s, 0)[None, :]
    tile = tl.gather(run, tl.reshape(index, [BLOCK_C * BLOCK_S]), 0)
    return tl.where(mask, tl.reshape(tile, [BLOCK_C, BLOCK_S]), 0)


@triton.jit
def row_windows(row_start, column, S, numel, BLOCK_S: tl.constexpr, VECTOR: tl.constexpr):
    """The windows through which rows of S elements starting at offsets row_start (of
    tensors of numel elements) load: window k takes columns k * BLOCK_S .. of ``column``,
    and begins at the VECTOR-aligned offset at or below its row's start
    (S + VECTOR - 1 <= BLOCK_S, so it covers the row).
    Returns each column's element offset, its position s in its row (valid where in_row),
    in_row, whether its VECTOR overlaps the row within the tensor (what a vector load
    reads: load_window), whether its whole VECTOR lies in the row (what a vector store
    may write, as store_rows takes it), and the row's shift (its start minus its
    window's)."""
    base = (row_start // VECTOR) * VECTOR
    shift = row_start - base
    w = column % BLOCK_S
    s = w - shift
    in_row = (s >= 0) & (s < S)
    # In whole vectors, compared per VECTOR columns, so the compiler sees the mask constant
    # along each vector.
    vector = column // VECTOR - (column // BLOCK_S) * (BLOCK_S // VECTOR)
    whole = (vector >= (shift + VECTOR - 1) // VECTOR) & (vector < (shift + S) // VECTOR)
    offsets = base + w
    readable = (vector < (shift + S + VECTOR - 1) // VECTOR) & (offsets < numel)
    return offsets, s, in_row, readable, whole, shift


@triton.jit
def load_window(ptr, offsets, readable, mask, COMPUTE_DTYPE: tl.constexpr):
    """A tensor's values at window offsets (row_windows) in COMPUTE_DTYPE, 0 outside mask
    (the rows): the load itself is masked by ``readable`` (whole vectors), so it stays a
    vector load."""
    return tl.where(mask, load_values(ptr, offsets, readable, COMPUTE_DTYPE), 0)


@triton.jit
def store_rows(ptr, offsets, values, mask, whole, VECTOR: tl.constexpr):
    """Store values (cast to ptr's dtype) where mask; with windows (VECTOR > 0) in two
    stores: where whole (the part of mask made of whole vectors, a mask constant along
    each vector, so the store vectorises), then the rest of mask (the rows' ragged ends)."""
    values = values.to(ptr.dtype.element_ty)
    if VECTOR > 0:
        tl.store(ptr + offsets, values, mask=whole)
        tl.store(ptr + offsets, values, mask=mask & ~whole)
    else:
        tl.store(ptr + offsets, values, mask=mask)


@triton.jit
def window_to_positions(values, shift, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    """values of a [BLOCK_C, COLUMNS] window tile (row_windows; each row's shift) moved
    so that column j holds position j % BLOCK_S of its row, where that is s < S (mask the
    others). Gathered within each window: a gather along a whole long row costs ptxas far
    more registers."""
    position = tl.arange(0, COLUMNS)[None, :] % BLOCK_S
    index = tl.broadcast_to(tl.where(position + shift < BLOCK_S, position + shift, position),
                            [BLOCK_C, COLUMNS])
    rows: tl.constexpr = BLOCK_C * (COLUMNS // BLOCK_S)
    moved = tl.gather(tl.reshape(values, [rows, BLOCK_S]), tl.reshape(index, [rows, BLOCK_S]),
                      1)
    return tl.reshape(moved, [BLOCK_C, COLUMNS])


@triton.jit
def channel_block(block, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """The BLOCK_C channel indices of channel block ``block``."""
    if USE_INT64:
        block = block.to(tl.int64)
    return block * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def program_item(per_block):
    """(channel block, item within it) of this program in a 1-D grid of per_block items
    for each channel block."""
    pid = tl.program_id(0)
    block = pid // per_block
    return block, pid - block * per_block


@triton.jit
def program_tile(C, S, tiles_per_n, num_tiles, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                 USE_INT64: tl.constexpr):
    """The tile of an elementwise program: n, s0, its positions s, channels c, the channel
    mask and the [BLOCK_C, BLOCK_S] element mask."""
    block, t = program_item(num_tiles)
    n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
    s = s0 + tl.arange(0, BLOCK_S)
    c = channel_block(block, BLOCK_C, USE_INT64)
    c_mask = c < C
    return n, s0, s, c, c_mask, c_mask[:, None] & (s < S)[None, :]


@triton.jit
def slice_tile(C, S, batch, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """The whole [batch, S] slice of channel block program_id(0) as one
    [BLOCK_C, BLOCK_N * BLOCK_S] tile, column j holding position j % BLOCK_S of sample
    j // BLOCK_S: n (shaped [1, columns], so it broadcasts in tile_offsets like a tile's
    scalar n), s, the channels c, the channel mask and the element mask."""
    c = channel_block(tl.program_id(0), BLOCK_C, USE_INT64)
    j = tl.arange(0, BLOCK_N * BLOCK_S)
    n = j // BLOCK_S
    s = j % BLOCK_S
    if USE_INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    c_mask = c < C
    return n[None, :], s, c, c_mask, c_mask[:, None] & ((n < batch) & (s < S))[None, :]


@triton.jit
def flat_tile(numel, C, S, BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
    """The BLOCK flat offsets of this program's slice of a contiguous [N, C, S] tensor,
    their mask, and each element's channel, row (n * C + c) and position s in its row.

    The channel comes without a division per element: the slice starts at position r0 of
    row row0 (one scalar division), element i lies q = (r0 + i) // S rows further, which
    float32 gets exactly after one correction (r0 + i < 2**24), and the launcher keeps
    BLOCK + S <= C * S, so the channel row0 % C + q wraps past C at most once.
    """
    start = tl.program_id(0)
    if USE_INT64:
        start = start.to(tl.int64)
    start = start * BLOCK
    row0 = start // S
    r0 = (start - row0 * S).to(tl.int32)
    a = r0 + tl.arange(0, BLOCK)
    q = (a.to(tl.float32) * (1.0 / S)).to(tl.int32)
    r = a - q * S
    q = tl.where(r >= S, q + 1, tl.where(r < 0, q - 1, q))
    c = row0 % C + q
    c = tl.where(c >= C, c - C, c)
    offsets = start + tl.arange(0, BLOCK)
    return offsets, offsets < numel, c, row0 + q, a - q * S
