"""BatchNorm forward kernels: batch statistics (with the running-stat update) and normalize.

Training statistics take one launch, ``partial_stats_kernel``, 1-D grid of chunks x
channel blocks (see tiling.program_item): each program sums y = x - A - K and y^2 over its
chunk of tiles. The anchor A = x[0, c, 0] is shared by all programs; the pilot mean K is
the mean of x - A over the program's first tile. With both the sums stay small even when the
mean is large against the spread (mean 1e4, std 1 in float32): x - A is exact for nearby
values, and y has mean near 0, so sum(y^2) - sum(y)^2 / n cancels little. A program turns
its sums into a summary (mean - A, M2; its count follows from the shapes). With one chunk
(not CHUNKED) it finishes the statistics itself. Otherwise it writes the summary to a
workspace and takes a ticket from its channel block's counter (an integer atomic); the
program that draws the last ticket merges all the block's summaries with Chan's parallel
formula, MERGE_CHUNKS at a time by a tree whose shape depends only on the constexprs, then
in chunk order: the result is bitwise reproducible whichever program finishes last. It
resets the counter to 0 for the next call.

``finish_statistics`` stores the batch mean and biased variance and the running update
running = (1 - factor) * running + factor * batch (unbiased variance), where factor is
momentum, or 1 / (num_batches_tracked + 1) (CUMULATIVE). num_batches_tracked goes up by
one in the same launch: after every finishing program has read it, by the last of them
(a second ticket) when CUMULATIVE, else by channel block 0's.

NaN and Inf propagate as in torch: a NaN in a channel gives NaN statistics and running
statistics; +-inf gives a mean of +-inf (or NaN, with both signs) and a NaN variance (a
non-finite anchor or pilot mean is replaced by 0, so it cannot turn finite values into NaN);
a sum of squares that overflows gives an infinite variance (output 0 * (x - mean) + bias).
Nothing clamps with max/min, whose PTX drops NaN.

``normalize_kernel`` then writes y = act((x - mean) * invstd * weight + bias + residual),
one tile per program, or (FLAT) one flat slice of contiguous tensors per program, and
(WRITE_ACT_BITS) the activation bits: one bit per element, whether act'(u) is 1, for the
backward; eval uses the same kernel with the running statistics. With VECTOR (contiguous
tensors whose rows carry no 16-byte alignment) normalize and slice_forward_kernel read
and write each row through an aligned window (tiling.row_windows).

Sums and elementwise math run in COMPUTE_DTYPE (float32, or float64 for float64 input).
The batch mean and variance are stored as float64: the mean is assembled exactly as
A + (mean - A), and the elementwise kernels split it per channel into hi + lo in
COMPUTE_DTYPE, so x - mean = (x - hi) - lo keeps full precision (see channel_constants).
Float scalars arrive as float64 and are rounded to the dtype they meet.
"""

import triton
import triton.language as tl

from .activations import activation_forward, derivative_is_one
from .tiling import (
    channel_block,
    flat_tile,
    known_row,
    load_rows_as_run,
    load_values,
    load_window,
    load_x_and_residual,
    program_item,
    program_tile,
    row_windows,
    slice_tile,
    store_rows,
    tile_offsets,
    tile_start,
    window_to_positions,
)


@triton.jit
def chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan's merge of two (mean, M2, count) summaries of disjoint sets of values.

    Non-finite means merge as torch's sum / count would: equal ones to themselves (inf and
    inf: inf), others to mean_a + mean_b (inf and a finite mean: inf; inf and -inf, or a
    NaN: NaN)."""
    count = count_a + count_b
    fraction_b = tl.where(count > 0, count_b / tl.where(count > 0, count, 1.0), 0.0)
    delta = mean_b - mean_a
    finite = (tl.abs(mean_a) < float("inf")) & (tl.abs(mean_b) < float("inf"))
    mean = tl.where(mean_a == mean_b, mean_a,
                    tl.where(finite, mean_a + delta * fraction_b, mean_a + mean_b))
    # delta * (delta * weight): a summary of no values (weight 0) adds exactly 0, even
    # where delta * delta would overflow to inf and inf * 0 give NaN.
    return mean, m2_a + m2_b + delta * (delta * (count_a * fraction_b)), count


@triton.jit
def finite_or_zero(value):
    """value where it is finite, else 0 (for the anchor and the pilot mean: one of inf or
    NaN would turn every finite value into a NaN)."""
    return tl.where(tl.abs(value) < float("inf"), value, 0.0)


@triton.jit
def centered_m2(sum_y2, sum_y, count):
    """M2 = sum(y^2) - sum(y)^2 / count. When sum(y^2) overflows to inf while sum(y) is
    finite, M2 is inf (torch's variance of such a channel), not inf - inf = NaN."""
    m2 = sum_y2 - sum_y * (sum_y / count)
    return tl.where((sum_y2 == float("inf")) & (tl.abs(sum_y) < float("inf")), sum_y2, m2)


@triton.jit
def chunk_counts(k, S, tiles_per_n, num_tiles, tiles_per_chunk, BLOCK_S: tl.constexpr):
    """Values per channel in chunks k (any shape): whole tiles of BLOCK_S positions, less
    what the last tile of each sample in the chunk lacks."""
    begin = k * tiles_per_chunk
    end = tl.minimum(begin + tiles_per_chunk, num_tiles)
    last_tiles = end // tiles_per_n - begin // tiles_per_n
    return (end - begin) * BLOCK_S - last_tiles * (tiles_per_n * BLOCK_S - S)


@triton.jit
def ticket(counter_ptr):
    """This program's place among those that share the counter (0 first); after the
    barrier and the atomic's acquire-release, the last one sees every earlier program's
    stores."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def merge_summaries(summary_ptr, c, c_mask, C, S, num_chunks, tiles_per_n, num_tiles,
                    tiles_per_chunk, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                    MERGE_CHUNKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Chan's merge of all chunk summaries of one channel block: MERGE_CHUNKS at a time by
    a tree reduction, the groups in chunk order."""
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    count = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    for k0 in range(0, num_chunks, MERGE_CHUNKS):
        k = k0 + tl.arange(0, MERGE_CHUNKS)
        k_mask = k < num_chunks
        mask = c_mask[:, None] & k_mask[None, :]
        offsets = k[None, :] * C + c[:, None]
        # .cg: read from L2, where the other programs' stores are, not a stale L1 line.
        group_mean = tl.load(summary_ptr + offsets, mask=mask, other=0, cache_modifier=".cg")
        group_m2 = tl.load(summary_ptr + num_chunks * C + offsets, mask=mask, other=0,
                           cache_modifier=".cg")
        counts = chunk_counts(k, S, tiles_per_n, num_tiles, tiles_per_chunk, BLOCK_S)
        group_count = tl.where(k_mask, counts, 0).to(COMPUTE_DTYPE)
        group_count = tl.broadcast_to(group_count[None, :], [BLOCK_C, MERGE_CHUNKS])
        group_mean, group_m2, group_count = tl.reduce(
            (group_mean, group_m2, group_count), 1, chan_merge)
        mean, m2, count = chan_merge(mean, m2, count, group_mean, group_m2, group_count)
    return mean, m2, count


@triton.jit
def finish_statistics(
    block, num_blocks, c, c_mask, anchor, anchored_mean, m2, count,
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    counters_ptr, momentum, unbias,
    COMPUTE_DTYPE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    INCREMENT_STEP: tl.constexpr,
):
    """Write the batch mean and biased variance (float64), update the running statistics,
    and count the step (see the module docstring); returns the mean and variance written."""
    mean = anchor.to(tl.float64) + anchored_mean.to(tl.float64)
    var = (m2 / count).to(tl.float64)
    var = tl.where(var < 0, 0.0, var)  # rounding can leave M2 a hair below 0; NaN stays
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    steps = 0
    if INCREMENT_STEP:
        steps = tl.load(num_batches_tracked_ptr, cache_modifier=".cg")
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / (steps + 1).to(tl.float64)
        else:
            factor = tl.full([], momentum, tl.float64)
        unbiased_var = var * tl.full([], unbias, tl.float64)
        running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(tl.float64)
        running_var = tl.load(running_var_ptr + c, mask=c_mask).to(tl.float64)
        running_mean = factor * mean + (1 - factor) * running_mean
        running_var = factor * unbiased_var + (1 - factor) * running_var
        # Through COMPUTE_DTYPE: exact for float32/float64 buffers, and Triton's interpreter
        # turns float64 -> bfloat16 into 0.
        running_mean = running_mean.to(COMPUTE_DTYPE).to(running_mean_ptr.dtype.element_ty)
        running_var = running_var.to(COMPUTE_DTYPE).to(running_var_ptr.dtype.element_ty)
        tl.store(running_mean_ptr + c, running_mean, mask=c_mask)
        tl.store(running_var_ptr + c, running_var, mask=c_mask)
    if INCREMENT_STEP:
        if CUMULATIVE:
            # Every block's finisher read the count; the last one to get here writes it.
            if ticket(counters_ptr + num_blocks) == num_blocks - 1:
                tl.store(num_batches_tracked_ptr, steps + 1)
                tl.store(counters_ptr + num_blocks, 0)
        elif block == 0:
            tl.store(num_batches_tracked_ptr, steps + 1)
    return mean, var


@triton.jit
def load_anchored_tile(x_ptr, t, c0, c, c_mask, anchor, C, S, stride_n, stride_c, stride_s,
                       tiles_per_n, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                       RUN: tl.constexpr, USE_INT64: tl.constexpr):
    """Tile t of x (channels c, the first c0) minus the anchor (0 where masked), and its
    count of valid positions; RUN > 0: loaded as one run of consecutive rows
    (tiling.load_rows_as_run)."""
    n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < S)[None, :]
    if RUN > 0:
        x = load_rows_as_run(x_ptr, n, c0, C, S, stride_n, mask, BLOCK_S, BLOCK_C, RUN)
    else:
        x = tl.load(x_ptr + tile_offsets(n, s, c, stride_n, stride_c, stride_s), mask=mask,
                    other=0)
    anchored = tl.where(mask, x.to(anchor.dtype) - anchor[:, None], 0.0)
    return anchored, mask, tl.minimum(S - s0, BLOCK_S)


@triton.jit
def partial_stats_kernel(
    x_ptr,  # input, read as [N, C, S]
    summary_ptr,  # [2, num_chunks, C] COMPUTE_DTYPE workspace: per chunk mean - A, and M2
    counters_ptr,  # [channel blocks + 1] int32 tickets, 0 between calls (CHUNKED, CUMULATIVE)
    mean_ptr, var_ptr,  # [C] float64 batch mean and biased variance, written
    running_mean_ptr, running_var_ptr,  # [C] updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [1] int64 step counter, incremented (INCREMENT_STEP)
    C, S,  # channels; positions per sample along the S axis
    stride_n, stride_c, stride_s,  # element strides of x's [N, C, S] view
    tiles_per_n,  # cdiv(S, BLOCK_S)
    num_tiles,  # N * tiles_per_n
    tiles_per_chunk,  # tiles summed by one program
    num_chunks,  # cdiv(num_tiles, tiles_per_chunk): programs per channel block
    momentum: tl.float64, unbias: tl.float64,  # update factor (unless CUMULATIVE); M/(M-1)
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    CHUNKED: tl.constexpr,  # more than one chunk: workspace, tickets, merge
    MERGE_CHUNKS: tl.constexpr,  # chunk summaries merged by one tree step
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, INCREMENT_STEP: tl.constexpr,
    ROW: tl.constexpr,  # > 0: x's rows are ROW contiguous elements (tiling.known_row)
    RUN: tl.constexpr,  # > 0: rows follow each other, loaded as runs (load_anchored_tile)
    USE_INT64: tl.constexpr,
):
    """Summary (count, mean - A, M2) of one chunk of tiles for one channel block; the
    statistics from the block's last program (see the module docstring)."""
    S = known_row(S, ROW)
    stride_c = known_row(stride_c, ROW)
    block, chunk = program_item(num_chunks)
    num_blocks = tl.num_programs(0) // num_chunks
    c = channel_block(block, BLOCK_C, USE_INT64)
    c_mask = c < C
    anchor = tl.load(x_ptr + c * stride_c, mask=c_mask, other=0).to(COMPUTE_DTYPE)
    anchor = finite_or_zero(anchor)
    tile_begin = chunk * tiles_per_chunk
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_tiles)
    first, mask, first_count = load_anchored_tile(
        x_ptr, tile_begin, block * BLOCK_C, c, c_mask, anchor, C, S, stride_n, stride_c,
        stride_s, tiles_per_n, BLOCK_S, BLOCK_C, RUN, USE_INT64,
    )
    pilot_mean = finite_or_zero(tl.sum(first, axis=1) / first_count)
    y = tl.where(mask, first - pilot_mean[:, None], 0.0)
    sum_y = y
    sum_y2 = y * y
    for t in range(tile_begin + 1, tile_end):
        anchored, mask, _ = load_anchored_tile(
            x_ptr, t, block * BLOCK_C, c, c_mask, anchor, C, S, stride_n, stride_c,
            stride_s, tiles_per_n, BLOCK_S, BLOCK_C, RUN, USE_INT64,
        )
        y = tl.where(mask, anchored - pilot_mean[:, None], 0.0)
        sum_y += y
        sum_y2 += y * y
    count_f = chunk_counts(chunk, S, tiles_per_n, num_tiles, tiles_per_chunk,
                           BLOCK_S).to(COMPUTE_DTYPE)
    chunk_sum_y = tl.sum(sum_y, axis=1)
    anchored_mean = pilot_mean + chunk_sum_y / count_f
    m2 = centered_m2(tl.sum(sum_y2, axis=1), chunk_sum_y, count_f)
    if CHUNKED:
        tl.store(summary_ptr + chunk * C + c, anchored_mean, mask=c_mask)
        tl.store(summary_ptr + (num_chunks + chunk) * C + c, m2, mask=c_mask)
        if ticket(counters_ptr + block) == num_chunks - 1:
            merged_mean, merged_m2, merged_count = merge_summaries(
                summary_ptr, c, c_mask, C, S, num_chunks, tiles_per_n, num_tiles,
                tiles_per_chunk, BLOCK_S, BLOCK_C, MERGE_CHUNKS, COMPUTE_DTYPE,
            )
            tl.store(counters_ptr + block, 0)
            finish_statistics(
                block, num_blocks, c, c_mask, anchor, merged_mean, merged_m2, merged_count,
                mean_ptr, var_ptr, running_mean_ptr, running_var_ptr,
                num_batches_tracked_ptr, counters_ptr, momentum, unbias, COMPUTE_DTYPE,
                UPDATE_RUNNING, CUMULATIVE, INCREMENT_STEP,
            )
    else:
        finish_statistics(
            block, num_blocks, c, c_mask, anchor, anchored_mean, m2, count_f,
            mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
            counters_ptr, momentum, unbias, COMPUTE_DTYPE, UPDATE_RUNNING, CUMULATIVE,
            INCREMENT_STEP,
        )


@triton.jit
def channel_constants(c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps,
                      COMPUTE_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    """Per-channel (hi, lo, invstd, scale, shift) in COMPUTE_DTYPE, shaped like c (a
    channel block, or one channel per element of a flat slice).

    With mean = hi + lo (any stored dtype), invstd = 1 / sqrt(var + eps),
    scale = invstd * weight and shift = bias - lo * scale, the pre-activation is
    (x - hi) * scale + shift.
    """
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0)
    var = tl.load(var_ptr + c, mask=c_mask, other=1)
    return constants_of_statistics(c, c_mask, mean, var, weight_ptr, bias_ptr, eps,
                                   COMPUTE_DTYPE, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def constants_of_statistics(c, c_mask, mean, var, weight_ptr, bias_ptr, eps,
                            COMPUTE_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_BIAS: tl.constexpr):
    """channel_constants from the statistics' values (as stored, or as about to be)."""
    mean = mean.to(tl.float64)
    hi = mean.to(COMPUTE_DTYPE)
    lo = (mean - hi.to(tl.float64)).to(COMPUTE_DTYPE)
    var = var.to(COMPUTE_DTYPE)
    invstd = tl.math.rsqrt(var + tl.full([], eps, COMPUTE_DTYPE))
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + c, mask=c_mask, other=0).to(COMPUTE_DTYPE)
    shift = -lo * scale
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0).to(COMPUTE_DTYPE) - lo * scale
    return hi, lo, invstd, scale, shift


@triton.jit
def pre_activation(x, hi, scale, shift, residual, HAS_RESIDUAL: tl.constexpr):
    """u = (x - hi) * scale + shift + residual on a tile (x, residual already upcast; hi,
    scale and shift broadcast to x's shape).

    The backward kernels call this too, so they see exactly the forward's u.
    """
    u = (x - hi) * scale + shift
    if HAS_RESIDUAL:
        u += residual
    return u


@triton.jit
def pack_act_bits(u, u_mask, tile_mask, window_shift, ACTIVATION: tl.constexpr,
                  BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr, BLOCK_S: tl.constexpr,
                  VECTOR: tl.constexpr):
    """derivative_is_one(u) of a [BLOCK_C, COLUMNS] tile (0 where masked: u_mask for u,
    tile_mask for the positions), packed 8 consecutive columns to a byte:
    [BLOCK_C, COLUMNS // 8], bit j of byte k column 8k + j. With windows (VECTOR > 0;
    tiling.row_windows, each row's window_shift) the bits first move to their positions."""
    bits = (derivative_is_one(u, ACTIVATION) & u_mask).to(tl.int32)
    if VECTOR > 0:
        bits = window_to_positions(bits, window_shift, BLOCK_C, COLUMNS, BLOCK_S)
    bits = tl.where(tile_mask, bits, 0)
    groups = tl.reshape(bits, [BLOCK_C, COLUMNS // 8, 8])
    return tl.sum(groups << tl.arange(0, 8)[None, None, :], axis=2)


@triton.jit
def store_act_bits(act_bits_ptr, u, u_mask, window_shift, n, s0, c, c_mask, tile_mask,
                   act_bits_stride_n, act_bits_stride_c, ACTIVATION: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, VECTOR: tl.constexpr):
    """Pack derivative_is_one(u) of a tile into the uint8 activation bits [rows, C, S8]:
    bit j of byte k is position 8k + j (BLOCK_S and s0 are multiples of 8; u_mask,
    window_shift, VECTOR: see pack_act_bits)."""
    packed = pack_act_bits(u, u_mask, tile_mask, window_shift, ACTIVATION, BLOCK_C, BLOCK_S,
                           BLOCK_S, VECTOR)
    byte = s0 // 8 + tl.arange(0, BLOCK_S // 8)
    byte_mask = c_mask[:, None] & (byte < act_bits_stride_c)[None, :]
    offsets = n * act_bits_stride_n + c[:, None] * act_bits_stride_c + byte[None, :]
    tl.store(act_bits_ptr + offsets, packed.to(tl.uint8), mask=byte_mask)


@triton.jit
def normalize_values(x_ptr, y_ptr, residual_ptr, x_offsets, y_offsets, r_offsets, mask, hi,
                     scale, shift, negative_slope, COMPUTE_DTYPE: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """Store y = act(u) at y_offsets and return the pre-activation u, from x (and the
    residual) at their offsets; hi, scale and shift broadcast to the offsets' shape."""
    x, residual = load_x_and_residual(x_ptr, residual_ptr, x_offsets, r_offsets, mask,
                                      HAS_RESIDUAL, COMPUTE_DTYPE)
    return store_normalized(y_ptr, y_offsets, x, residual, mask, mask, hi, scale, shift,
                            negative_slope, HAS_RESIDUAL, ACTIVATION, 0)


@triton.jit
def store_normalized(y_ptr, y_offsets, x, residual, mask, whole, hi, scale, shift,
                     negative_slope, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                     VECTOR: tl.constexpr):
    """Store y = act(u) of loaded x (and residual) where mask (tiling.store_rows: whole,
    VECTOR) and return the pre-activation u."""
    u = pre_activation(x, hi, scale, shift, residual, HAS_RESIDUAL)
    store_rows(y_ptr, y_offsets, activation_forward(u, ACTIVATION, negative_slope), mask,
               whole, VECTOR)
    return u


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr,  # [N, C, S] views: input read, output written
    residual_ptr,  # [N, C, S] view added before the activation (None unless HAS_RESIDUAL)
    mean_ptr, var_ptr,  # [C] statistics (float64 batch statistics, or running statistics)
    weight_ptr, bias_ptr,  # [C] affine parameters (None unless HAS_WEIGHT / HAS_BIAS)
    act_bits_ptr,  # [N, C, cdiv(S, 8)] uint8 activation bits, written (WRITE_ACT_BITS)
    C, S,
    numel,  # N * C * S (FLAT)
    x_stride_n, x_stride_c, x_stride_s,  # the views' element strides (not FLAT)
    y_stride_n, y_stride_c, y_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    act_bits_stride_n, act_bits_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    tiles_per_n, num_tiles,  # cdiv(S, BLOCK_S); tiles per channel block
    eps: tl.float64, negative_slope: tl.float64,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,  # tile; FLAT: BLOCK_S elements, BLOCK_C 1
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, WRITE_ACT_BITS: tl.constexpr,
    FLAT: tl.constexpr,  # every tensor contiguous: walk the flat range (no WRITE_ACT_BITS)
    ROW: tl.constexpr,  # > 0: every tensor's rows are ROW contiguous elements (not FLAT)
    VECTOR: tl.constexpr,  # > 0: contiguous tensors, rows read through windows (not FLAT)
    USE_INT64: tl.constexpr,
):
    """y = act((x - mean) * invstd * weight + bias + residual) on one tile."""
    if FLAT:
        offsets, mask, c, _, _ = flat_tile(numel, C, S, BLOCK_S, USE_INT64)
        hi, lo, invstd, scale, shift = channel_constants(
            c, mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
            HAS_BIAS,
        )
        normalize_values(x_ptr, y_ptr, residual_ptr, offsets, offsets, offsets, mask, hi,
                         scale, shift, negative_slope, COMPUTE_DTYPE, HAS_RESIDUAL,
                         ACTIVATION)
    else:
        x_stride_c = known_row(x_stride_c, ROW)
        y_stride_c = known_row(y_stride_c, ROW)
        r_stride_c = known_row(r_stride_c, ROW)
        n, s0, s, c, c_mask, mask = program_tile(C, known_row(S, ROW), tiles_per_n, num_tiles,
                                                 BLOCK_S, BLOCK_C, USE_INT64)
        hi, lo, invstd, scale, shift = channel_constants(
            c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE,
            HAS_WEIGHT, HAS_BIAS,
        )
        window_shift = 0
        if VECTOR > 0:  # one tile per row (s0 == 0)
            row_mask = c_mask[:, None]
            offsets, _, in_row, readable, whole, window_shift = row_windows(
                n * x_stride_n + c[:, None] * x_stride_c, tl.arange(0, BLOCK_S)[None, :],
                known_row(S, ROW), numel, BLOCK_S, VECTOR)
            u_mask = row_mask & in_row
            x = load_window(x_ptr, offsets, row_mask & readable, u_mask, COMPUTE_DTYPE)
            residual = x
            if HAS_RESIDUAL:
                residual = load_window(residual_ptr, offsets, row_mask & readable, u_mask,
                                       COMPUTE_DTYPE)
            u = store_normalized(y_ptr, offsets, x, residual, u_mask, row_mask & whole,
                                 hi[:, None], scale[:, None], shift[:, None], negative_slope,
                                 HAS_RESIDUAL, ACTIVATION, VECTOR)
        else:
            u = normalize_values(
                x_ptr, y_ptr, residual_ptr,
                tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s),
                tile_offsets(n, s, c, y_stride_n, y_stride_c, y_stride_s),
                tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s), mask,
                hi[:, None], scale[:, None], shift[:, None], negative_slope, COMPUTE_DTYPE,
                HAS_RESIDUAL, ACTIVATION,
            )
            u_mask = mask
        if WRITE_ACT_BITS:
            store_act_bits(act_bits_ptr, u, u_mask, window_shift, n, s0, c, c_mask, mask,
                           act_bits_stride_n, act_bits_stride_c, ACTIVATION, BLOCK_S, BLOCK_C,
                           VECTOR)


@triton.jit
def slice_forward_kernel(
    x_ptr, y_ptr, residual_ptr,  # [N, C, S] views: x, residual (HAS_RESIDUAL) read; y written
    mean_ptr, var_ptr,  # [C] float64 batch mean and biased variance, written
    running_mean_ptr, running_var_ptr,  # [C] updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [1] int64 step counter, incremented (INCREMENT_STEP)
    counters_ptr,  # [channel blocks + 1] int32 tickets, 0 between calls (CUMULATIVE)
    weight_ptr, bias_ptr,  # [C] affine parameters (None unless HAS_WEIGHT / HAS_BIAS)
    act_bits_ptr,  # [N, C, cdiv(S, 8)] uint8 activation bits, written (WRITE_ACT_BITS)
    C, S, batch,  # the view's channels, positions per sample and samples
    numel,  # batch * C * S (VECTOR)
    x_stride_n, x_stride_c, x_stride_s,  # the views' element strides
    y_stride_n, y_stride_c, y_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    act_bits_stride_n, act_bits_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    momentum: tl.float64, unbias: tl.float64,  # update factor (unless CUMULATIVE); M/(M-1)
    count: tl.float64,  # M = batch * S values per channel
    eps: tl.float64, negative_slope: tl.float64,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,  # the slice's tile
    COMPUTE_DTYPE: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, INCREMENT_STEP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    WRITE_ACT_BITS: tl.constexpr,  # BLOCK_S is then a multiple of 8
    ROW: tl.constexpr,  # > 0: every tensor's rows are ROW contiguous elements
    VECTOR: tl.constexpr,  # > 0: contiguous tensors, rows read through windows
    USE_INT64: tl.constexpr,
):
    """The whole training forward of one channel block, its [N, S] slice held as one tile
    (tiling.slice_tile): the statistics by an exact two-pass over the registers (the mean,
    then the sums of the deviations d = x - mean and of d^2, the first correcting the mean
    and M2 for its rounding), the running update and the step (finish_statistics), then
    y and the activation bits from the same registers, with the constants the statistics
    stored give (so a backward that recomputes u sees exactly this u)."""
    S = known_row(S, ROW)
    x_stride_c = known_row(x_stride_c, ROW)
    y_stride_c = known_row(y_stride_c, ROW)
    r_stride_c = known_row(r_stride_c, ROW)
    n, s, c, c_mask, tile_mask = slice_tile(C, S, batch, BLOCK_N, BLOCK_S, BLOCK_C, USE_INT64)
    x_offsets = tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s)
    y_offsets = tile_offsets(n, s, c, y_stride_n, y_stride_c, y_stride_s)
    r_offsets = tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s)
    mask = tile_mask
    whole = mask
    window_shift = 0
    if VECTOR > 0:
        row_mask = c_mask[:, None] & (n < batch)
        x_offsets, _, in_row, readable, whole, window_shift = row_windows(
            n * x_stride_n + c[:, None] * x_stride_c, tl.arange(0, BLOCK_N * BLOCK_S)[None, :],
            S, numel, BLOCK_S, VECTOR)
        y_offsets = x_offsets
        r_offsets = x_offsets
        mask = row_mask & in_row
        whole = row_mask & whole
        readable = row_mask & readable
        x = load_window(x_ptr, x_offsets, readable, mask, COMPUTE_DTYPE)
    else:
        x = load_values(x_ptr, x_offsets, mask, COMPUTE_DTYPE)
    # x: the whole slice, held until y is written
    count = tl.full([], count, COMPUTE_DTYPE)
    rough_mean = tl.sum(x, axis=1) / count
    d = tl.where(mask, x - rough_mean[:, None], 0.0)
    sum_d = tl.sum(d, axis=1)
    m2 = centered_m2(tl.sum(d * d, axis=1), sum_d, count)
    # A non-finite rough mean makes every d non-finite: its correction is then left out,
    # so an inf channel keeps the mean inf (as torch's), not inf + NaN.
    mean, var = finish_statistics(
        tl.program_id(0), tl.num_programs(0), c, c_mask, rough_mean,
        finite_or_zero(sum_d / count), m2, count, mean_ptr, var_ptr, running_mean_ptr,
        running_var_ptr, num_batches_tracked_ptr, counters_ptr, momentum, unbias,
        COMPUTE_DTYPE, UPDATE_RUNNING, CUMULATIVE, INCREMENT_STEP,
    )
    hi, lo, invstd, scale, shift = constants_of_statistics(
        c, c_mask, mean, var, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT, HAS_BIAS)
    residual = x
    if HAS_RESIDUAL:
        if VECTOR > 0:
            residual = load_window(residual_ptr, r_offsets, readable, mask, COMPUTE_DTYPE)
        else:
            residual = load_values(residual_ptr, r_offsets, mask, COMPUTE_DTYPE)
    u = store_normalized(y_ptr, y_offsets, x, residual, mask, whole, hi[:, None],
                         scale[:, None], shift[:, None], negative_slope, HAS_RESIDUAL,
                         ACTIVATION, VECTOR)
    if WRITE_ACT_BITS:  # byte k of the slice: sample k // (BLOCK_S // 8), byte k % that
        packed = pack_act_bits(u, mask, tile_mask, window_shift, ACTIVATION, BLOCK_C,
                               BLOCK_N * BLOCK_S, BLOCK_S, VECTOR)
        k = tl.arange(0, BLOCK_N * BLOCK_S // 8)
        sample = k // (BLOCK_S // 8)
        byte = k % (BLOCK_S // 8)
        if USE_INT64:
            sample = sample.to(tl.int64)
        byte_mask = c_mask[:, None] & ((sample < batch) & (byte < act_bits_stride_c))[None, :]
        offsets = (sample[None, :] * act_bits_stride_n + c[:, None] * act_bits_stride_c
                   + byte[None, :])
        tl.store(act_bits_ptr + offsets, packed.to(tl.uint8), mask=byte_mask)
