"""BatchNorm forward kernels: batch statistics (with the running-stat update) and normalize.

Training statistics take one or two launches:
1. ``partial_stats_kernel``, grid (chunks, channel blocks): each program sums y = x - A - K
   and y^2 over its chunk of tiles. The anchor A = x[0, c, 0] is shared by all programs;
   K is the mean of x - A over the program's first tile. With both shifts the sums stay
   small even when the mean is large against the spread (mean 1e4, std 1 in float32):
   x - A is exact for nearby values, and y has mean near 0, so sum(y^2) - sum(y)^2 / n
   cancels little. A program turns its sums into a summary (count, mean - A, M2); with
   one chunk (FINALIZE) it finishes the statistics itself, otherwise it writes the summary
   to a workspace.
2. ``finalize_stats_kernel``, grid (channel blocks,): merges the chunk summaries in chunk
   order with Chan's parallel formula, so the result is bitwise reproducible.
Both end in ``store_statistics``: the batch mean and biased variance, and the running
update running = (1 - factor) * running + factor * batch (unbiased variance), where factor
is momentum, or 1 / num_batches_tracked read from device memory (CUMULATIVE).

``normalize_kernel`` then writes y = act((x - mean) * invstd * weight + bias + residual),
one tile per program; eval uses the same kernel with the running statistics.

Sums and elementwise math run in COMPUTE_DTYPE (float32, or float64 for float64 input).
The batch mean and variance are stored as float64: the mean is assembled exactly as
A + (mean - A), and the elementwise kernels split it per channel into hi + lo in
COMPUTE_DTYPE, so x - mean = (x - hi) - lo keeps full precision (see channel_constants).
Float scalars arrive as float64 and are rounded to the dtype they meet.
"""

import triton
import triton.language as tl

from .activations import activation_forward, derivative_is_one
from .tiling import channel_block, program_tile, tile_offsets, tile_start


@triton.jit
def chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan's merge of two (mean, M2, count) summaries of disjoint sets of values."""
    count = count_a + count_b
    fraction_b = tl.where(count > 0, count_b / tl.maximum(count, 1), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * fraction_b, m2_a + m2_b + delta * delta * count_a * fraction_b, count


@triton.jit
def store_statistics(
    c, c_mask, anchor, anchored_mean, m2, count,
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    momentum, unbias,
    COMPUTE_DTYPE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
):
    """Write the batch mean and biased variance (float64); update the running statistics."""
    mean = anchor.to(tl.float64) + anchored_mean.to(tl.float64)
    var = tl.maximum(m2 / count, 0.0).to(tl.float64)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_tracked_ptr).to(tl.float64)
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


@triton.jit
def load_anchored_tile(x_ptr, t, c, c_mask, anchor, S, stride_n, stride_c, stride_s,
                       tiles_per_n, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr):
    """Tile t of x minus the anchor (0 where masked), and its count of valid positions."""
    n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < S)[None, :]
    x = tl.load(x_ptr + tile_offsets(n, s, c, stride_n, stride_c, stride_s), mask=mask, other=0)
    anchored = tl.where(mask, x.to(anchor.dtype) - anchor[:, None], 0.0)
    return anchored, mask, tl.minimum(S - s0, BLOCK_S)


@triton.jit
def partial_stats_kernel(
    x_ptr,  # input, read as [N, C, S]
    summary_ptr,  # [2, num_chunks, C] COMPUTE_DTYPE workspace: per chunk mean - A, and M2
    counts_ptr,  # [num_chunks] int64 workspace: values per channel in each chunk
    mean_ptr, var_ptr,  # [C] float64 batch mean and biased variance (written when FINALIZE)
    running_mean_ptr, running_var_ptr,  # [C] updated in place (FINALIZE and UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [1] int64: read (CUMULATIVE, already incremented) or incremented
    C, S,  # channels; positions per sample along the S axis
    stride_n, stride_c, stride_s,  # element strides of x's [N, C, S] view
    tiles_per_n,  # cdiv(S, BLOCK_S)
    num_tiles,  # N * tiles_per_n
    tiles_per_chunk,  # tiles summed by one program
    momentum: tl.float64, unbias: tl.float64,  # update factor (unless CUMULATIVE); M/(M-1)
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    FINALIZE: tl.constexpr,  # one chunk: write the statistics, no workspace
    INCREMENT_STEP: tl.constexpr,  # add 1 to num_batches_tracked (nothing else reads it)
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Summary (count, mean - A, M2) of one chunk of tiles for one channel block."""
    pid_chunk = tl.program_id(0)
    if INCREMENT_STEP:
        if (pid_chunk == 0) & (tl.program_id(1) == 0):
            tl.store(num_batches_tracked_ptr, tl.load(num_batches_tracked_ptr) + 1)
    c = channel_block(tl.program_id(1), BLOCK_C, USE_INT64)
    c_mask = c < C
    anchor = tl.load(x_ptr + c * stride_c, mask=c_mask, other=0).to(COMPUTE_DTYPE)
    tile_begin = pid_chunk * tiles_per_chunk
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_tiles)
    first, mask, first_count = load_anchored_tile(
        x_ptr, tile_begin, c, c_mask, anchor, S, stride_n, stride_c, stride_s, tiles_per_n,
        BLOCK_S, USE_INT64,
    )
    shift = tl.sum(first, axis=1) / first_count
    y = tl.where(mask, first - shift[:, None], 0.0)
    sum_y = y
    sum_y2 = y * y
    count = first_count.to(tl.int64)
    for t in range(tile_begin + 1, tile_end):
        anchored, mask, tile_count = load_anchored_tile(
            x_ptr, t, c, c_mask, anchor, S, stride_n, stride_c, stride_s, tiles_per_n,
            BLOCK_S, USE_INT64,
        )
        y = tl.where(mask, anchored - shift[:, None], 0.0)
        sum_y += y
        sum_y2 += y * y
        count += tile_count
    count_f = count.to(COMPUTE_DTYPE)
    chunk_sum_y = tl.sum(sum_y, axis=1)
    anchored_mean = shift + chunk_sum_y / count_f
    m2 = tl.sum(sum_y2, axis=1) - chunk_sum_y * (chunk_sum_y / count_f)
    if FINALIZE:
        store_statistics(
            c, c_mask, anchor, anchored_mean, m2, count_f,
            mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
            momentum, unbias, COMPUTE_DTYPE, UPDATE_RUNNING, CUMULATIVE,
        )
    else:
        num_chunks = tl.num_programs(0)
        tl.store(summary_ptr + pid_chunk * C + c, anchored_mean, mask=c_mask)
        tl.store(summary_ptr + (num_chunks + pid_chunk) * C + c, m2, mask=c_mask)
        if tl.program_id(1) == 0:
            tl.store(counts_ptr + pid_chunk, count)


@triton.jit
def finalize_stats_kernel(
    x_ptr,  # input (read for the anchor A = x[0, c, 0])
    summary_ptr, counts_ptr,  # the workspaces partial_stats_kernel wrote
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    C, stride_c,
    num_chunks,
    momentum: tl.float64, unbias: tl.float64,
    BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Merge the chunk summaries of one channel block in chunk order; store the statistics."""
    c = channel_block(tl.program_id(0), BLOCK_C, USE_INT64)
    c_mask = c < C
    anchor = tl.load(x_ptr + c * stride_c, mask=c_mask, other=0).to(COMPUTE_DTYPE)
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    count = tl.zeros([], dtype=COMPUTE_DTYPE)
    for k in range(num_chunks):
        chunk_count = tl.load(counts_ptr + k).to(COMPUTE_DTYPE)
        chunk_mean = tl.load(summary_ptr + k * C + c, mask=c_mask, other=0)
        chunk_m2 = tl.load(summary_ptr + (num_chunks + k) * C + c, mask=c_mask, other=0)
        mean, m2, count = chan_merge(mean, m2, count, chunk_mean, chunk_m2, chunk_count)
    store_statistics(
        c, c_mask, anchor, mean, m2, count,
        mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
        momentum, unbias, COMPUTE_DTYPE, UPDATE_RUNNING, CUMULATIVE,
    )


@triton.jit
def channel_constants(c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps,
                      COMPUTE_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    """Per-channel (hi, lo, invstd, scale, shift) in COMPUTE_DTYPE.

    With mean = hi + lo (any stored dtype), invstd = 1 / sqrt(var + eps),
    scale = invstd * weight and shift = bias - lo * scale, the pre-activation is
    (x - hi) * scale + shift.
    """
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0).to(tl.float64)
    hi = mean.to(COMPUTE_DTYPE)
    lo = (mean - hi.to(tl.float64)).to(COMPUTE_DTYPE)
    var = tl.load(var_ptr + c, mask=c_mask, other=1).to(COMPUTE_DTYPE)
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
    """u = (x - hi) * scale + shift + residual on a tile (x, residual already upcast).

    The backward kernels call this too, so they see exactly the forward's u.
    """
    u = (x - hi[:, None]) * scale[:, None] + shift[:, None]
    if HAS_RESIDUAL:
        u += residual
    return u


@triton.jit
def store_activation_bits(mask_ptr, u, n, s0, c, c_mask, tile_mask, mask_stride_n,
                          mask_stride_c, ACTIVATION: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Pack derivative_is_one(u) of a tile into the uint8 activation mask [rows, C, S8]:
    bit j of byte k is position 8k + j (BLOCK_S and s0 are multiples of 8)."""
    bits = (derivative_is_one(u, ACTIVATION) & tile_mask).to(tl.int32)
    groups = tl.reshape(bits, [BLOCK_C, BLOCK_S // 8, 8])
    packed = tl.sum(groups << tl.arange(0, 8)[None, None, :], axis=2)
    byte = s0 // 8 + tl.arange(0, BLOCK_S // 8)
    byte_mask = c_mask[:, None] & (byte < mask_stride_c)[None, :]
    offsets = n * mask_stride_n + c[:, None] * mask_stride_c + byte[None, :]
    tl.store(mask_ptr + offsets, packed.to(tl.uint8), mask=byte_mask)


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, residual_ptr,  # [N, C, S] views; y written
    mean_ptr, var_ptr,  # [C] statistics (float64 batch statistics, or running statistics)
    weight_ptr, bias_ptr,  # [C] affine parameters (when HAS_WEIGHT / HAS_BIAS)
    mask_ptr,  # [N, C, cdiv(S, 8)] uint8 activation mask, written when WRITE_MASK
    C, S,
    x_stride_n, x_stride_c, x_stride_s,
    y_stride_n, y_stride_c, y_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    mask_stride_n, mask_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    tiles_per_n,
    eps: tl.float64, negative_slope: tl.float64,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, WRITE_MASK: tl.constexpr, USE_INT64: tl.constexpr,
):
    """y = act((x - mean) * invstd * weight + bias + residual) on one tile."""
    n, s0, s, c, c_mask, mask = program_tile(C, S, tiles_per_n, BLOCK_S, BLOCK_C, USE_INT64)
    hi, lo, invstd, scale, shift = channel_constants(
        c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
        HAS_BIAS,
    )
    x = tl.load(x_ptr + tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s), mask=mask,
                other=0).to(COMPUTE_DTYPE)
    residual = x
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s),
            mask=mask, other=0,
        ).to(COMPUTE_DTYPE)
    u = pre_activation(x, hi, scale, shift, residual, HAS_RESIDUAL)
    y = activation_forward(u, ACTIVATION, negative_slope)
    tl.store(y_ptr + tile_offsets(n, s, c, y_stride_n, y_stride_c, y_stride_s),
             y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_MASK:
        store_activation_bits(mask_ptr, u, n, s0, c, c_mask, mask, mask_stride_n,
                              mask_stride_c, ACTIVATION, BLOCK_S, BLOCK_C)
