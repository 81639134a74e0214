"""BatchNorm forward kernels: batch statistics (with the running-stat update) and normalize.

Training statistics take one or two launches:
1. ``partial_stats_kernel``, grid (chunks, channel blocks): each program sums the shifted
   values y = x - K and y^2 over its chunk of tiles, where the shift K is the channel's
   first element (x[0, c, 0]). Shifting keeps the sums small when the mean is large
   against the spread (mean 1e4, std 1 in float32), and x - K is exact for nearby values.
   With one chunk (FINALIZE) the program finishes the statistics itself; otherwise it
   writes (sum y, sum y^2) and the chunk's count to a workspace.
2. ``finalize_stats_kernel``, grid (channel blocks,): merges the chunks in a fixed order
   with Chan's parallel formula, so the result is bitwise reproducible.
Both end in ``store_statistics``: the batch mean and biased variance, and the running
update running = (1 - factor) * running + factor * batch (unbiased variance), where factor
is momentum, or 1 / num_batches_tracked read from device memory (CUMULATIVE).

``normalize_kernel`` then writes y = act((x - mean) * invstd * weight + bias + residual),
one tile per program; eval uses the same kernel with the running statistics.

All arithmetic is in the statistics dtype, the element type of ``mean_ptr``: float32, or
float64 for float64 inputs.
"""

import triton
import triton.language as tl

from .activations import activation_forward
from .tiling import channel_block, tile_offsets, tile_start


@triton.jit
def chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan's merge of two (mean, M2, count) summaries of disjoint sets of values."""
    count = count_a + count_b
    fraction_b = tl.where(count > 0, count_b / tl.maximum(count, 1), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * fraction_b, m2_a + m2_b + delta * delta * count_a * fraction_b, count


@triton.jit
def store_statistics(
    c, c_mask, shift, shifted_mean, m2, count,
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    momentum, unbias,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
):
    """Write the batch mean and biased variance; update the running statistics."""
    mean = shift + shifted_mean
    var = tl.maximum(m2 / count, 0.0)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_tracked_ptr).to(mean.dtype)
        else:
            factor = momentum
        running_mean = tl.load(running_mean_ptr + c, mask=c_mask).to(mean.dtype)
        running_var = tl.load(running_var_ptr + c, mask=c_mask).to(mean.dtype)
        running_mean = factor * mean + (1 - factor) * running_mean
        running_var = factor * (var * unbias) + (1 - factor) * running_var
        tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty),
                 mask=c_mask)
        tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty),
                 mask=c_mask)


@triton.jit
def partial_stats_kernel(
    x_ptr,  # input, read as [N, C, S]
    sums_ptr,  # [2, num_chunks, C] workspace: per chunk sum(x - K), sum((x - K)^2)
    counts_ptr,  # [num_chunks] int64 workspace: values per channel in each chunk
    mean_ptr, var_ptr,  # [C] batch mean and biased variance (written when FINALIZE)
    running_mean_ptr, running_var_ptr,  # [C] updated in place (FINALIZE and UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [1] int64, already incremented (CUMULATIVE)
    C, S,  # channels; positions per sample along the S axis
    stride_n, stride_c, stride_s,  # element strides of x's [N, C, S] view
    tiles_per_n,  # cdiv(S, BLOCK_S)
    num_tiles,  # N * tiles_per_n
    tiles_per_chunk,  # tiles summed by one program
    momentum, unbias,  # running-update factor (unless CUMULATIVE); M / (M - 1)
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FINALIZE: tl.constexpr,  # one chunk: write the statistics, no workspace
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Shifted sums of one chunk of tiles for one channel block."""
    pid_chunk = tl.program_id(0)
    c = channel_block(tl.program_id(1), BLOCK_C, USE_INT64)
    c_mask = c < C
    acc_dtype = mean_ptr.dtype.element_ty
    shift = tl.load(x_ptr + c * stride_c, mask=c_mask, other=0).to(acc_dtype)
    sum_y = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_dtype)
    sum_y2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_dtype)
    count = tl.zeros([], dtype=tl.int64)
    tile_begin = pid_chunk * tiles_per_chunk
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_tiles)
    for t in range(tile_begin, tile_end):
        n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + tile_offsets(n, s, c, stride_n, stride_c, stride_s), mask=mask,
                    other=0).to(acc_dtype)
        y = tl.where(mask, x - shift[None, :], 0.0)
        sum_y += y
        sum_y2 += y * y
        count += tl.minimum(S - s0, BLOCK_S)
    chunk_sum_y = tl.sum(sum_y, axis=0)
    chunk_sum_y2 = tl.sum(sum_y2, axis=0)
    if FINALIZE:
        count_f = count.to(acc_dtype)
        shifted_mean = chunk_sum_y / count_f
        m2 = chunk_sum_y2 - chunk_sum_y * shifted_mean
        store_statistics(
            c, c_mask, shift, shifted_mean, m2, count_f,
            mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
            momentum, unbias, UPDATE_RUNNING, CUMULATIVE,
        )
    else:
        num_chunks = tl.num_programs(0)
        tl.store(sums_ptr + pid_chunk * C + c, chunk_sum_y, mask=c_mask)
        tl.store(sums_ptr + (num_chunks + pid_chunk) * C + c, chunk_sum_y2, mask=c_mask)
        if tl.program_id(1) == 0:
            tl.store(counts_ptr + pid_chunk, count)


@triton.jit
def finalize_stats_kernel(
    x_ptr,  # input (read for the shift K = x[0, c, 0])
    sums_ptr, counts_ptr,  # the workspaces partial_stats_kernel wrote
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    C, stride_c,
    num_chunks,
    momentum, unbias,
    BLOCK_C: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Merge the chunks of one channel block in chunk order; store the statistics."""
    c = channel_block(tl.program_id(0), BLOCK_C, USE_INT64)
    c_mask = c < C
    acc_dtype = mean_ptr.dtype.element_ty
    shift = tl.load(x_ptr + c * stride_c, mask=c_mask, other=0).to(acc_dtype)
    mean = tl.zeros([BLOCK_C], dtype=acc_dtype)
    m2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    count = tl.zeros([], dtype=acc_dtype)
    for k in range(num_chunks):
        chunk_count = tl.load(counts_ptr + k).to(acc_dtype)
        chunk_sum_y = tl.load(sums_ptr + k * C + c, mask=c_mask, other=0)
        chunk_sum_y2 = tl.load(sums_ptr + (num_chunks + k) * C + c, mask=c_mask, other=0)
        chunk_mean = chunk_sum_y / chunk_count
        chunk_m2 = chunk_sum_y2 - chunk_sum_y * chunk_mean
        mean, m2, count = chan_merge(mean, m2, count, chunk_mean, chunk_m2, chunk_count)
    store_statistics(
        c, c_mask, shift, mean, m2, count,
        mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
        momentum, unbias, UPDATE_RUNNING, CUMULATIVE,
    )


@triton.jit
def channel_scale(c, c_mask, var_ptr, weight_ptr, eps, HAS_WEIGHT: tl.constexpr):
    """Per-channel invstd and scale = invstd * weight, in the statistics dtype."""
    var = tl.load(var_ptr + c, mask=c_mask, other=1)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + c, mask=c_mask, other=0).to(var.dtype)
    return invstd, scale


@triton.jit
def pre_activation(x, mean, scale, bias, residual, HAS_BIAS: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr):
    """u = (x - mean) * scale + bias + residual on a tile (x, residual already upcast).

    The backward kernels call this too, so they see exactly the forward's u.
    """
    u = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        u += bias[None, :]
    if HAS_RESIDUAL:
        u += residual
    return u


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, residual_ptr,  # [N, C, S] views; y written
    mean_ptr, var_ptr,  # [C] statistics in the statistics dtype
    weight_ptr, bias_ptr,  # [C] affine parameters (when HAS_WEIGHT / HAS_BIAS)
    C, S,
    x_stride_n, x_stride_c, x_stride_s,
    y_stride_n, y_stride_c, y_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    tiles_per_n,
    eps, negative_slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_INT64: tl.constexpr,
):
    """y = act((x - mean) * invstd * weight + bias + residual) on one tile."""
    n, s0 = tile_start(tl.program_id(0), tiles_per_n, BLOCK_S, USE_INT64)
    s = s0 + tl.arange(0, BLOCK_S)
    c = channel_block(tl.program_id(1), BLOCK_C, USE_INT64)
    c_mask = c < C
    mask = (s < S)[:, None] & c_mask[None, :]
    acc_dtype = mean_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0)
    invstd, scale = channel_scale(c, c_mask, var_ptr, weight_ptr, eps, HAS_WEIGHT)
    bias = mean
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0).to(acc_dtype)
    x = tl.load(x_ptr + tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s), mask=mask,
                other=0).to(acc_dtype)
    residual = x
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s),
            mask=mask, other=0,
        ).to(acc_dtype)
    u = pre_activation(x, mean, scale, bias, residual, HAS_BIAS, HAS_RESIDUAL)
    y = activation_forward(u, ACTIVATION, negative_slope)
    tl.store(y_ptr + tile_offsets(n, s, c, y_stride_n, y_stride_c, y_stride_s),
             y.to(y_ptr.dtype.element_ty), mask=mask)
